-- name: insert_job
INSERT INTO jobs (queue, handler, payload, status, max_attempts, policy, run_at, created_at,
                  updated_at, key, timeout, batch_id, item_index, event_scope, meta)
VALUES (:queue, :handler, :payload, 'pending', :max_attempts, :policy, :run_at, :now, :now,
        :key, :timeout, :batch_id, :item_index, :event_scope, :meta)
ON CONFLICT DO NOTHING
RETURNING *

-- name: insert_job_plain
-- For a batch without keys (executemany): nothing can conflict and RETURNING is not allowed.
INSERT INTO jobs (queue, handler, payload, status, max_attempts, policy, run_at, created_at,
                  updated_at, key, timeout, batch_id, item_index, event_scope, meta)
VALUES (:queue, :handler, :payload, 'pending', :max_attempts, :policy, :run_at, :now, :now,
        :key, :timeout, :batch_id, :item_index, :event_scope, :meta)

-- name: last_insert_rowid
SELECT last_insert_rowid()

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

-- name: claim
UPDATE jobs
   SET status = 'running', attempts = attempts + 1, worker_id = :worker_id,
       lease_token = lower(hex(randomblob(16))), lease_expires_at = :now + :lease_seconds,
       first_attempt_at = coalesce(first_attempt_at, :now), cancel_requested = 0,
       version = version + 1, updated_at = :now
 WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_waiting
               WHERE status IN ('pending', 'retrying') AND queue IN (SELECT value FROM json_each(:queues))
                 AND run_at <= :now
               ORDER BY run_at, id LIMIT :limit)
RETURNING *

-- name: claim_batch
UPDATE jobs
   SET status = 'running', attempts = attempts + 1, worker_id = :worker_id,
       lease_token = lower(hex(randomblob(16))), lease_expires_at = :now + :lease_seconds,
       first_attempt_at = coalesce(first_attempt_at, :now), cancel_requested = 0,
       version = version + 1, updated_at = :now
 WHERE id IN (SELECT id FROM jobs
               WHERE status IN ('pending', 'retrying') AND batch_id = :batch_id
                 AND queue IN (SELECT value FROM json_each(:queues))
                 AND (:due_only = 0 OR run_at <= :now)
               ORDER BY run_at, id LIMIT :limit)
RETURNING *

-- name: insert_attempt
INSERT INTO attempts (job_id, number, worker_id, started_at)
SELECT :id, coalesce(max(number), 0) + 1, :worker_id, :now FROM attempts WHERE job_id = :id

-- name: heartbeat
UPDATE jobs SET lease_expires_at = :now + :lease_seconds, version = version + 1, updated_at = :now
 WHERE id = :id AND status = 'running' AND lease_token = :token
RETURNING id, cancel_requested

-- name: complete
UPDATE jobs
   SET status = :status,
       result = :result,
       classification = :classification,
       last_error = :error_message,
       last_error_type = :error_type,
       run_at = CASE WHEN :status = 'retrying' THEN :now + :retry_in ELSE run_at END,
       finished_at = CASE WHEN :status = 'retrying' THEN NULL ELSE :now END,
       worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, cancel_requested = 0,
       version = version + 1, updated_at = :now
 WHERE id = :id AND status = 'running' AND lease_token = :token
   AND (:require_expired = 0 OR lease_expires_at < :now)
RETURNING id, event_scope

-- name: finish_attempt
UPDATE attempts
   SET finished_at = :now, outcome = :outcome, classification = :classification,
       error_type = :error_type, error_message = :error_message, duration = :duration
 WHERE job_id = :id AND finished_at IS NULL

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

-- name: next_due
SELECT min(run_at) FROM jobs INDEXED BY jobs_waiting
 WHERE status IN ('pending', 'retrying') AND queue IN (SELECT value FROM json_each(?))

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
