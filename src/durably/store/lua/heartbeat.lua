-- Extend the leases still held (running under that token).
-- ARGV: now, lease_us, then (id, token) pairs. Returns {renewed ids, cancel-requested ids}.
local now = now_us(ARGV[1])
local snow = int(now)
local expires = int(now + tonumber(ARGV[2]))
local leases = {}
local renewed = {}
local cancel = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local jk = jkey(id)
  local row = redis.call('HMGET', jk, 'status', 'lease_token', 'cancel_requested', 'version')
  if row[1] == 'running' and row[2] == ARGV[i + 1] then
    redis.call('HSET', jk, 'lease_expires_at', expires, 'version', int(tonumber(row[4]) + 1),
      'updated_at', snow)
    leases[#leases + 1] = expires
    leases[#leases + 1] = pad(id)
    renewed[#renewed + 1] = id
    if row[3] == '1' then
      cancel[#cancel + 1] = id
    end
  end
end
zadd_bulk(P .. ':leases', leases, 64)
return {renewed, cancel}
