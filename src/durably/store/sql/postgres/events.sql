-- The outbox.

-- name: insert_event
INSERT INTO events (job_id, type, payload, created_at, next_attempt_at)
VALUES (%(job_id)s, %(type)s, %(payload)s::json, coalesce(%(now)s::timestamptz, now()),
        coalesce(%(now)s::timestamptz, now()))

-- name: batch_lock
-- Serialises "is this batch finished?" per batch until commit, so exactly one of several
-- concurrent completers of a batch's last jobs sees it finished and writes batch_completed.
SELECT pg_advisory_xact_lock(hashtext('durably.batch.' || %(schema)s), hashtext(%(batch_id)s))

-- name: batch_counts
SELECT status, count(*) AS n FROM jobs WHERE batch_id = %(batch_id)s GROUP BY status

-- name: claim_events
WITH clock AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS t
),
picked AS (
    SELECT e.id FROM events e
     WHERE e.next_attempt_at <= (SELECT t FROM clock)
       AND (e.lease_expires_at IS NULL OR e.lease_expires_at < (SELECT t FROM clock))
       AND NOT EXISTS (SELECT 1 FROM events p WHERE p.job_id = e.job_id AND p.id < e.id)
     ORDER BY e.id
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE events
   SET lease_token = md5(gen_random_uuid()::text),
       lease_expires_at = clock.t + make_interval(secs => %(lease_seconds)s::double precision),
       attempts = events.attempts + 1
  FROM picked, clock
 WHERE events.id = picked.id
RETURNING events.*

-- name: ack_events
DELETE FROM events
 USING unnest(%(ids)s::bigint[], %(tokens)s::text[]) AS l (id, token)
 WHERE events.id = l.id AND events.lease_token = l.token

-- name: retry_event
UPDATE events
   SET lease_token = NULL, lease_expires_at = NULL,
       next_attempt_at = coalesce(%(now)s::timestamptz, now())
                         + make_interval(secs => %(retry_in)s::double precision),
       last_error = %(error)s
 WHERE id = %(id)s AND lease_token = %(token)s
