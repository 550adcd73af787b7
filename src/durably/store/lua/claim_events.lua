-- Lease up to limit due, unleased (or lease-expired) events, oldest id first, never one whose
-- job still has an older undelivered event (per-job order).
-- ARGV: now, limit, lease_us, then limit lease tokens. Returns the HGETALL of each event.
local now = now_us(ARGV[1])
local limit = tonumber(ARGV[2])
local expires = now + tonumber(ARGV[3])
local out = {}
for _, member in ipairs(redis.call('ZRANGE', P .. ':events', 0, -1)) do
  if #out >= limit then
    break
  end
  local ek = P .. ':event:' .. tostring(tonumber(member))
  local row = redis.call('HMGET', ek, 'job_id', 'next_attempt_at', 'lease_expires_at')
  local first = true
  if row[1] then
    first = redis.call('ZRANGE', P .. ':jobevents:' .. row[1], 0, 0)[1] == member
  end
  local free = (not row[3]) or tonumber(row[3]) < now
  if first and free and row[2] and tonumber(row[2]) <= now then
    redis.call('HSET', ek, 'lease_token', ARGV[3 + #out + 1], 'lease_expires_at', int(expires))
    redis.call('HINCRBY', ek, 'attempts', 1)
    out[#out + 1] = redis.call('HGETALL', ek)
  end
end
return out
