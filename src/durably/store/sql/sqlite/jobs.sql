-- Statements that return jobs use `SELECT *` / `RETURNING *`: sqlite.py reads those rows by
-- position, in the column order of 001_initial.sql (the order of the Job fields).

-- name: insert_job
-- One job. With a key, nothing is inserted while another live job holds it (rowcount 0).
-- No RETURNING: sqlite.py builds the stored job from what it wrote, which costs less than
-- RETURNING's temporary table.
INSERT INTO jobs (queue, handler, payload, status, max_attempts, policy, run_at, created_at,
                  updated_at, key, timeout, batch_id, item_index, event_scope, meta)
VALUES (:queue, :handler, :payload, 'pending', :max_attempts, :policy, :run_at, :now, :now,
        :key, :timeout, :batch_id, :item_index, :event_scope, :meta)
ON CONFLICT DO NOTHING

-- name: insert_jobs_keyless
-- Jobs without keys (nothing can conflict), many per statement: sqlite.py puts one copy of
-- insert_jobs_row per job where ROWS stands. One statement per chunk instead of one per row saves
-- most of the per-row cost (statement steps, the AUTOINCREMENT counter update). Each slot of
-- insert_jobs_row is filled with a numbered parameter (?N): a value every job of the chunk shares
-- is one parameter that all rows name, because binding a parameter costs more than SQLite's
-- whole insert of the row (a chunk whose jobs differ in payload only binds one value per job).
INSERT INTO jobs (queue, handler, payload, status, max_attempts, policy, run_at, created_at,
                  updated_at, timeout, batch_id, item_index, event_scope, meta)
VALUES {rows}

-- name: insert_jobs_row
({queue}, {handler}, {payload}, 'pending', {max_attempts}, {policy}, {run_at}, {now}, {now},
 {timeout}, {batch_id}, {item_index}, {event_scope}, {meta})

-- name: jobs_in_id_range
SELECT * FROM jobs WHERE id > ? AND id <= ? ORDER BY id

-- name: live_job_by_key
SELECT * FROM jobs WHERE key = ? AND status IN ('pending', 'running', 'retrying')

-- name: latest_job_by_key
SELECT * FROM jobs WHERE key = ? ORDER BY id DESC LIMIT 1

-- name: upsert_live
UPDATE jobs
   SET payload = :payload, meta = :meta, policy = :policy, max_attempts = :max_attempts,
       timeout = :timeout, event_scope = :event_scope, queue = :queue, handler = :handler,
       version = version + 1, updated_at = :now
 WHERE id = :id AND status IN ('pending', 'retrying')
RETURNING *

-- A claim runs the retrying statement, then the pending one for whatever room is left. Each
-- walks its partial index in (run_at, id) order from the queue's oldest entry and stops at the
-- limit or at the first job not yet due. `_one` takes a single queue (no sort at all), `_any` a
-- JSON list of queues (their due entries are merged by a sort).

-- name: claim_check_one
-- First in a claim's transaction: PRAGMA data_version (no other connection can commit before
-- ours does, so it is the version our commit leaves), and whether a retrying job of the queue is
-- due. Most claims find none and skip the retrying statement.
SELECT (SELECT data_version FROM pragma_data_version()),
       EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_retrying
                WHERE status = 'retrying' AND queue = :queue AND run_at <= :now)

-- name: claim_check_any
SELECT (SELECT data_version FROM pragma_data_version()),
       EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_retrying
                WHERE status = 'retrying' AND queue IN (SELECT value FROM json_each(:queues))
                  AND run_at <= :now)

-- name: claim_retrying_one
UPDATE jobs
   SET status = 'running', attempts = attempts + 1, worker_id = :worker_id,
       lease_token = lower(hex(randomblob(16))), lease_expires_at = :now + :lease_seconds,
       first_attempt_at = coalesce(first_attempt_at, :now), cancel_requested = 0,
       version = version + 1, updated_at = :now
 WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_retrying
               WHERE status = 'retrying' AND queue = :queue AND run_at <= :now
               ORDER BY run_at, id LIMIT :limit)
RETURNING *

-- name: claim_pending_one
UPDATE jobs
   SET status = 'running', attempts = attempts + 1, worker_id = :worker_id,
       lease_token = lower(hex(randomblob(16))), lease_expires_at = :now + :lease_seconds,
       first_attempt_at = coalesce(first_attempt_at, :now), cancel_requested = 0,
       version = version + 1, updated_at = :now
 WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_pending
               WHERE status = 'pending' AND queue = :queue AND run_at <= :now
               ORDER BY run_at, id LIMIT :limit)
RETURNING *

-- name: claim_retrying_any
UPDATE jobs
   SET status = 'running', attempts = attempts + 1, worker_id = :worker_id,
       lease_token = lower(hex(randomblob(16))), lease_expires_at = :now + :lease_seconds,
       first_attempt_at = coalesce(first_attempt_at, :now), cancel_requested = 0,
       version = version + 1, updated_at = :now
 WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_retrying
               WHERE status = 'retrying' AND queue IN (SELECT value FROM json_each(:queues))
                 AND run_at <= :now
               ORDER BY run_at, id LIMIT :limit)
RETURNING *

-- name: claim_pending_any
UPDATE jobs
   SET status = 'running', attempts = attempts + 1, worker_id = :worker_id,
       lease_token = lower(hex(randomblob(16))), lease_expires_at = :now + :lease_seconds,
       first_attempt_at = coalesce(first_attempt_at, :now), cancel_requested = 0,
       version = version + 1, updated_at = :now
 WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_pending
               WHERE status = 'pending' AND queue IN (SELECT value FROM json_each(:queues))
                 AND run_at <= :now
               ORDER BY run_at, id LIMIT :limit)
RETURNING *

-- name: claim_batch
-- Run once with :status = 'retrying', then with 'pending'.
UPDATE jobs
   SET status = 'running', attempts = attempts + 1, worker_id = :worker_id,
       lease_token = lower(hex(randomblob(16))), lease_expires_at = :now + :lease_seconds,
       first_attempt_at = coalesce(first_attempt_at, :now), cancel_requested = 0,
       version = version + 1, updated_at = :now
 WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_batch
               WHERE batch_id = :batch_id AND status = :status
                 AND queue IN (SELECT value FROM json_each(:queues))
                 AND (:due_only = 0 OR run_at <= :now)
               ORDER BY run_at, id LIMIT :limit)
RETURNING *

-- name: insert_attempt
-- The attempt rows of a claim, one statement for all: ?1 a JSON list of job ids, ?2 worker id,
-- ?3 now.
INSERT INTO attempts (job_id, number, worker_id, started_at)
SELECT claimed.value,
       coalesce((SELECT max(number) FROM attempts WHERE job_id = claimed.value), 0) + 1, ?2, ?3
  FROM json_each(?1) AS claimed

-- name: running_leases
-- The lease state of the listed jobs (a JSON list of ids) that are running: the fencing checks
-- of heartbeat and complete, done once for a whole batch. NOT INDEXED: rowid lookups only, never
-- a walk over every running job.
SELECT id, lease_token, lease_expires_at, cancel_requested, event_scope, batch_id
  FROM jobs NOT INDEXED
 WHERE id IN (SELECT value FROM json_each(?)) AND status = 'running'

-- name: heartbeat
-- executemany: ?1 now, ?2 lease seconds, ?3 job id, ?4 lease token.
UPDATE jobs SET lease_expires_at = ?1 + ?2, version = version + 1, updated_at = ?1
 WHERE id = ?3 AND status = 'running' AND lease_token = ?4

-- name: complete
-- executemany: ?1 now, ?2 status, ?3 result, ?4 classification, ?5 error message,
-- ?6 error type, ?7 retry_in, ?8 job id, ?9 lease token, ?10 require_expired.
UPDATE jobs
   SET status = ?2,
       result = ?3,
       classification = ?4,
       last_error = ?5,
       last_error_type = ?6,
       run_at = CASE WHEN ?2 = 'retrying' THEN ?1 + ?7 ELSE run_at END,
       finished_at = CASE WHEN ?2 = 'retrying' THEN NULL ELSE ?1 END,
       worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, cancel_requested = 0,
       version = version + 1, updated_at = ?1
 WHERE id = ?8 AND status = 'running' AND lease_token = ?9
   AND (?10 = 0 OR lease_expires_at < ?1)

-- name: finish_attempt
-- executemany: ?1 now, ?2 outcome, ?3 classification, ?4 error type, ?5 error message,
-- ?6 duration, ?7 job id.
UPDATE attempts
   SET finished_at = ?1, outcome = ?2, classification = ?3, error_type = ?4,
       error_message = ?5, duration = ?6
 WHERE job_id = ?7 AND finished_at IS NULL

-- name: release
UPDATE jobs
   SET attempts = attempts - 1,
       status = CASE WHEN attempts - 1 = 0 THEN 'pending' ELSE 'retrying' END,
       worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, cancel_requested = 0,
       first_attempt_at = CASE WHEN attempts - 1 = 0 THEN NULL ELSE first_attempt_at END,
       version = version + 1, updated_at = :now
 WHERE id = :id AND status = 'running' AND lease_token = :token
RETURNING id, attempts

-- name: delete_attempt
DELETE FROM attempts WHERE job_id = ? AND finished_at IS NULL

-- name: expired
SELECT * FROM jobs INDEXED BY jobs_leases
 WHERE status = 'running' AND lease_expires_at < ?
 ORDER BY lease_expires_at LIMIT ?

-- name: next_due_one
-- The earliest run_at waiting in one queue: a single index seek per status.
SELECT min(run_at) FROM (
    SELECT min(run_at) AS run_at FROM jobs INDEXED BY jobs_retrying
     WHERE status = 'retrying' AND queue = ?1
    UNION ALL
    SELECT min(run_at) FROM jobs INDEXED BY jobs_pending
     WHERE status = 'pending' AND queue = ?1)

-- name: next_due_any
-- The earliest run_at waiting in any of a JSON list of queues: one seek per queue and status.
SELECT min(run_at) FROM (
    SELECT min(run_at) AS run_at FROM jobs INDEXED BY jobs_retrying
     WHERE status = 'retrying' AND queue IN (SELECT value FROM json_each(?1))
    UNION ALL
    SELECT min(run_at) FROM jobs INDEXED BY jobs_pending
     WHERE status = 'pending' AND queue IN (SELECT value FROM json_each(?1)))

-- name: get_job
SELECT * FROM jobs WHERE id = ?

-- name: list_attempts
SELECT * FROM attempts WHERE job_id = ? ORDER BY number

-- name: list_audit
SELECT * FROM audit WHERE job_id = ? ORDER BY id

-- name: counts
SELECT queue, status, count(*) FROM jobs GROUP BY queue, status

-- name: insert_audit
INSERT INTO audit (job_id, at, actor, action, from_status, to_status, version, notes)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)

-- name: act_request_cancel
UPDATE jobs SET cancel_requested = 1, version = version + 1, updated_at = :now
 WHERE id = :id
RETURNING *

-- name: act_end
UPDATE jobs
   SET status = :status, operator = :actor, operator_notes = :notes, finished_at = :now,
       version = version + 1, updated_at = :now
 WHERE id = :id
RETURNING *

-- name: act_requeue
UPDATE jobs
   SET status = 'pending', run_at = :now, classification = NULL, last_error = NULL,
       last_error_type = NULL, result = NULL, finished_at = NULL, first_attempt_at = NULL,
       operator = NULL, operator_notes = NULL, cancel_requested = 0,
       attempts = CASE WHEN :reset = 1 THEN 0 ELSE attempts END,
       version = version + 1, updated_at = :now
 WHERE id = :id
RETURNING *

-- name: prune
DELETE FROM jobs
 WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_finished
               WHERE finished_at < :cutoff
                 AND status IN (SELECT value FROM json_each(:statuses))
               LIMIT :limit)

-- name: list_jobs
SELECT * FROM jobs WHERE {where} ORDER BY id DESC LIMIT ?
