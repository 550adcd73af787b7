-- Schema management. Queries holding {schema} or {channel} are templates: the store fills them
-- with the validated identifier (psycopg.sql.Identifier) before use.

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS {schema}

-- name: drop_schema
DROP SCHEMA IF EXISTS {schema} CASCADE

-- name: migration_lock
-- Held until the migrating transaction ends: processes starting together migrate one at a time.
SELECT pg_advisory_xact_lock(hashtext('durably.migrate'), hashtext(%(schema)s))

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS durably_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL
)

-- name: migrations_table_exists
SELECT to_regclass('durably_migrations') IS NOT NULL AS present

-- name: schema_version
SELECT coalesce(max(version), 0) AS version FROM durably_migrations

-- name: record_migration
INSERT INTO durably_migrations (version, name, applied_at)
VALUES (%(version)s, %(name)s, coalesce(%(now)s::timestamptz, now()))

-- name: listen
LISTEN {channel}

-- name: now
SELECT coalesce(%(now)s::timestamptz, now()) AS now
