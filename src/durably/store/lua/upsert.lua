-- Enqueue by key, or replace the live job's content (payload, meta, policy fields, queue,
-- handler, event scope) while it waits; a running job is returned unchanged.
-- ARGV: now, JSON spec (see enqueue.lua). Returns {created (0/1), the job as JSON}.
local now = now_us(ARGV[1])
local spec = cjson.decode(ARGV[2])
local holder = live_holder(spec.f.key)
if not holder then
  local id = create_job(spec, now)
  return {1, snapshot(id)}
end
local jk = jkey(holder)
local row = redis.call('HMGET', jk, 'status', 'queue', 'run_at')
local status = row[1]
if status == 'pending' or status == 'retrying' then
  for _, field in ipairs({'payload', 'meta', 'policy', 'max_attempts', 'timeout', 'event_scope',
                          'handler'}) do
    set_or_del(jk, field, spec.f[field])
  end
  local queue = spec.f.queue
  if queue ~= row[2] then
    unwait(pad(holder), row[2])
    move_status(holder, row[2], status, nil)
    redis.call('HSET', jk, 'queue', queue)
    move_status(holder, queue, nil, status)
    add_waiting(status, queue, row[3], pad(holder))
  end
  bump(jk, now)
  wake(queue)
end
return {0, snapshot(holder)}
