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

-- One token per wake-up, capped: a blocked BLPOP returns at once; spare tokens only cause
-- spurious wake-ups, which the protocol allows.
local function wake(queue)
  local wk = P .. ':wake:' .. queue
  redis.call('LPUSH', wk, '1')
  redis.call('LTRIM', wk, 0, 15)
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

-- Insert a new pending job. spec.f holds its string fields (queue, handler, payload, ...),
-- spec.delay the microseconds until it is due.
local function create_job(spec, now)
  local f = spec.f
  local id = tostring(redis.call('INCR', P .. ':seq'))
  local run_at = now + spec.delay
  local fields = {
    'id', id, 'status', 'pending', 'attempts', '0', 'version', '1', 'cancel_requested', '0',
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
