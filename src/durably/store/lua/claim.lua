-- Claim up to limit due jobs under fresh leases: due retries first, then the other waiting jobs;
-- within each group oldest run_at first (ties by id).
-- ARGV: now, worker_id, limit, lease_us, batch_id ('' for any), due_only ('1'/'0'),
--       number of queues, the queues, then the lease tokens: limit tokens of 32 characters,
--       concatenated.
-- Returns {now, then each claimed job's fields as they were before the claim, as HGETALL returns
-- them (name, value, name, value, ...)}, in claim order; the k-th claimed job holds the k-th
-- token. (Returned as they are, the fields cost both sides less than as one JSON text.)
local now = now_us(ARGV[1])
local snow = int(now)
local worker = ARGV[2]
local limit = tonumber(ARGV[3])
local expires = int(now + tonumber(ARGV[4]))
local batch = ARGV[5]
local due_only = ARGV[6] == '1'
local nq = tonumber(ARGV[7])
local queues = {}
local queue_list = {}
for i = 1, nq do
  local queue = ARGV[7 + i]
  if not queues[queue] then
    queues[queue] = true
    queue_list[#queue_list + 1] = queue
  end
end
local tokens = ARGV[8 + nq]
-- Attempt rows are JSON objects built here by hand: the worker id is the only free text.
local row_mid = '","worker_id":' .. cjson.encode(worker) .. ',"started_at":"' .. snow .. '"}'

local counts = new_counts()
local out = {snow}
local claimed = 0
-- Index changes of the claimed jobs, gathered per key and applied at the end.
local leases = {}
local running = {}
local left = {pending = {}, retrying = {}}
local per_queue = {}

local function queue_keys(queue)
  local q = per_queue[queue]
  if not q then
    q = {
      due = P .. ':due:' .. queue, retry = P .. ':retry:' .. queue, from_due = {},
      from_retry = {}, pending = 0, retrying = 0,
    }
    per_queue[queue] = q
  end
  return q
end

-- A candidate: {member, queue, run_at}.
local function by_run_at_then_id(x, y)
  if x[3] ~= y[3] then
    return x[3] < y[3]
  end
  return x[1] < y[1]
end

-- The fields a claim reads, numbered for the row of values it picks out of a job's HGETALL.
local READ = {
  status = 1, attempts = 2, version = 3, run_at = 4, first_attempt_at = 5, cancel_requested = 6,
  batch_id = 7,
}

local function take(member, queue, from_retry)
  local q = queue_keys(queue)
  local id = string.match(member, '[1-9]%d*$')
  local jk = P .. ':job:' .. id
  -- The whole hash, read once: the claim needs a few fields and returns all of them.
  local flat = redis.call('HGETALL', jk)
  local row = {}
  for i = 1, #flat, 2 do
    local slot = READ[flat[i]]
    if slot then
      row[slot] = flat[i + 1]
    end
  end
  local status = row[1]
  if status ~= 'pending' and status ~= 'retrying' then
    if batch == '' then
      -- Not waiting (should not happen but for an older durably's changes): drop the stale
      -- entry so that it cannot fill every window.
      local stale = from_retry and q.from_retry or q.from_due
      stale[#stale + 1] = member
    end
    return
  end
  if from_retry and (status ~= 'retrying' or tonumber(row[4]) > now) then
    -- An older durably moved the job without this index: put it right, claim it when due.
    if status == 'retrying' then
      redis.call('ZADD', q.retry, row[4], member)
    else
      q.from_retry[#q.from_retry + 1] = member
    end
    return
  end
  claimed = claimed + 1
  local ak = jk .. ':attempts'
  -- Attempt rows are history: numbering continues after a requeue that reset attempts. Rows are
  -- numbered from 1 without gaps (release drops the newest), so the count is the last number.
  local number = int(redis.call('LLEN', ak) + 1)
  local token = string.sub(tokens, 32 * claimed - 31, 32 * claimed)
  local attempts = int(tonumber(row[2]) + 1)
  local version = int(tonumber(row[3]) + 1)
  -- RedisStore.claim applies these same changes to the returned fields.
  if row[5] then
    redis.call('HSET', jk, 'status', 'running', 'attempts', attempts, 'version', version,
      'updated_at', snow, 'worker_id', worker, 'lease_token', token, 'lease_expires_at', expires)
  else
    redis.call('HSET', jk, 'status', 'running', 'attempts', attempts, 'version', version,
      'updated_at', snow, 'worker_id', worker, 'lease_token', token, 'lease_expires_at', expires,
      'first_attempt_at', snow)
  end
  if row[6] == '1' then
    redis.call('HSET', jk, 'cancel_requested', '0')
  end
  -- The indexes first: should anything below fail, the job is still one the rescuer can find.
  local batch_id = row[7]
  q.from_due[#q.from_due + 1] = member
  if status == 'retrying' then
    q.from_retry[#q.from_retry + 1] = member
  end
  q[status] = q[status] + 1
  local n = #leases
  leases[n + 1] = expires
  leases[n + 2] = member
  running[n + 1] = id
  running[n + 2] = member
  local was = left[status]
  was[#was + 1] = member
  if batch_id then
    local bkey = P .. ':batchcounts:' .. batch_id
    add_count(counts, bkey, status, -1)
    add_count(counts, bkey, 'running', 1)
  end
  redis.call('RPUSH', ak, '{"job_id":"' .. id .. '","number":"' .. number .. row_mid)
  out[claimed + 1] = flat
end

local function take_all(candidates, from_retry)
  for _, c in ipairs(candidates) do
    if claimed >= limit then
      return
    end
    take(c[1], c[2], from_retry)
  end
end

-- Claim from the due window of one kind of waiting set across the queues, in order.
local function take_window(kind)
  local from_retry = kind == 'retry'
  if #queue_list == 1 then
    local queue = queue_list[1]
    local due = redis.call('ZRANGEBYSCORE', P .. ':' .. kind .. ':' .. queue, '-inf', snow,
      'LIMIT', 0, limit)
    for i = 1, #due do
      if claimed >= limit then
        return
      end
      take(due[i], queue, from_retry)
    end
    return
  end
  local candidates = {}
  for _, queue in ipairs(queue_list) do
    local due = redis.call('ZRANGEBYSCORE', P .. ':' .. kind .. ':' .. queue, '-inf', snow,
      'WITHSCORES', 'LIMIT', 0, limit)
    for i = 1, #due, 2 do
      candidates[#candidates + 1] = {due[i], queue, tonumber(due[i + 1])}
    end
  end
  table.sort(candidates, by_run_at_then_id)
  take_all(candidates, from_retry)
end

batched(function()
  if batch == '' then
    -- ':due:' holds every waiting job, retries included (see redis.py): a retry claimed from
    -- ':retry:' may show up again in the due window, as no longer waiting, and is skipped. The
    -- full window leaves room for them.
    take_window('retry')
    if claimed < limit then
      take_window('due')
    end
  else
    local retries = {}
    local fresh = {}
    for _, member in ipairs(redis.call('ZRANGE', P .. ':batch:' .. batch, 0, -1)) do
      local row = redis.call('HMGET', jkey(tonumber(member)), 'status', 'queue', 'run_at')
      if (row[1] == 'pending' or row[1] == 'retrying') and queues[row[2]] then
        local run_at = tonumber(row[3])
        if (not due_only) or run_at <= now then
          local group = fresh
          if row[1] == 'retrying' then
            group = retries
          end
          group[#group + 1] = {member, row[2], run_at}
        end
      end
    end
    table.sort(retries, by_run_at_then_id)
    table.sort(fresh, by_run_at_then_id)
    take_all(retries, false)
    take_all(fresh, false)
  end
end, function()
  for queue, q in pairs(per_queue) do
    chunked('ZREM', q.due, q.from_due)
    chunked('ZREM', q.retry, q.from_retry)
    for _, status in ipairs({'pending', 'retrying'}) do
      if q[status] > 0 then
        add_count(counts, P .. ':counts', status .. '|' .. queue, -q[status])
        add_count(counts, P .. ':counts', 'running|' .. queue, q[status])
      end
    end
  end
  for status, members in pairs(left) do
    chunked('ZREM', P .. ':status:' .. status, members)
  end
  zadd_bulk(P .. ':leases', leases, 64)
  zadd_bulk(P .. ':status:running', running, 64)
  apply_counts(counts)
end)
return out
