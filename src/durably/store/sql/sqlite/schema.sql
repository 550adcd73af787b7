-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS durably_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at REAL NOT NULL
)

-- name: schema_version
SELECT coalesce(max(version), 0) FROM durably_migrations

-- name: record_migration
INSERT INTO durably_migrations (version, name, applied_at) VALUES (?, ?, ?)

-- name: data_version
-- Changes whenever another connection commits: how a process sees other processes' writes.
PRAGMA data_version
