-- Shared helpers, prepended to every script by durably.store.redis before SCRIPT LOAD.
--
-- KEYS[1] is the namespace root "{prefix}". Its braces are a Redis Cluster hash tag, so every
-- key a script builds from it lives in the same slot as KEYS[1].
--
-- Times are integer microseconds since the epoch. They are always written with int() because
-- Lua's tostring() and Redis's number-to-argument conversion may use exponent notation.
local P = KEYS[1]
local LIVE = {pending = true, running = true, retrying = true}
-- durably.job.EVENT_STATUSES: reaching one of these writes a '<scope>.processed' event.
local EVENT_STATUSES = {
  succeeded = true, resolved = true, abandoned = true, cancelled = true, dead_letter = true,
}

local function int(n)
  return string.format('%d', n)
end

-- Index members are zero-padded ids so that equal scores order by id (lexicographic = numeric).
local function pad(id)
  return string.format('%016d', tonumber(id))
end

local function jkey(id)
  return P .. ':job:' .. id
end

-- The injected clock (tests) wins over the server's clock.
local function now_us(arg)
  if arg ~= nil and arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function hget(jk, field)
  local v = redis.call('HGET', jk, field)
  if v == false then
    return nil
  end
  return v
end

local function set_or_del(jk, field, value)
  if value == nil then
    redis.call('HDEL', jk, field)
  else
    redis.call('HSET', jk, field, value)
  end
end

local function decr_field(key, field)
  if redis.call('HINCRBY', key, field, -1) <= 0 then
    redis.call('HDEL', key, field)
  end
end

-- A waiting job is in its queue's ':due:' set (score run_at); a retrying one is in ':retry:' as
-- well, where claims look first. ':due:' alone is what an older durably reads and writes, so
-- both versions can share a namespace (claim.lua repairs what an older one leaves behind).
local function add_waiting(status, queue, run_at, member)
  redis.call('ZADD', P .. ':due:' .. queue, run_at, member)
  if status == 'retrying' then
    redis.call('ZADD', P .. ':retry:' .. queue, run_at, member)
  end
end

-- Take a job off its queue's waiting sets.
local function unwait(member, queue)
  redis.call('ZREM', P .. ':due:' .. queue, member)
  redis.call('ZREM', P .. ':retry:' .. queue, member)
end

-- Move a job between the per-status indexes, the per-(status, queue) counts and its batch's
-- per-status counts; old or new may be nil.
local function move_status(id, queue, old, new)
  local member = pad(id)
  local batch = redis.call('HGET', jkey(id), 'batch_id')
  local bkey = batch and (P .. ':batchcounts:' .. batch)
  if old then
    redis.call('ZREM', P .. ':status:' .. old, member)
    decr_field(P .. ':counts', old .. '|' .. queue)
    if bkey then
      decr_field(bkey, old)
    end
  end
  if new then
    redis.call('ZADD', P .. ':status:' .. new, id, member)
    redis.call('HINCRBY', P .. ':counts', new .. '|' .. queue, 1)
    if bkey then
      redis.call('HINCRBY', bkey, new, 1)
    end
    redis.call('HSET', jkey(id), 'status', new)
  end
end

-- Counter changes (the per-(status, queue) counts, a batch's per-status counts) summed over a
-- script call and applied once per field at the end: new_counts(), add_count(), apply_counts().
-- A field falling to zero or below is removed, as decr_field does. apply_counts(c, key) applies
-- one hash's changes early, for code that reads it (emit()).
local function new_counts()
  return {}
end

local function add_count(c, key, field, delta)
  local h = c[key]
  if not h then
    h = {}
    c[key] = h
  end
  h[field] = (h[field] or 0) + delta
end

local function apply_counts(c, only)
  for key, h in pairs(c) do
    if only == nil or key == only then
      for field, delta in pairs(h) do
        if delta < 0 then
          if redis.call('HINCRBY', key, field, int(delta)) <= 0 then
            redis.call('HDEL', key, field)
          end
        elseif delta > 0 then
          redis.call('HINCRBY', key, field, int(delta))
        end
      end
      c[key] = {}
    end
  end
end

-- Index changes are gathered per key over a script call and sent as one command per key (a
-- bulk call touches a handful of keys thousands of times). unpack() fails beyond a few
-- thousand values: long argument lists go in even-sized chunks.
local CHUNK = 4000

local function chunked(cmd, key, args)
  local n = #args
  for i = 1, n, CHUNK do
    local j = i + CHUNK - 1
    if j > n then
      j = n
    end
    redis.call(cmd, key, unpack(args, i, j))
  end
end

-- Run body (a bulk script's per-job work), then finish (the index and counter writes it gathered)
-- even when body stops half way on an error: the jobs it got through are left consistent (their
-- leases indexed for the rescuer, their counts right). The error is then raised again.
local function batched(body, finish)
  local ok, err = pcall(body)
  finish()
  if not ok then
    error(err, 0)
  end
end

-- A sorted set starts out as a listpack, where every insert scans and moves the whole list,
-- until it passes zset-max-listpack-entries (128 by default). Adding many members at once to a
-- new or small set (leases and running jobs after an idle spell, a drained queue) is far cheaper
-- once it is a skiplist: a member too long for a listpack converts it, and goes again at once.
-- Sets that would become skiplists anyway (more than `over` members added) are only spared the
-- listpack phase; the few global indexes of running and finished jobs convert from 64 on.
local SKIPLIST_MEMBER = '~ durably: a placeholder that makes this sorted set a skiplist, '
  .. 'removed by the same script'

local function zadd_bulk(key, args, over)
  local forced = false
  if #args > 2 * over and redis.call('OBJECT', 'ENCODING', key) ~= 'skiplist' then
    redis.call('ZADD', key, 0, SKIPLIST_MEMBER)
    forced = true
  end
  chunked('ZADD', key, args)
  if forced then
    redis.call('ZREM', key, SKIPLIST_MEMBER)
  end
end

-- One token per job woken for, at most 16: a blocked BLPOP returns at once; spare tokens only
-- cause spurious wake-ups, which the protocol allows.
local function wake_n(queue, n)
  if n > 16 then
    n = 16
  end
  local tokens = {}
  for i = 1, n do
    tokens[i] = '1'
  end
  local wk = P .. ':wake:' .. queue
  redis.call('LPUSH', wk, unpack(tokens))
  redis.call('LTRIM', wk, 0, 15)
end

local function wake(queue)
  wake_n(queue, 1)
end

local function bump(jk, now)
  redis.call('HINCRBY', jk, 'version', 1)
  redis.call('HSET', jk, 'updated_at', int(now))
end

-- The id of the live job holding key, or nil.
local function live_holder(key)
  local id = redis.call('HGET', P .. ':keys', key)
  if id == false then
    return nil
  end
  local status = redis.call('HGET', jkey(id), 'status')
  if status and LIVE[status] then
    return id
  end
  redis.call('HDEL', P .. ':keys', key)
  return nil
end

-- The job's fields as one JSON object of strings: far cheaper for the client to parse than a
-- nested HGETALL reply.
local function snapshot(id)
  local flat = redis.call('HGETALL', jkey(id))
  local fields = {}
  for i = 1, #flat, 2 do
    fields[flat[i]] = flat[i + 1]
  end
  return cjson.encode(fields)
end

-- Free the idempotency key if this job holds it (the job is leaving the live statuses).
local function drop_key(jk, id)
  local key = hget(jk, 'key')
  if key and redis.call('HGET', P .. ':keys', key) == tostring(id) then
    redis.call('HDEL', P .. ':keys', key)
  end
end

-- Insert a new pending job (upsert.lua; enqueue.lua does the same in bulk). spec.f holds its
-- string fields (queue, handler, payload, ...), spec.delay the microseconds until it is due.
local function create_job(spec, now)
  local f = spec.f
  local id = tostring(redis.call('INCR', P .. ':seq'))
  local run_at = now + spec.delay
  local fields = {
    'id', id, 'status', 'pending', 'attempts', '0', 'version', '1',
    'run_at', int(run_at), 'created_at', int(now), 'updated_at', int(now),
  }
  for name, value in pairs(f) do
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  redis.call('HSET', jkey(id), unpack(fields))
  redis.call('ZADD', P .. ':all', id, pad(id))
  move_status(id, f.queue, nil, 'pending')
  redis.call('ZADD', P .. ':due:' .. f.queue, int(run_at), pad(id))
  if f.key then
    redis.call('HSET', P .. ':keys', f.key, id)
    redis.call('ZADD', P .. ':key:' .. f.key, id, pad(id))
  end
  if f.batch_id then
    redis.call('ZADD', P .. ':batch:' .. f.batch_id, id, pad(id))
  end
  wake(f.queue)
  return id
end

-- Append an outbox event. data is what Python builds the payload from at delivery: the job's
-- fields after the change ('processed') or the batch's counts ('batch'), so the payload is
-- exactly durably.events.processed_payload / batch_payload of that state.
local function add_event(job_id, etype, kind, data, now)
  local eid = tostring(redis.call('INCR', P .. ':evseq'))
  local fields = {
    'id', eid, 'type', etype, 'kind', kind, 'data', data, 'created_at', int(now),
    'next_attempt_at', int(now), 'attempts', '0',
  }
  if job_id then
    fields[#fields + 1] = 'job_id'
    fields[#fields + 1] = job_id
    redis.call('ZADD', P .. ':jobevents:' .. job_id, eid, pad(eid))
  end
  redis.call('HSET', P .. ':event:' .. eid, unpack(fields))
  redis.call('ZADD', P .. ':events', eid, pad(eid))
end

-- The events a change owes (call after the change and its version bump): '<scope>.processed'
-- when the job reached an event status, and '<scope>.batch_completed' when it left the live
-- statuses as the last live job of its batch. Jobs without an event scope emit nothing.
local function emit(id, before, now)
  local jk = jkey(id)
  local row = redis.call('HMGET', jk, 'status', 'event_scope', 'batch_id', 'updated_at')
  if not EVENT_STATUSES[row[1]] or not row[2] then
    return
  end
  add_event(id, row[2] .. '.processed', 'processed', snapshot(id), now)
  if row[3] and LIVE[before] then
    local counts = {}
    local live = 0
    local raw = redis.call('HGETALL', P .. ':batchcounts:' .. row[3])
    for i = 1, #raw, 2 do
      local n = tonumber(raw[i + 1])
      counts[raw[i]] = n
      if LIVE[raw[i]] then
        live = live + n
      end
    end
    if live == 0 then
      local data = cjson.encode({batch_id = row[3], counts = counts, at = row[4]})
      add_event(nil, row[2] .. '.batch_completed', 'batch', data, now)
    end
  end
end
