-- Jobs, their attempts and the operator audit trail. Times are REAL seconds since the epoch (UTC).
CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, even after pruning
    queue            TEXT    NOT NULL,
    handler          TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER,
    policy           TEXT    NOT NULL DEFAULT '{}',
    run_at           REAL    NOT NULL,
    version          INTEGER NOT NULL DEFAULT 1,
    created_at       REAL    NOT NULL,
    updated_at       REAL    NOT NULL,
    key              TEXT,
    timeout          REAL,
    batch_id         TEXT,
    item_index       INTEGER,
    event_scope      TEXT,
    meta             TEXT    NOT NULL DEFAULT '{}',
    worker_id        TEXT,
    lease_token      TEXT,
    lease_expires_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    first_attempt_at REAL,
    finished_at      REAL,
    classification   TEXT,
    last_error       TEXT,
    last_error_type  TEXT,
    result           TEXT,
    operator         TEXT,
    operator_notes   TEXT
);

-- The claim reads only waiting jobs: finished jobs never enter this index.
CREATE INDEX jobs_waiting ON jobs (queue, run_at, id) WHERE status IN ('pending', 'retrying');
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'running';
CREATE UNIQUE INDEX jobs_live_key ON jobs (key)
    WHERE key IS NOT NULL AND status IN ('pending', 'running', 'retrying');
CREATE INDEX jobs_key ON jobs (key, id) WHERE key IS NOT NULL;
CREATE INDEX jobs_status ON jobs (status, id);
CREATE INDEX jobs_batch ON jobs (batch_id, item_index) WHERE batch_id IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE attempts (
    job_id         INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number         INTEGER NOT NULL,
    worker_id      TEXT    NOT NULL,
    started_at     REAL    NOT NULL,
    finished_at    REAL,
    outcome        TEXT,
    classification TEXT,
    error_type     TEXT,
    error_message  TEXT,
    duration       REAL,
    PRIMARY KEY (job_id, number)
) WITHOUT ROWID;

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at          REAL    NOT NULL,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    from_status TEXT    NOT NULL,
    to_status   TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    notes       TEXT
);
CREATE INDEX audit_job ON audit (job_id, id);
