-- Hand back claimed jobs that never started, as if never claimed (fenced by lease token).
-- ARGV: now, then (id, token) pairs. Returns how many were released.
local now = now_us(ARGV[1])
local released = 0
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local jk = jkey(id)
  local row = redis.call('HMGET', jk, 'status', 'lease_token', 'queue', 'attempts', 'run_at')
  if row[1] == 'running' and row[2] == ARGV[i + 1] then
    local queue = row[3]
    -- The protocol's rule, as every store applies it: no attempt left on record -> pending.
    local left = tonumber(row[4]) - 1
    local back = 'retrying'
    if left == 0 then
      back = 'pending'
      redis.call('HDEL', jk, 'first_attempt_at')
    end
    redis.call('ZREM', P .. ':leases', pad(id))
    redis.call('HDEL', jk, 'lease_token', 'lease_expires_at', 'worker_id')
    redis.call('HSET', jk, 'attempts', int(left))
    redis.call('RPOP', jk .. ':attempts')
    add_waiting(back, queue, row[5], pad(id))
    move_status(id, queue, 'running', back)
    bump(jk, now)
    wake(queue)
    released = released + 1
  end
end
return released
