-- Claim up to limit due jobs under fresh leases, oldest run_at first (ties by id).
-- ARGV: now, worker_id, limit, lease_us, batch_id ('' for any), due_only ('1'/'0'),
--       number of queues, the queues, then limit lease tokens.
-- Returns each claimed job as JSON.
local now = now_us(ARGV[1])
local worker = ARGV[2]
local limit = tonumber(ARGV[3])
local lease_us = tonumber(ARGV[4])
local batch = ARGV[5]
local due_only = ARGV[6] == '1'
local nq = tonumber(ARGV[7])
local queues = {}
for i = 1, nq do
  queues[ARGV[7 + i]] = true
end
local token_base = 7 + nq

local candidates = {}
if batch == '' then
  for queue in pairs(queues) do
    local due = redis.call('ZRANGEBYSCORE', P .. ':due:' .. queue, '-inf', int(now),
      'WITHSCORES', 'LIMIT', 0, limit)
    for i = 1, #due, 2 do
      candidates[#candidates + 1] = {tonumber(due[i + 1]), due[i], queue}
    end
  end
else
  for _, member in ipairs(redis.call('ZRANGE', P .. ':batch:' .. batch, 0, -1)) do
    local jk = jkey(tonumber(member))
    local row = redis.call('HMGET', jk, 'status', 'queue', 'run_at')
    if (row[1] == 'pending' or row[1] == 'retrying') and queues[row[2]] then
      local run_at = tonumber(row[3])
      if (not due_only) or run_at <= now then
        candidates[#candidates + 1] = {run_at, member, row[2]}
      end
    end
  end
end
table.sort(candidates, function(a, b)
  if a[1] ~= b[1] then
    return a[1] < b[1]
  end
  return a[2] < b[2]
end)

local out = {}
for _, c in ipairs(candidates) do
  if #out >= limit then
    break
  end
  local id = tostring(tonumber(c[2]))
  local jk = jkey(id)
  local status = redis.call('HGET', jk, 'status')
  if status == 'pending' or status == 'retrying' then
    local queue = c[3]
    redis.call('ZREM', P .. ':due:' .. queue, c[2])
    move_status(id, queue, status, 'running')
    redis.call('HINCRBY', jk, 'attempts', 1)
    if redis.call('HEXISTS', jk, 'first_attempt_at') == 0 then
      redis.call('HSET', jk, 'first_attempt_at', int(now))
    end
    local expires = now + lease_us
    redis.call('HSET', jk, 'worker_id', worker, 'lease_token', ARGV[token_base + #out + 1],
      'lease_expires_at', int(expires), 'cancel_requested', '0')
    bump(jk, now)
    redis.call('ZADD', P .. ':leases', int(expires), c[2])
    -- Attempt rows are history: numbering continues after a requeue that reset attempts.
    local number = 1
    local last = redis.call('LINDEX', jk .. ':attempts', -1)
    if last then
      number = tonumber(cjson.decode(last).number) + 1
    end
    redis.call('RPUSH', jk .. ':attempts', cjson.encode({
      job_id = id, number = int(number), worker_id = worker, started_at = int(now),
    }))
    out[#out + 1] = snapshot(id)
  elseif batch == '' then
    -- Not waiting (should not happen): drop the stale entry so it cannot fill every window.
    redis.call('ZREM', P .. ':due:' .. c[3], c[2])
  end
end
return out
