-- Bring the namespace to schema ARGV[1] unless it is already there or newer.
-- ARGV: target version, dry_run ('1' or '0'). Returns {current, applied (0/1)}.
local target = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', P .. ':schema') or '0')
if current >= target then
  return {current, 0}
end
if ARGV[2] ~= '1' then
  redis.call('SET', P .. ':schema', int(target))
end
return {current, 1}
