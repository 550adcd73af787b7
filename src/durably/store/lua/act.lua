-- Apply one operator action with its audit entry.
-- ARGV: now, JSON request {id, action, target, sources, expected_version, actor, notes, reset}.
-- Returns {'ok', the job as JSON} or {'notfound'}, {'conflict', version}, {'invalid', status},
-- {'keytaken', holder id}.
local now = now_us(ARGV[1])
local r = cjson.decode(ARGV[2])
local id = tostring(r.id)
local jk = jkey(id)
local row = redis.call('HMGET', jk, 'status', 'version', 'queue', 'key')
local status = row[1]
if not status then
  return {'notfound'}
end
if r.expected_version and tonumber(row[2]) ~= r.expected_version then
  return {'conflict', row[2]}
end
local queue = row[3]
local target = r.target

if r.action == 'cancel' and status == 'running' then
  -- The worker stops at its next heartbeat; the job keeps running until then.
  target = 'running'
  redis.call('HSET', jk, 'cancel_requested', '1')
else
  local allowed = false
  for _, source in ipairs(r.sources) do
    if source == status then
      allowed = true
    end
  end
  if not allowed then
    return {'invalid', status}
  end
  if r.action == 'requeue' then
    local key = row[4]
    if key then
      local holder = live_holder(key)
      if holder and holder ~= tostring(id) then
        return {'keytaken', holder}
      end
      redis.call('HSET', P .. ':keys', key, id)
    end
    redis.call('HDEL', jk, 'classification', 'last_error', 'last_error_type', 'result',
      'first_attempt_at', 'finished_at', 'operator', 'operator_notes')
    redis.call('HSET', jk, 'run_at', int(now), 'cancel_requested', '0')
    if r.reset then
      redis.call('HSET', jk, 'attempts', '0')
    end
    redis.call('ZREM', P .. ':finished', pad(id))
    unwait(pad(id), queue)
    redis.call('ZADD', P .. ':due:' .. queue, int(now), pad(id))
    wake(queue)
  else
    unwait(pad(id), queue)
    redis.call('HSET', jk, 'finished_at', int(now), 'operator', r.actor)
    set_or_del(jk, 'operator_notes', r.notes)
    redis.call('ZADD', P .. ':finished', int(now), pad(id))
    drop_key(jk, id)
  end
  move_status(id, queue, status, target)
end
bump(jk, now)
if target ~= status then
  emit(id, status, now)
end
redis.call('RPUSH', jk .. ':audit', cjson.encode({
  job_id = tostring(id), at = int(now), actor = r.actor, action = r.action,
  from_status = status, to_status = target, version = redis.call('HGET', jk, 'version'),
  notes = r.notes,
}))
return {'ok', snapshot(id)}
