-- Apply attempt endings, fenced by lease token (and, for the rescuer, by lease expiry).
-- ARGV: now, then per completion one argument
--   '<id> <index member> <token> <outcome: s|r|d|c>'
--   [.. ' <retry_us> <require_expired: 0|1> <has_result: 0|1> <n>', unless all are 0]
--   .. '\n' .. the attempt row's ending as JSON members ('"outcome":...,"duration":...')
--   [.. '\n' .. result JSON], followed by n (field code, value) argument pairs setting
--   classification ('c'), last_error ('m') or last_error_type ('t').
-- Returns 1 (applied) or 0 per completion.
local now = now_us(ARGV[1])
local snow = int(now)
local NEXT = {s = 'succeeded', r = 'retrying', d = 'dead_letter', c = 'cancelled'}
local FIELD = {c = 'classification', m = 'last_error', t = 'last_error_type'}
local ERROR_FIELDS = {'classification', 'last_error', 'last_error_type'}
local NO_FIELDS = {}
local counts = new_counts()
local out = {}
-- Index changes, gathered per key and applied at the end.
local leases = {}
local finished = {}
local entered = {}
local per_queue = {}

local function queue_keys(queue)
  local q = per_queue[queue]
  if not q then
    q = {waiting = {}, ended = {}}
    per_queue[queue] = q
  end
  return q
end

batched(function()
  local a = 2
  local nargs = #ARGV
  while a <= nargs do
    local spec = ARGV[a]
    local id, member, token, code, at = string.match(spec, '^(%-?%d+) (%S+) (%S*) (%a)()')
    local retry_us, require_expired, has_result, n = '0', '0', '0', 0
    if string.byte(spec, at) == 32 then
      retry_us, require_expired, has_result, n, at = string.match(spec,
        '^ (%d+) ([01]) ([01]) (%d+)()', at)
      n = tonumber(n)
    end
    local sets = NO_FIELDS
    if n > 0 then
      sets = {}
      for i = 1, n do
        sets[FIELD[ARGV[a + 2 * i - 1]]] = ARGV[a + 2 * i]
      end
    end
    a = a + 1 + 2 * n
    local jk = P .. ':job:' .. id
    local row = redis.call('HMGET', jk, 'status', 'lease_token', 'queue', 'version', 'key',
      'event_scope', 'batch_id', 'attempts')
    local applied = row[1] == 'running' and row[2] == token
    if applied and require_expired == '1' then
      applied = tonumber(redis.call('HGET', jk, 'lease_expires_at')) < now
    end
    local target = NEXT[code]
    if applied and target then
      local ending_at = at + 1
      local ending
      local result = nil
      if has_result == '1' then
        local nl = string.find(spec, '\n', ending_at, true)
        ending = string.sub(spec, ending_at, nl - 1)
        result = string.sub(spec, nl + 1)
      else
        ending = string.sub(spec, ending_at)
      end
      local q = queue_keys(row[3])
      -- cancel_requested is dropped rather than set to '0': a missing flag reads as not set.
      local hset = {'status', target, 'updated_at', snow, 'version', int(tonumber(row[4]) + 1)}
      local hdel = {'lease_token', 'lease_expires_at', 'worker_id', 'cancel_requested'}
      -- Only a completion writes result and the error fields, and a job's first attempt since
      -- it was (re)queued follows none (requeue clears them, release gives the attempt back):
      -- then there is nothing to delete, and deleting a missing field scans the whole hash.
      local first = row[8] == '1'
      if result then
        hset[7] = 'result'
        hset[8] = result
      elseif not first then
        hdel[5] = 'result'
      end
      for _, field in ipairs(ERROR_FIELDS) do
        local value = target ~= 'succeeded' and sets[field]
        if value then
          hset[#hset + 1] = field
          hset[#hset + 1] = value
        elseif not first then
          hdel[#hdel + 1] = field
        end
      end
      if target == 'retrying' then
        local run_at = int(now + tonumber(retry_us))
        hset[#hset + 1] = 'run_at'
        hset[#hset + 1] = run_at
        local w = q.waiting
        w[#w + 1] = run_at
        w[#w + 1] = member
      else
        hset[#hset + 1] = 'finished_at'
        hset[#hset + 1] = snow
        finished[#finished + 1] = snow
        finished[#finished + 1] = member
        if row[5] and redis.call('HGET', P .. ':keys', row[5]) == id then
          redis.call('HDEL', P .. ':keys', row[5])
        end
      end
      redis.call('HDEL', jk, unpack(hdel))
      redis.call('HSET', jk, unpack(hset))
      leases[#leases + 1] = member
      local e = entered[target]
      if not e then
        e = {}
        entered[target] = e
      end
      e[#e + 1] = id
      e[#e + 1] = member
      q.ended[target] = (q.ended[target] or 0) + 1
      if row[7] then
        local bkey = P .. ':batchcounts:' .. row[7]
        add_count(counts, bkey, 'running', -1)
        add_count(counts, bkey, target, 1)
        if row[6] then
          -- emit() judges the batch's completion from its counts: bring them up to date.
          apply_counts(counts, bkey)
        end
      end
      if row[6] then
        emit(id, 'running', now)
      end

      -- Finish the open attempt row: the newest one, unless history was written otherwise.
      -- A JSON string never holds an unescaped quote, so '"finished_at"' only matches the key.
      -- (Indexes as strings: Redis formats a Lua number argument with snprintf.)
      local ak = jk .. ':attempts'
      local idx = '-1'
      local entry = redis.call('LINDEX', ak, '-1')
      if entry and string.find(entry, '"finished_at"', 1, true) then
        entry = nil
        for i = redis.call('LLEN', ak) - 2, 0, -1 do
          local older = redis.call('LINDEX', ak, int(i))
          if not string.find(older, '"finished_at"', 1, true) then
            entry = older
            idx = int(i)
            break
          end
        end
      end
      if entry then
        redis.call('LSET', ak, idx, string.sub(entry, 1, -2) .. ',"finished_at":"' .. snow
          .. '",' .. ending .. '}')
      end
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
end, function()
  -- leases holds every job that ended: the running ones.
  chunked('ZREM', P .. ':leases', leases)
  chunked('ZREM', P .. ':status:running', leases)
  zadd_bulk(P .. ':finished', finished, 64)
  for target, members in pairs(entered) do
    zadd_bulk(P .. ':status:' .. target, members, 64)
  end
  for queue, q in pairs(per_queue) do
    local ended = 0
    for target, count in pairs(q.ended) do
      add_count(counts, P .. ':counts', target .. '|' .. queue, count)
      ended = ended + count
    end
    add_count(counts, P .. ':counts', 'running|' .. queue, -ended)
    if #q.waiting > 0 then
      -- In ':due:' like every waiting job, and in ':retry:' to be claimed first.
      zadd_bulk(P .. ':due:' .. queue, q.waiting, 64)
      zadd_bulk(P .. ':retry:' .. queue, q.waiting, 64)
      wake_n(queue, #q.waiting / 2)
    end
  end
  apply_counts(counts)
end)
return out
