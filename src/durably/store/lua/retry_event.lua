-- Release a failed delivery, due again after retry_us; fenced by lease token.
-- ARGV: now, event id, token, retry_us, error. Returns 1 if released, else 0.
local now = now_us(ARGV[1])
local ek = P .. ':event:' .. ARGV[2]
local token = redis.call('HGET', ek, 'lease_token')
if not token or token ~= ARGV[3] then
  return 0
end
redis.call('HDEL', ek, 'lease_token', 'lease_expires_at')
redis.call('HSET', ek, 'next_attempt_at', int(now + tonumber(ARGV[4])), 'last_error', ARGV[5])
return 1
