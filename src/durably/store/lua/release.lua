-- Hand back claimed jobs that never started, as if never claimed (fenced by lease token).
-- ARGV: now, then (id, token) pairs. Returns how many were released.
local now = now_us(ARGV[1])
local released = 0
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local jk = jkey(id)
  local row = redis.call('HMGET', jk, 'status', 'lease_token', 'queue', 'claimed_from',
    'claim_set_first', 'run_at')
  if row[1] == 'running' and row[2] == ARGV[i + 1] then
    local queue = row[3]
    local back = row[4] or 'pending'
    redis.call('ZREM', P .. ':leases', pad(id))
    redis.call('HDEL', jk, 'lease_token', 'lease_expires_at', 'worker_id', 'claimed_from',
      'claim_set_first')
    if row[5] == '1' then
      redis.call('HDEL', jk, 'first_attempt_at')
    end
    redis.call('HINCRBY', jk, 'attempts', -1)
    redis.call('RPOP', jk .. ':attempts')
    redis.call('ZADD', P .. ':due:' .. queue, row[6], pad(id))
    move_status(id, queue, 'running', back)
    bump(jk, now)
    wake(queue)
    released = released + 1
  end
end
return released
