-- Job operations. Every "now" is coalesce(%(now)s, now()): the injected clock in tests, the
-- database's clock otherwise, never a worker's.

-- name: live_job_by_key_for_update
SELECT * FROM jobs
 WHERE key = %(key)s AND status IN ('pending', 'running', 'retrying')
   FOR UPDATE

-- name: latest_job_by_key
SELECT * FROM jobs WHERE key = %(key)s ORDER BY id DESC LIMIT 1

-- name: live_job_by_key
SELECT * FROM jobs WHERE key = %(key)s AND status IN ('pending', 'running', 'retrying')

-- name: upsert_live
UPDATE jobs
   SET payload = %(payload)s::jsonb, meta = %(meta)s::jsonb, policy = %(policy)s::json,
       max_attempts = %(max_attempts)s, timeout = %(timeout)s, event_scope = %(event_scope)s,
       queue = %(queue)s, handler = %(handler)s,
       version = version + 1, updated_at = coalesce(%(now)s::timestamptz, now())
 WHERE id = %(id)s AND status IN ('pending', 'retrying')
RETURNING *

-- name: claim
-- Pick, lease and open an attempt row in one statement; SKIP LOCKED lets claimers pass each
-- other by, and nothing stays locked once it returns. Due retries come first, then pending jobs.
-- Per queue and status, an ordered walk of jobs_waiting that stops after `limit` rows, so a deep
-- backlog is never sorted; the pending walk asks only for what the retries left room for, so
-- a single-queue claim locks no row it does not take.
-- The queue list and the limit are read through sub-selects, so no estimate depends on their
-- values: once prepared, the server keeps one generic plan (these index walks with LIMIT need no
-- other) instead of planning every claim, which took longer than running it.
WITH clock AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS t
),
retries AS MATERIALIZED (
    SELECT c.id, c.run_at
      FROM unnest((SELECT %(queues)s::text[])) AS q (name)
     CROSS JOIN LATERAL (
            SELECT j.id, j.run_at FROM jobs j
             WHERE j.queue = q.name AND j.status = 'retrying'
               AND j.run_at <= (SELECT t FROM clock)
             ORDER BY j.run_at, j.id
             LIMIT (SELECT %(limit)s::bigint)
               FOR UPDATE SKIP LOCKED
           ) AS c
     ORDER BY c.run_at, c.id
     LIMIT (SELECT %(limit)s::bigint)
),
room AS (
    SELECT %(limit)s - count(*) AS n FROM retries
),
fresh AS MATERIALIZED (
    SELECT c.id, c.run_at
      FROM unnest((SELECT %(queues)s::text[])) AS q (name)
     CROSS JOIN LATERAL (
            SELECT j.id, j.run_at FROM jobs j
             WHERE j.queue = q.name AND j.status = 'pending'
               AND j.run_at <= (SELECT t FROM clock)
             ORDER BY j.run_at, j.id
             LIMIT (SELECT n FROM room)
               FOR UPDATE SKIP LOCKED
           ) AS c
     ORDER BY c.run_at, c.id
     LIMIT (SELECT n FROM room)
),
picked AS (
    SELECT id, 0 AS rank FROM retries
    UNION ALL
    SELECT id, 1 AS rank FROM fresh
),
claimed AS (
    UPDATE jobs
       SET status = 'running', attempts = jobs.attempts + 1, worker_id = %(worker_id)s,
           lease_token = md5(gen_random_uuid()::text),
           lease_expires_at = clock.t + make_interval(secs => %(lease_seconds)s::double precision),
           first_attempt_at = coalesce(jobs.first_attempt_at, clock.t), cancel_requested = false,
           last_attempt = jobs.last_attempt + 1,
           version = jobs.version + 1, updated_at = clock.t
      FROM clock
     -- An id list, not a join: a join estimated from the LIMITs above could be planned as a
     -- hash join over a sequential scan of the whole table.
     WHERE jobs.id = ANY (ARRAY(SELECT id FROM picked))
    RETURNING jobs.*
),
opened AS (
    INSERT INTO attempts (job_id, number, worker_id, started_at)
    SELECT c.id, c.last_attempt, c.worker_id, c.updated_at FROM claimed c
)
SELECT c.*, p.rank FROM claimed c JOIN picked p ON p.id = c.id ORDER BY p.rank, c.run_at, c.id

-- name: claim_batch
-- A batch is small enough to sort; retries first here too.
WITH clock AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS t
),
picked AS (
    SELECT id, CASE WHEN status = 'retrying' THEN 0 ELSE 1 END AS rank FROM jobs
     WHERE status IN ('pending', 'retrying') AND batch_id = %(batch_id)s
       AND queue = ANY(%(queues)s::text[])
       AND (NOT %(due_only)s::boolean OR run_at <= (SELECT t FROM clock))
     ORDER BY rank, run_at, id
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE jobs
       SET status = 'running', attempts = jobs.attempts + 1, worker_id = %(worker_id)s,
           lease_token = md5(gen_random_uuid()::text),
           lease_expires_at = clock.t + make_interval(secs => %(lease_seconds)s::double precision),
           first_attempt_at = coalesce(jobs.first_attempt_at, clock.t), cancel_requested = false,
           last_attempt = jobs.last_attempt + 1,
           version = jobs.version + 1, updated_at = clock.t
      FROM clock
     -- An id list, not a join: a join estimated from the LIMITs above could be planned as a
     -- hash join over a sequential scan of the whole table.
     WHERE jobs.id = ANY (ARRAY(SELECT id FROM picked))
    RETURNING jobs.*
),
opened AS (
    INSERT INTO attempts (job_id, number, worker_id, started_at)
    SELECT c.id, c.last_attempt, c.worker_id, c.updated_at FROM claimed c
)
SELECT c.*, p.rank FROM claimed c JOIN picked p ON p.id = c.id ORDER BY p.rank, c.run_at, c.id

-- name: heartbeat
WITH clock AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS t
)
UPDATE jobs
   SET lease_expires_at = clock.t + make_interval(secs => %(lease_seconds)s::double precision),
       version = jobs.version + 1, updated_at = clock.t
  FROM unnest(%(ids)s::bigint[], %(tokens)s::text[]) AS l (id, token), clock
 WHERE jobs.id = l.id AND jobs.status = 'running' AND jobs.lease_token = l.token
RETURNING jobs.id, jobs.cancel_requested

-- name: complete
-- Many completions in one statement, each fenced by its lease token. The job row is updated and
-- its open attempt row finished together; rows that do not match are left untouched. With
-- defer_events, completions that may owe outbox events (a job with an event scope reaching an
-- event status) are left alone too: the caller retries those it did not see applied in a
-- transaction that also writes their events, so every other completion is this one
-- autocommitted statement.
WITH clock AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS t
),
-- One JSON array per completion, its fields by position (see PostgresStore.complete): a third
-- of the bytes of an object per completion, to encode and to parse.
input AS MATERIALIZED (
    SELECT (c ->> 0)::integer AS ord, (c ->> 1)::bigint AS id, c ->> 2 AS token,
           c ->> 3 AS status, nullif(c -> 4, 'null'::jsonb) AS result,
           c ->> 5 AS classification, c ->> 6 AS error_type, c ->> 7 AS error_message,
           (c ->> 8)::double precision AS retry_in, (c ->> 9)::boolean AS require_expired,
           c ->> 10 AS attempt_outcome, c ->> 11 AS attempt_classification,
           c ->> 12 AS attempt_error_type, c ->> 13 AS attempt_error_message,
           (c ->> 14)::double precision AS duration,
           %(defer_events)s::boolean AND c ->> 3 = ANY(%(event_statuses)s::text[]) AS may_owe
      FROM jsonb_array_elements(%(items)s::jsonb) AS c
),
done AS (
    UPDATE jobs
       SET status = i.status, result = i.result, classification = i.classification,
           last_error = i.error_message, last_error_type = i.error_type,
           run_at = CASE WHEN i.status = 'retrying'
                         THEN clock.t + make_interval(secs => i.retry_in)
                         ELSE jobs.run_at END,
           finished_at = CASE WHEN i.status = 'retrying' THEN NULL ELSE clock.t END,
           worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
           cancel_requested = false, version = jobs.version + 1, updated_at = clock.t
      FROM input i, clock
     WHERE jobs.id = i.id AND jobs.status = 'running' AND jobs.lease_token = i.token
       AND (NOT i.require_expired OR jobs.lease_expires_at < clock.t)
       AND NOT (i.may_owe AND jobs.event_scope IS NOT NULL)
    RETURNING jobs.id, jobs.queue, jobs.status, jobs.event_scope, i.ord
),
finished AS (
    UPDATE attempts
       SET finished_at = clock.t, outcome = i.attempt_outcome,
           classification = i.attempt_classification, error_type = i.attempt_error_type,
           error_message = i.attempt_error_message, duration = i.duration
      FROM done d JOIN input i ON i.ord = d.ord, clock
     WHERE attempts.job_id = d.id AND attempts.finished_at IS NULL
),
notified AS (
    SELECT count(pg_notify(%(channel)s, q.queue)) AS n
      FROM (SELECT DISTINCT queue FROM done WHERE status = 'retrying') q
)
-- Only what the caller needs to tell which completions owe outbox events: decoding whole rows
-- (payload, result, meta...) for every completion was a large share of a worker's time.
SELECT d.ord, d.id, d.status, d.event_scope FROM done d CROSS JOIN notified

-- name: jobs_by_ids
SELECT * FROM jobs WHERE id = ANY(%(ids)s::bigint[])

-- name: release
WITH clock AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS t
),
released AS (
    UPDATE jobs
       SET attempts = jobs.attempts - 1,
           status = CASE WHEN jobs.attempts - 1 = 0 THEN 'pending' ELSE 'retrying' END,
           first_attempt_at = CASE WHEN jobs.attempts - 1 = 0 THEN NULL
                                   ELSE jobs.first_attempt_at END,
           worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
           cancel_requested = false, last_attempt = jobs.last_attempt - 1,
           version = jobs.version + 1, updated_at = clock.t
      FROM unnest(%(ids)s::bigint[], %(tokens)s::text[]) AS l (id, token), clock
     WHERE jobs.id = l.id AND jobs.status = 'running' AND jobs.lease_token = l.token
    RETURNING jobs.id, jobs.queue
),
deleted AS (
    DELETE FROM attempts USING released r
     WHERE attempts.job_id = r.id AND attempts.finished_at IS NULL
),
notified AS (
    SELECT count(pg_notify(%(channel)s, q.queue)) AS n
      FROM (SELECT DISTINCT queue FROM released) q
)
SELECT r.id FROM released r CROSS JOIN notified

-- name: expired
SELECT * FROM jobs
 WHERE status = 'running' AND lease_expires_at < coalesce(%(now)s::timestamptz, now())
 ORDER BY lease_expires_at, id
 LIMIT %(limit)s

-- name: next_due
-- One index probe per queue and waiting status on jobs_waiting: min() over "queue = ANY(...)"
-- scanned the table, 74 ms with 200,000 future jobs, on every idle pass of every worker. The
-- queue list is read through a sub-select, so the server keeps one generic plan (as for claim).
SELECT extract(epoch FROM min(n.run_at) - coalesce(%(now)s::timestamptz, now()))::double precision
       AS seconds
  FROM unnest((SELECT %(queues)s::text[])) AS q (name)
 CROSS JOIN unnest(ARRAY['retrying', 'pending']) AS s (status)
 CROSS JOIN LATERAL (
       SELECT j.run_at FROM jobs j
        WHERE j.queue = q.name AND j.status = s.status
          AND j.status IN ('pending', 'retrying')  -- lets the planner use the partial index
        ORDER BY j.run_at LIMIT 1) AS n

-- name: get_job
SELECT * FROM jobs WHERE id = %(id)s

-- name: get_job_for_update
SELECT * FROM jobs WHERE id = %(id)s FOR UPDATE

-- name: list_jobs
SELECT * FROM jobs
 WHERE (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
   AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
   AND (%(handler)s::text IS NULL OR handler = %(handler)s::text)
   AND (%(batch_id)s::text IS NULL OR batch_id = %(batch_id)s::text)
   AND (%(classification)s::text IS NULL OR classification = %(classification)s::text)
   AND (%(key)s::text IS NULL OR key = %(key)s::text)
   AND (%(after_id)s::bigint IS NULL OR id < %(after_id)s::bigint)
 ORDER BY id DESC
 LIMIT %(limit)s

-- name: list_attempts
SELECT * FROM attempts WHERE job_id = %(id)s ORDER BY number

-- name: list_audit
SELECT * FROM audit WHERE job_id = %(id)s ORDER BY id

-- name: counts
SELECT queue, status, count(*) AS n FROM jobs GROUP BY queue, status

-- name: insert_audit
INSERT INTO audit (job_id, at, actor, action, from_status, to_status, version, notes)
VALUES (%(id)s, coalesce(%(now)s::timestamptz, now()), %(actor)s, %(action)s, %(from_status)s,
        %(to_status)s, %(version)s, %(notes)s)

-- name: act_request_cancel
UPDATE jobs
   SET cancel_requested = true, version = version + 1,
       updated_at = coalesce(%(now)s::timestamptz, now())
 WHERE id = %(id)s
RETURNING *

-- name: act_end
UPDATE jobs
   SET status = %(status)s, operator = %(actor)s, operator_notes = %(notes)s,
       finished_at = coalesce(%(now)s::timestamptz, now()), version = version + 1,
       updated_at = coalesce(%(now)s::timestamptz, now())
 WHERE id = %(id)s
RETURNING *

-- name: act_requeue
UPDATE jobs
   SET status = 'pending', run_at = coalesce(%(now)s::timestamptz, now()),
       classification = NULL, last_error = NULL, last_error_type = NULL, result = NULL,
       finished_at = NULL, first_attempt_at = NULL, operator = NULL, operator_notes = NULL,
       cancel_requested = false,
       attempts = CASE WHEN %(reset)s::boolean THEN 0 ELSE attempts END,
       version = version + 1, updated_at = coalesce(%(now)s::timestamptz, now())
 WHERE id = %(id)s
RETURNING *

-- name: notify
SELECT pg_notify(%(channel)s, %(queue)s)

-- name: prune
DELETE FROM jobs
 WHERE id IN (SELECT id FROM jobs
               WHERE finished_at < coalesce(%(now)s::timestamptz, now())
                                   - make_interval(secs => %(older_than)s::double precision)
                 AND status = ANY(%(statuses)s::text[])
               LIMIT %(limit)s)
