-- Bring the namespace to schema ARGV[1] unless it is already there or newer.
-- ARGV: target version, dry_run ('1' or '0'). Returns {current, applied (0/1)}.
local target = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', P .. ':schema') or '0')
if current > target or ARGV[2] == '1' then
  return {current, current < target and 1 or 0}
end
if current < target then
  redis.call('SET', P .. ':schema', int(target))
end
-- A compatible layout step within schema 1 ({p}:layout records it): due retries are also indexed
-- in ':retry:<queue>' (see add_waiting). Index the retrying jobs an older durably left.
if redis.call('GET', P .. ':layout') ~= 'retry-sets' then
  for _, member in ipairs(redis.call('ZRANGE', P .. ':status:retrying', 0, -1)) do
    local queue = redis.call('HGET', jkey(tonumber(member)), 'queue')
    if queue then
      local run_at = redis.call('ZSCORE', P .. ':due:' .. queue, member)
      if run_at then
        redis.call('ZADD', P .. ':retry:' .. queue, run_at, member)
      end
    end
  end
  redis.call('SET', P .. ':layout', 'retry-sets')
end
return {current, current < target and 1 or 0}
