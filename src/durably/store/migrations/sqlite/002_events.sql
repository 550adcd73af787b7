-- The transactional outbox: events written with the state change, deleted once delivered.
CREATE TABLE events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id           INTEGER,
    type             TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    created_at       REAL    NOT NULL,
    next_attempt_at  REAL    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    lease_token      TEXT,
    lease_expires_at REAL,
    last_error       TEXT
);
CREATE INDEX events_due ON events (next_attempt_at, id);
CREATE INDEX events_job ON events (job_id, id);
