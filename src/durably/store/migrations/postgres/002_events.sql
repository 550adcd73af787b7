-- The transactional outbox: events written in the transaction of the state change that owes
-- them, deleted once delivered. No foreign key: pruning a job must not lose its undelivered
-- events. The payload is json (not jsonb) so it is delivered exactly as written.
CREATE TABLE events (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id           bigint,
    type             text        NOT NULL,
    payload          json        NOT NULL,
    created_at       timestamptz NOT NULL,
    next_attempt_at  timestamptz NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    lease_token      text,
    lease_expires_at timestamptz,
    last_error       text
);
CREATE INDEX events_due ON events (next_attempt_at, id);
CREATE INDEX events_job ON events (job_id, id) WHERE job_id IS NOT NULL;
