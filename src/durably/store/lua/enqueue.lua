-- Insert jobs in order; a job whose key has a live job returns that job instead.
-- ARGV: now, then one JSON spec per job ({"f": {...}, "delay": us}).
-- Returns, per job, {created (0/1), the job as JSON (see snapshot)}.
local now = now_us(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local spec = cjson.decode(ARGV[i])
  local holder = nil
  if spec.f.key then
    holder = live_holder(spec.f.key)
  end
  if holder then
    out[#out + 1] = {0, snapshot(holder)}
  else
    local id = create_job(spec, now)
    out[#out + 1] = {1, snapshot(id)}
  end
end
return out
