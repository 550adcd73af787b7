-- Enqueueing. These queries also run on a caller's own connection (transactional enqueue), whose
-- search_path is not ours: they name tables as {schema}.table, filled in by the store.

-- name: enqueue
-- One round trip for any number of jobs. Ids are drawn up front so each input row knows its
-- job; a row whose key is held by a live job (stored before, or earlier in this batch) is not
-- inserted and gets that live job back instead. Results come back in input order.
WITH clock AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS t
),
input AS MATERIALIZED (
    SELECT e.ord, nextval(%(sequence)s::regclass) AS new_id, e.j
      FROM jsonb_array_elements(%(jobs)s::jsonb) WITH ORDINALITY AS e (j, ord)
),
ins AS (
    INSERT INTO {schema}.jobs (id, queue, handler, payload, status, max_attempts, policy, run_at,
                               created_at, updated_at, key, timeout, batch_id, item_index,
                               event_scope, meta)
    SELECT i.new_id, i.j ->> 'queue', i.j ->> 'handler', i.j -> 'payload', 'pending',
           (i.j ->> 'max_attempts')::integer, i.j -> 'policy',
           clock.t + make_interval(secs => (i.j ->> 'delay')::double precision),
           clock.t, clock.t, i.j ->> 'key', (i.j ->> 'timeout')::double precision,
           i.j ->> 'batch_id', (i.j ->> 'item_index')::integer, i.j ->> 'event_scope',
           i.j -> 'meta'
      FROM input i CROSS JOIN clock
     ORDER BY i.ord
    ON CONFLICT (key) WHERE key IS NOT NULL AND status IN ('pending', 'running', 'retrying')
    DO NOTHING
    RETURNING *
),
notified AS (
    SELECT count(pg_notify(%(channel)s, q.queue)) AS n FROM (SELECT DISTINCT queue FROM ins) q
)
SELECT i.ord, true AS created, ins.*
  FROM input i JOIN ins ON ins.id = i.new_id CROSS JOIN notified
UNION ALL
SELECT i.ord, false AS created, ins.*
  FROM input i JOIN ins ON ins.key = i.j ->> 'key' AND ins.id <> i.new_id
 WHERE NOT EXISTS (SELECT 1 FROM ins x WHERE x.id = i.new_id)
UNION ALL
SELECT i.ord, false AS created, j.*
  FROM input i
  JOIN {schema}.jobs j
    ON j.key = i.j ->> 'key' AND j.status IN ('pending', 'running', 'retrying')
 WHERE NOT EXISTS (SELECT 1 FROM ins x WHERE x.id = i.new_id)
ORDER BY ord

-- name: enqueue_one
-- One job: the enqueue statement without its batch machinery (ordinality, union of outcomes),
-- so it plans in microseconds and its plan is cached once prepared. The job arrives as the same
-- JSON object, converted the same way. A key held by a live job returns no row; the store then
-- looks the holder up.
WITH input AS (
    SELECT %(job)s::jsonb AS j, coalesce(%(now)s::timestamptz, now()) AS t
),
ins AS (
    INSERT INTO {schema}.jobs (queue, handler, payload, status, max_attempts, policy, run_at,
                               created_at, updated_at, key, timeout, batch_id, item_index,
                               event_scope, meta)
    SELECT j ->> 'queue', j ->> 'handler', j -> 'payload', 'pending',
           (j ->> 'max_attempts')::integer, j -> 'policy',
           t + make_interval(secs => (j ->> 'delay')::double precision),
           t, t, j ->> 'key', (j ->> 'timeout')::double precision,
           j ->> 'batch_id', (j ->> 'item_index')::integer, j ->> 'event_scope', j -> 'meta'
      FROM input
    ON CONFLICT (key) WHERE key IS NOT NULL AND status IN ('pending', 'running', 'retrying')
    DO NOTHING
    RETURNING *
)
SELECT ins.*, pg_notify(%(channel)s, ins.queue) AS notified FROM ins

-- name: live_jobs_by_keys
SELECT * FROM {schema}.jobs
 WHERE key = ANY(%(keys)s::text[]) AND status IN ('pending', 'running', 'retrying')

-- name: enqueue_reserve
-- The bulk path for jobs without keys: ids and the clock for a COPY that follows in the same
-- transaction, and one NOTIFY per queue (delivered at commit, dropped on rollback). The ids come
-- back as a range when nobody else drew from the sequence meanwhile, else as a list.
WITH ids AS MATERIALIZED (
    SELECT nextval(%(sequence)s::regclass) AS id FROM generate_series(1, %(n)s)
)
SELECT coalesce(%(now)s::timestamptz, now()) AS now, min(id) AS low, max(id) AS high,
       CASE WHEN max(id) - min(id) + 1 = count(*) THEN NULL
            ELSE array_agg(id ORDER BY id) END AS ids,
       (SELECT count(pg_notify(%(channel)s, q)) FROM unnest(%(queues)s::text[]) AS q) AS notified
  FROM ids

-- name: enqueue_copy
-- The store writes these columns, in this order, in COPY's binary format.
COPY {schema}.jobs (id, payload, batch_id, item_index, queue, handler, max_attempts, policy,
                    timeout, event_scope, meta, run_at, created_at, updated_at)
FROM STDIN WITH (FORMAT binary)
