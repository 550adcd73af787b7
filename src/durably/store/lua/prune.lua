-- Delete up to limit jobs (with attempts and audit) in the given statuses finished before
-- now - older_than.
-- ARGV: now, older_than_us, limit, then the statuses. Returns {deleted, more (0/1)}.
local now = now_us(ARGV[1])
local cutoff = now - tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local statuses = {}
for i = 4, #ARGV do
  statuses[ARGV[i]] = true
end
local deleted = 0
local more = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', P .. ':finished', '-inf', '(' .. int(cutoff))) do
  local id = tostring(tonumber(member))
  local jk = jkey(id)
  local row = redis.call('HMGET', jk, 'status', 'queue', 'key', 'batch_id')
  if not row[1] then
    redis.call('ZREM', P .. ':finished', member)
  elseif statuses[row[1]] then
    if deleted >= limit then
      more = 1
      break
    end
    drop_key(jk, id)
    move_status(id, row[2], row[1], nil)
    redis.call('ZREM', P .. ':finished', member)
    redis.call('ZREM', P .. ':all', member)
    unwait(member, row[2])
    redis.call('ZREM', P .. ':leases', member)
    if row[3] then
      redis.call('ZREM', P .. ':key:' .. row[3], member)
    end
    if row[4] then
      redis.call('ZREM', P .. ':batch:' .. row[4], member)
    end
    redis.call('DEL', jk, jk .. ':attempts', jk .. ':audit')
    deleted = deleted + 1
  end
end
return {deleted, more}
