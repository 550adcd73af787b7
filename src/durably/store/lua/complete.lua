-- Apply attempt endings, fenced by lease token (and, for the rescuer, by lease expiry).
-- ARGV: now, then one JSON spec per completion. Returns 1 (applied) or 0 per completion.
local now = now_us(ARGV[1])
local NEXT = {
  succeeded = 'succeeded', retry = 'retrying', dead_letter = 'dead_letter',
  cancelled = 'cancelled',
}
local out = {}
for i = 2, #ARGV do
  local c = cjson.decode(ARGV[i])
  local jk = jkey(c.id)
  local row = redis.call('HMGET', jk, 'status', 'lease_token', 'lease_expires_at', 'queue')
  local applied = row[1] == 'running' and row[2] == c.token
  if applied and c.require_expired then
    applied = tonumber(row[3]) < now
  end
  local target = NEXT[c.outcome]
  if applied and target then
    local id = tostring(c.id)
    local queue = row[4]
    redis.call('ZREM', P .. ':leases', pad(id))
    redis.call('HDEL', jk, 'lease_token', 'lease_expires_at', 'worker_id')
    redis.call('HSET', jk, 'cancel_requested', '0')
    set_or_del(jk, 'result', c.result)
    if target == 'succeeded' then
      redis.call('HDEL', jk, 'classification', 'last_error', 'last_error_type')
    else
      set_or_del(jk, 'classification', c.classification)
      set_or_del(jk, 'last_error', c.error_message)
      set_or_del(jk, 'last_error_type', c.error_type)
    end
    if target == 'retrying' then
      local run_at = now + c.retry_us
      redis.call('HSET', jk, 'run_at', int(run_at))
      redis.call('ZADD', P .. ':due:' .. queue, int(run_at), pad(id))
      wake(queue)
    else
      redis.call('HSET', jk, 'finished_at', int(now))
      redis.call('ZADD', P .. ':finished', int(now), pad(id))
      drop_key(jk, id)
    end
    move_status(id, queue, 'running', target)
    bump(jk, now)
    emit(id, 'running', now)

    -- Finish the open attempt row, searching from the newest.
    local ak = jk .. ':attempts'
    local n = redis.call('LLEN', ak)
    for idx = n - 1, 0, -1 do
      local entry = cjson.decode(redis.call('LINDEX', ak, idx))
      if entry.finished_at == nil then
        entry.finished_at = int(now)
        entry.outcome = c.attempt_outcome
        entry.classification = c.attempt_classification
        entry.error_type = c.error_type
        entry.error_message = c.error_message
        entry.duration = c.duration
        redis.call('LSET', ak, idx, cjson.encode(entry))
        break
      end
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
