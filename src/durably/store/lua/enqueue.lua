-- Insert jobs in order; a job whose key has a live job returns that job instead.
-- ARGV: now, the number of templates, then 9 values per template (what its jobs share): queue,
--   handler, policy, meta, delay_us, max_attempts, timeout, '=' .. batch_id, '=' .. event_scope
--   ('' when unset); then runs of consecutive jobs of one template: a header
--   'template,count,has_keys,has_items' (template numbered from 1), the count payloads joined by
--   '\n' (JSON text never holds a raw newline), one key per job if has_keys, and the item indexes
--   joined by ',' if has_items.
-- Returns {now, the id of the first job created (the others follow in order), {position, the
-- job as JSON} for every job that was not created (position numbered from 1)}.
local now = now_us(ARGV[1])
local snow = int(now)
local templates = {}
local a = 3
local OPTIONAL_FIELDS = {
  {2, 'policy', '{}'}, {3, 'meta', '{}'}, {5, 'max_attempts', ''}, {6, 'timeout', ''},
}
for t = 1, tonumber(ARGV[2]) do
  local queue = ARGV[a]
  local run_at = int(now + tonumber(ARGV[a + 4]))
  -- Every field costs each later lookup in the job's hash: an empty policy or meta and an unset
  -- cancel_requested are left out, which reads back the same.
  local f = {
    'status', 'pending', 'attempts', '0', 'version', '1', 'queue', queue,
    'run_at', run_at, 'created_at', snow, 'updated_at', snow, 'handler', ARGV[a + 1],
  }
  -- Optional fields: {offset of the value, field, the value that means unset}.
  for _, optional in ipairs(OPTIONAL_FIELDS) do
    local value = ARGV[a + optional[1]]
    if value ~= optional[3] then
      f[#f + 1] = optional[2]
      f[#f + 1] = value
    end
  end
  local batch = nil
  if ARGV[a + 7] ~= '' then
    batch = string.sub(ARGV[a + 7], 2)
    f[#f + 1] = 'batch_id'
    f[#f + 1] = batch
  end
  if ARGV[a + 8] ~= '' then
    f[#f + 1] = 'event_scope'
    f[#f + 1] = string.sub(ARGV[a + 8], 2)
  end
  templates[t] = {
    f = f, queue = queue, run_at = run_at, batch = batch, count = 0,
    due = {}, batch_members = {},
  }
  a = a + 9
end

local seq = P .. ':seq'
-- Ids are taken from the counter before the jobs are written, so that a script stopped half
-- way (an error) can never hand out an id twice: a run of keyless jobs takes its block at once.
local last_id = tonumber(redis.call('GET', seq) or '0')
local first = last_id + 1
local members = {}
local found = {}
local position = 0
local nargs = #ARGV
-- The per-job loop below runs thousands of times per call, all on Redis's one core: it keeps its
-- library functions in locals, counts its table lengths instead of taking #t (a search each time),
-- and pads ids with a lookup instead of a second format (pad()).
local call, find, sub, format = redis.call, string.find, string.sub, string.format
local job_prefix = P .. ':job:'
local zeros = {}
for len = 1, 20 do
  zeros[len] = string.rep('0', 16 - len)
end
local nm = 0
batched(function()
  while a <= nargs do
    local t, n, has_keys, has_items = string.match(ARGV[a], '^(%d+),(%d+),(%d),(%d)$')
    local tpl = templates[tonumber(t)]
    local f = tpl.f
    local due = tpl.due
    local nd = #due
    n = tonumber(n)
    local payloads = ARGV[a + 1]
    a = a + 2
    local keys_at = nil
    if has_keys == '1' then
      keys_at = a - 1
      a = a + n
    end
    local items = nil
    if has_items == '1' then
      items = ARGV[a]
      a = a + 1
    end
    if not keys_at then
      redis.call('INCRBY', seq, n)
    end
    local pos = 1
    local item_pos = 1
    local run_at = tpl.run_at
    local bm = tpl.batch_members
    local nb = #bm
    for j = 1, n do
      position = position + 1
      local payload
      local nl = find(payloads, '\n', pos, true)
      if nl then
        payload = sub(payloads, pos, nl - 1)
        pos = nl + 1
      elseif pos == 1 then
        payload = payloads
      else
        payload = sub(payloads, pos)
      end
      local item = nil
      if items then
        local comma = find(items, ',', item_pos, true)
        if comma then
          item = sub(items, item_pos, comma - 1)
          item_pos = comma + 1
        else
          item = sub(items, item_pos)
        end
      end
      local key = keys_at and ARGV[keys_at + j]
      local holder = key and live_holder(key)
      if holder then
        found[#found + 1] = position
        found[#found + 1] = snapshot(holder)
      else
        if keys_at then
          call('INCR', seq)
        end
        last_id = last_id + 1
        local id = format('%d', last_id)
        local member = zeros[#id] .. id
        local jk = job_prefix .. id
        if key and item then
          call('HSET', jk, 'id', id, 'payload', payload, 'key', key, 'item_index', item, unpack(f))
        elseif key then
          call('HSET', jk, 'id', id, 'payload', payload, 'key', key, unpack(f))
        elseif item then
          call('HSET', jk, 'id', id, 'payload', payload, 'item_index', item, unpack(f))
        else
          call('HSET', jk, 'id', id, 'payload', payload, unpack(f))
        end
        nm = nm + 2
        members[nm - 1] = id
        members[nm] = member
        nd = nd + 2
        due[nd - 1] = run_at
        due[nd] = member
        tpl.count = tpl.count + 1
        if tpl.batch then
          nb = nb + 2
          bm[nb - 1] = id
          bm[nb] = member
        end
        if key then
          -- At once, not batched: a later job of this call with the same key must find it.
          call('HSET', P .. ':keys', key, id)
          call('ZADD', P .. ':key:' .. key, id, member)
        end
      end
    end
  end
end, function()
  if #members > 0 then
    zadd_bulk(P .. ':all', members, 128)
    zadd_bulk(P .. ':status:pending', members, 128)
    local counts = new_counts()
    local wakes = {}
    for _, tpl in ipairs(templates) do
      if tpl.count > 0 then
        zadd_bulk(P .. ':due:' .. tpl.queue, tpl.due, 128)
        add_count(counts, P .. ':counts', 'pending|' .. tpl.queue, tpl.count)
        if tpl.batch then
          zadd_bulk(P .. ':batch:' .. tpl.batch, tpl.batch_members, 128)
          add_count(counts, P .. ':batchcounts:' .. tpl.batch, 'pending', tpl.count)
        end
        wakes[tpl.queue] = (wakes[tpl.queue] or 0) + tpl.count
      end
    end
    apply_counts(counts)
    for queue, count in pairs(wakes) do
      wake_n(queue, count)
    end
  end
end)
return {snow, first, found}
