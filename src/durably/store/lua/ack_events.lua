-- Delete delivered events, fenced by their lease token.
-- ARGV: (event id, token) pairs. Returns how many were deleted.
local deleted = 0
for i = 1, #ARGV, 2 do
  local ek = P .. ':event:' .. ARGV[i]
  local row = redis.call('HMGET', ek, 'lease_token', 'job_id')
  if row[1] and row[1] == ARGV[i + 1] then
    redis.call('DEL', ek)
    redis.call('ZREM', P .. ':events', pad(ARGV[i]))
    if row[2] then
      redis.call('ZREM', P .. ':jobevents:' .. row[2], pad(ARGV[i]))
    end
    deleted = deleted + 1
  end
end
return deleted
