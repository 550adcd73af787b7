-- name: insert_event
INSERT INTO events (job_id, type, payload, created_at, next_attempt_at)
VALUES (?, ?, ?, ?, ?)

-- name: batch_live_count
SELECT count(*) FROM jobs
 WHERE batch_id = ? AND status IN ('pending', 'running', 'retrying')

-- name: batch_counts
SELECT status, count(*) FROM jobs WHERE batch_id = ? GROUP BY status

-- name: claim_events
UPDATE events
   SET lease_token = lower(hex(randomblob(16))), lease_expires_at = :now + :lease_seconds,
       attempts = attempts + 1
 WHERE id IN (SELECT e.id FROM events e
               WHERE e.next_attempt_at <= :now
                 AND (e.lease_expires_at IS NULL OR e.lease_expires_at < :now)
                 AND NOT EXISTS (SELECT 1 FROM events p
                                  WHERE p.job_id = e.job_id AND p.id < e.id)
               ORDER BY e.id LIMIT :limit)
RETURNING *

-- name: ack_event
DELETE FROM events WHERE id = ? AND lease_token = ?

-- name: retry_event
UPDATE events
   SET lease_token = NULL, lease_expires_at = NULL, next_attempt_at = :now + :retry_in,
       last_error = :error
 WHERE id = :id AND lease_token = :token
