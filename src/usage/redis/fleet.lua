-- Fleets in Redis: the link graph every replica shares (src/usage/redis/fleet.rs).
--
-- Every key is under one hash tag, BASE = "<prefix>{f}", so the script may touch any of them
-- (KEYS[1] is BASE .. "gen": BASE is taken from it, so a cluster routes the call to the slot of
-- every key it touches). Keys:
--   gen, genseq, building   the current generation, the last one numbered, the one being rebuilt
--   newest, built, rules    newest event time seen, when the current generation was built, its rules
--   epoch                   when the graph was started (TIME), so writers see a Redis that lost it
--   gens                    set: the generations that have keys (a failed rebuild's are swept)
--   index, refused          set: the link keys (l:...) held, for the cap and the rebuild; what the
--                           caps refused
--   lock                    the rebuilder's lock
--   l:KIND:VALUE            zset account -> last time seen with that value (capped, TTL = window)
--   t:ACCOUNT               zset template -> last time the account sent it (4 at most)
--   G:A                     hash account -> "first,last,top,hi,lo": the minutes it was active
--                           as 64 bits, bit j (of lo, or of hi for j >= 32) for minute top - j
--   G:p                     hash account -> parent (absent at a root)
--   G:r                     hash root -> "size,kinds,founder_first,founder" (absent: a singleton)
--   G:m:ROOT, G:L:ROOT      sets: the members of a component, the link keys that joined it
--   G:c:ROOT                its coordination facts, "minute,size,kinds,active,coactive,expected"
--   G:k:ROOT                set: the founders the fleet had before (of fleets that merged into
--                           it, its own before an earlier member turned up): its former ids
-- where G is a generation number. Union-find cannot split a component, so expiry is a rebuild
-- into a new generation (fleet.rs); while one is built, writes go to both.

local mode = ARGV[1]
local base = string.sub(KEYS[1], 1, -4)
if ARGV[2] ~= base then
  return redis.error_reply('fleet script: KEYS[1] is not BASE .. "gen"')
end
local MAX_MEMBERS = 256
local TEMPLATES = 4
local TEMPLATE_KIND = 5

local function generation(g, from)
  if not g then
    return nil
  end
  local p = base .. g .. ':'
  return { id = g, a = p .. 'A', p = p .. 'p', r = p .. 'r', m = p .. 'm:', l = p .. 'L:',
           c = p .. 'c:', k = p .. 'k:', from = from }
end

-- Whether account id a sorts before b, byte by byte as Rust compares them (Lua's `<` follows
-- the server's locale).
local function less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a < #b
end

-- Whether (first, account) is earlier than (ff, f): the founder is the earliest member, then
-- the smaller account id.
local function earlier(first, account, ff, f)
  return first < ff or (first == ff and less(account, f))
end

local function numbers(text)
  local out = {}
  for n in string.gmatch(text, '-?%d+') do
    out[#out + 1] = tonumber(n)
  end
  return out
end

-- An account's activity ("first,last,top,hi,lo"); nil when it is not one.
local function activity(v)
  local f, l, t, h, o = string.match(v, '^(-?%d+),(-?%d+),(-?%d+),(-?%d+),(-?%d+)$')
  if not f then
    return nil
  end
  return tonumber(f), tonumber(l), tonumber(t), tonumber(h), tonumber(o)
end

-- The 64 bits (hi, lo) of minutes moved on by d minutes (bit j becomes bit j + d).
local function shift(hi, lo, d)
  if d <= 0 then
    return hi, lo
  end
  if d >= 64 then
    return 0, 0
  end
  if d >= 32 then
    return bit.lshift(lo, d - 32), 0
  end
  return bit.bor(bit.lshift(hi, d), bit.rshift(lo, 32 - d)), bit.lshift(lo, d)
end

local function find(g, x, compress)
  local path = {}
  local parent = redis.call('HGET', g.p, x)
  while parent do
    path[#path + 1] = x
    x = parent
    parent = redis.call('HGET', g.p, x)
  end
  if compress then
    for i = 1, #path - 1 do
      redis.call('HSET', g.p, path[i], x)
    end
  end
  return x
end

local function info(g, root)
  local v = redis.call('HGET', g.r, root)
  if v then
    local size, kinds, ff, f = string.match(v, '^(%d+),(%d+),(-?%d+),(.*)$')
    return { size = tonumber(size), kinds = tonumber(kinds), ff = tonumber(ff), f = f }
  end
  local a = redis.call('HGET', g.a, root)
  return { size = 1, kinds = 0, ff = a and activity(a) or 0, f = root }
end

local function save(g, root, i)
  redis.call('HSET', g.r, root, i.size .. ',' .. i.kinds .. ',' .. i.ff .. ',' .. i.f)
end

-- Moves the members of set `from` into set `to`: O(|from|), so union by size stays cheap.
local function move(from, to, ttl)
  local items = redis.call('SMEMBERS', from)
  for i = 1, #items, 1000 do
    redis.call('SADD', to, unpack(items, i, math.min(i + 999, #items)))
  end
  redis.call('DEL', from)
  if ttl then
    redis.call('PEXPIRE', to, ttl)
  end
end

-- Adds `founder` to root's former founders (not its current one).
local function formerly(g, root, founder, current, ttl)
  if founder ~= current then
    redis.call('SADD', g.k .. root, founder)
    redis.call('PEXPIRE', g.k .. root, ttl)
  end
end

-- `track`: whether the ids the two fleets had are kept (a rebuild's own merges are not fleets
-- anyone saw: it carries the old ids over instead).
local function union(g, x, y, kind_bit, link, ttl, track)
  local rx, ry = find(g, x, true), find(g, y, true)
  local ix = info(g, rx)
  if rx == ry then
    ix.kinds = bit.bor(ix.kinds, kind_bit)
    save(g, rx, ix)
    redis.call('SADD', g.l .. rx, link)
    redis.call('PEXPIRE', g.l .. rx, ttl)
    return
  end
  local iy = info(g, ry)
  local big, small, ib, is = rx, ry, ix, iy
  if iy.size > ix.size then
    big, small, ib, is = ry, rx, iy, ix
  end
  redis.call('HSET', g.p, small, big)
  redis.call('HDEL', g.r, small)
  if ib.size == 1 then
    redis.call('SADD', g.m .. big, big)
  end
  if is.size == 1 then
    redis.call('SADD', g.m .. big, small)
  else
    move(g.m .. small, g.m .. big)
  end
  redis.call('PEXPIRE', g.m .. big, ttl)
  move(g.l .. small, g.l .. big)
  redis.call('SADD', g.l .. big, link)
  redis.call('PEXPIRE', g.l .. big, ttl)
  -- The founder: first seen, then the smaller account id, whatever order events came in.
  local lost = nil
  if earlier(is.ff, is.f, ib.ff, ib.f) then
    if ib.size >= 2 then
      lost = ib.f
    end
    ib.ff, ib.f = is.ff, is.f
  elseif is.size >= 2 then
    lost = is.f
  end
  -- The ids both fleets had stay the merged fleet's former ids.
  if redis.call('EXISTS', g.k .. small) == 1 then
    move(g.k .. small, g.k .. big, ttl)
  end
  if track and lost then
    formerly(g, big, lost, ib.f, ttl)
  end
  redis.call('SREM', g.k .. big, ib.f)
  ib.size = ib.size + is.size
  ib.kinds = bit.bor(ib.kinds, is.kinds, kind_bit)
  save(g, big, ib)
end

-- Whether `account` is in generation g; a generation being built takes it from the current one.
local function present(g, account)
  if redis.call('HEXISTS', g.a, account) == 1 then
    return true
  end
  if g.from then
    local v = redis.call('HGET', g.from.a, account)
    if v then
      redis.call('HSET', g.a, account, v)
      return true
    end
  end
  return false
end

local function touch(g, account, first, last, top, hi, lo, max_accounts, ttl, track)
  local v = redis.call('HGET', g.a, account)
  if not v and g.from then
    v = redis.call('HGET', g.from.a, account)
  end
  if not v and redis.call('HLEN', g.a) >= max_accounts then
    redis.call('INCR', base .. 'refused')
    return false
  end
  local f, l, t, h, o = first, last, top, hi, lo
  local was = nil
  if v then
    local vf, vl, vt, vh, vo = activity(v)
    if vf then
      was = vf
      f, l, t = math.min(vf, first), math.max(vl, last), math.max(vt, top)
      local ah, ao = shift(vh, vo, t - vt)
      local bh, bo = shift(hi, lo, t - top)
      h, o = bit.bor(ah, bh), bit.bor(ao, bo)
    end
  end
  redis.call('HSET', g.a, account, f .. ',' .. l .. ',' .. t .. ',' .. bit.tobit(h) .. ',' .. bit.tobit(o))
  if was and f < was then
    -- Earlier than it was: the fleet's founder is its earliest member, whatever order events
    -- came in.
    local root = find(g, account, true)
    local i = info(g, root)
    if i.size >= 2 and earlier(f, account, i.ff, i.f) then
      -- The fleet's id changes with its founder: the old one is kept as a former id.
      if track then
        formerly(g, root, i.f, account, ttl)
      end
      redis.call('SREM', g.k .. root, account)
      i.ff, i.f = f, account
      save(g, root, i)
    end
  end
  return true
end

if mode == 'write' then
  -- ARGV: ttl_ms, max_accounts, max_links, batch_newest, mins (6, 0 = does not link),
  -- windows (6, seconds), then per account: account, first, last, top, hi, lo (its activity, as
  -- G:A holds it), k, k × (kind, value, t).
  local ttl, max_accounts, max_links = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local newest = math.max(tonumber(ARGV[6]), tonumber(redis.call('GET', base .. 'newest') or ARGV[6]))
  redis.call('SET', base .. 'newest', newest)
  local mins, windows = numbers(ARGV[7]), numbers(ARGV[8])
  local current = redis.call('GET', base .. 'gen')
  if not current then
    current = tostring(redis.call('INCR', base .. 'genseq'))
    redis.call('SET', base .. 'gen', current)
    redis.call('SADD', base .. 'gens', current)
    redis.call('SET', base .. 'built', newest)
    redis.call('SET', base .. 'rules', ARGV[7])
    local time = redis.call('TIME')
    redis.call('SET', base .. 'epoch', time[1] .. '.' .. time[2])
  end
  local g = generation(current)
  local gens = { g }
  local building = redis.call('GET', base .. 'building')
  if building and building ~= current then
    gens[2] = generation(building, g)
  end
  local i = 9
  while i <= #ARGV do
    local account, first, last = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    local top, hi, lo = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
    i = i + 6
    local here = {}
    for _, gen in ipairs(gens) do
      if touch(gen, account, first, last, top, hi, lo, max_accounts, ttl, gen == g) then
        here[#here + 1] = gen
      end
    end
    local k = tonumber(ARGV[i])
    i = i + 1
    if here[1] ~= g then
      -- Refused by the cap: its link values are not taken either (as in-process).
      i = i + 3 * k
      k = 0
    end
    for _ = 1, k do
      local kind, value, t = tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2])
      i = i + 3
      local key = base .. 'l:' .. kind .. ':' .. value
      local window = windows[kind + 1]
      local since = newest - window
      local min = mins[kind + 1]
      local old = redis.call('ZSCORE', key, account)
      local card = nil
      local fits = true
      if not old then
        card = redis.call('ZCARD', key)
        if card == 0 then
          if redis.call('SCARD', base .. 'index') >= max_links then
            redis.call('INCR', base .. 'refused')
            fits = false
          else
            redis.call('SADD', base .. 'index', key)
          end
        end
      end
      if fits then
        -- Accounts holding the value within its window, before this one (counted only for
        -- a kind that links, and only when there are any).
        local before = 0
        if min > 0 and card ~= 0 then
          before = redis.call('ZCOUNT', key, '(' .. since, '+inf')
        end
        local was_live = old and tonumber(old) > since
        redis.call('ZADD', key, 'GT', t, account)
        if card and card >= MAX_MEMBERS then
          redis.call('ZREMRANGEBYRANK', key, 0, -MAX_MEMBERS - 1)
        end
        redis.call('PEXPIRE', key, window * 1000)
        if kind == TEMPLATE_KIND then
          local own = base .. 't:' .. account
          redis.call('ZADD', own, 'GT', t, value)
          redis.call('ZREMRANGEBYRANK', own, 0, -TEMPLATES - 1)
          redis.call('PEXPIRE', own, window * 1000)
        end
        local after = before
        if not was_live and t > since then
          after = after + 1
        end
        if min > 0 and after >= min then
          -- A value that just became strong enough links everyone who shares it; after
          -- that, one other member is enough.
          local others
          if before < min then
            others = redis.call('ZRANGEBYSCORE', key, '(' .. since, '+inf')
          else
            others = redis.call('ZRANGEBYSCORE', key, '(' .. since, '+inf', 'LIMIT', 0, 2)
          end
          for _, gen in ipairs(here) do
            for _, other in ipairs(others) do
              if other ~= account and present(gen, other) then
                -- Only the current generation keeps the ids merges leave behind: components
                -- half built by a rebuild are not fleets anyone saw (the rebuild carries the
                -- current generation's ids over when it is done).
                union(gen, account, other, bit.lshift(1, kind), key, ttl, gen == g)
                if before >= min then
                  break
                end
              end
            end
          end
        end
      end
    end
  end
  for _, gen in ipairs(gens) do
    redis.call('PEXPIRE', gen.a, ttl)
    redis.call('PEXPIRE', gen.p, ttl)
    redis.call('PEXPIRE', gen.r, ttl)
  end
  redis.call('PEXPIRE', base .. 'index', ttl)
  -- The bookkeeping too: it outlives every key a write touches, so when it expires the graph
  -- has been idle that long and all of it is gone (a new epoch, as after a Redis that lost it).
  for _, key in ipairs({ 'newest', 'gen', 'genseq', 'gens', 'built', 'rules', 'epoch', 'refused' }) do
    redis.call('PEXPIRE', base .. key, ttl)
  end
  return { tostring(newest), redis.call('GET', base .. 'built') or '', redis.call('GET', base .. 'rules') or '',
           redis.call('GET', base .. 'epoch') or '' }
end

if mode == 'read' then
  -- ARGV: account, now, history_secs, max_members, window_minutes.
  -- Returns { template_accounts } or { template_accounts, size, kinds, founder, "active,coactive,expected" }.
  local account, now, history = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local max_members, window = tonumber(ARGV[6]), tonumber(ARGV[7])
  local templates = 0
  for _, value in ipairs(redis.call('ZRANGE', base .. 't:' .. account, 0, -1)) do
    local c = redis.call('ZCOUNT', base .. 'l:' .. TEMPLATE_KIND .. ':' .. value, '(' .. (now - history), '+inf')
    if c > templates then
      templates = c
    end
  end
  local g = generation(redis.call('GET', base .. 'gen'))
  if not g or redis.call('HEXISTS', g.a, account) == 0 then
    return { templates }
  end
  local root = find(g, account, false)
  local i = info(g, root)
  if i.size < 2 then
    return { templates }
  end
  local minute = math.floor(now / 60)
  local head = minute .. ',' .. i.size .. ',' .. i.kinds .. ','
  local cached = redis.call('GET', g.c .. root)
  if cached and string.sub(cached, 1, #head) == head then
    return { templates, i.size, i.kinds, i.f, string.sub(cached, #head + 1),
             redis.call('SMEMBERS', g.k .. root) }
  end
  -- Members active in the same minutes of the last hour, against chance; a fleet bigger
  -- than max_members is sampled.
  local members
  if i.size <= max_members then
    members = redis.call('SMEMBERS', g.m .. root)
  else
    members = redis.call('SRANDMEMBER', g.m .. root, max_members)
  end
  local per = {}
  for m = 1, window do
    per[m] = 0
  end
  local active, sum, squares = 0, 0, 0
  for c = 1, #members, 1000 do
    local acts = redis.call('HMGET', g.a, unpack(members, c, math.min(c + 999, #members)))
    for _, act in ipairs(acts) do
      if act then
        local _, _, t, h, o = activity(act)
        -- A member whose latest minute is after `now` counts as inactive (as in-process).
        if t and t <= minute and minute - t < 64 and (h ~= 0 or o ~= 0) then
          local s = minute - t
          local a = 0
          for age = s, window - 1 do
            local j = age - s
            local word = o
            if j >= 32 then
              word, j = h, j - 32
            end
            if bit.band(bit.rshift(word, j), 1) ~= 0 then
              a = a + 1
              per[age + 1] = per[age + 1] + 1
            end
          end
          if a > 0 then
            active, sum, squares = active + 1, sum + a, squares + a * a
          end
        end
      end
    end
  end
  local coactive = 0
  for m = 1, window do
    coactive = coactive + per[m] * (per[m] - 1) / 2
  end
  local facts = active .. ',' .. coactive .. ',' .. string.format('%.17g', (sum * sum - squares) / (2 * window))
  redis.call('SET', g.c .. root, head .. facts, 'PX', 120000)
  return { templates, i.size, i.kinds, i.f, facts, redis.call('SMEMBERS', g.k .. root) }
end

if mode == 'carry' then
  -- A rebuild's page of the old generation's fleets: ARGV: ttl_ms, old generation, new
  -- generation, roots... Each id (a fleet's founder, current or former) follows its founder
  -- into the new generation's component that holds it, if that is a fleet it does not found
  -- (not a fragment that split off without it).
  local ttl, old, g = tonumber(ARGV[3]), generation(ARGV[4]), generation(ARGV[5])
  for j = 6, #ARGV do
    local root = ARGV[j]
    local i = info(old, root)
    if i.size >= 2 then
      local ids = redis.call('SMEMBERS', old.k .. root)
      ids[#ids + 1] = i.f
      for _, id in ipairs(ids) do
        if redis.call('HEXISTS', g.a, id) == 1 then
          local to = find(g, id, true)
          local t = info(g, to)
          if t.size >= 2 then
            formerly(g, to, id, t.f, ttl)
          end
        end
      end
    end
  end
  return 1
end

if mode == 'union' then
  -- A rebuild's unions: ARGV: ttl_ms, generation, kind, link key, min, members...
  -- Members the new generation does not hold (idle) do not count.
  local ttl, g = tonumber(ARGV[3]), generation(ARGV[4])
  local kind, link, min = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
  local live = {}
  for j = 8, #ARGV do
    if redis.call('HEXISTS', g.a, ARGV[j]) == 1 then
      live[#live + 1] = ARGV[j]
    end
  end
  if #live < min then
    return 0
  end
  for j = 2, #live do
    union(g, live[1], live[j], bit.lshift(1, kind), link, ttl, false)
  end
  redis.call('PEXPIRE', g.p, ttl)
  redis.call('PEXPIRE', g.r, ttl)
  return #live
end

if mode == 'live' then
  -- A rebuild's page of link keys: ARGV: newest, then (key, window) pairs. Drops each key's
  -- members older than its window, and the key from the index once it is gone (in one call,
  -- so a writer cannot add the key again in between); returns each key's live members.
  local newest = tonumber(ARGV[3])
  local out = {}
  for j = 4, #ARGV, 2 do
    local key = ARGV[j]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', newest - tonumber(ARGV[j + 1]))
    local members = redis.call('ZRANGE', key, 0, -1)
    if #members == 0 then
      redis.call('SREM', base .. 'index', key)
    end
    out[#out + 1] = members
  end
  return out
end

if mode == 'flip' then
  -- ARGV: lock owner, new generation, built (event time), rules. The rebuilder still holds the lock.
  if redis.call('GET', base .. 'lock') ~= ARGV[3] then
    return 0
  end
  -- KEEPTTL: the writes gave these their TTL; a plain SET would take it away.
  redis.call('SET', base .. 'gen', ARGV[4], 'KEEPTTL')
  redis.call('DEL', base .. 'building')
  redis.call('SET', base .. 'built', ARGV[5], 'KEEPTTL')
  redis.call('SET', base .. 'rules', ARGV[6], 'KEEPTTL')
  redis.call('DEL', base .. 'lock')
  return 1
end

if mode == 'renew' then
  -- ARGV: lock owner, ms. A rebuild in progress keeps its lock, and the dual writes, alive.
  if redis.call('GET', base .. 'lock') ~= ARGV[3] then
    return 0
  end
  redis.call('PEXPIRE', base .. 'lock', ARGV[4])
  redis.call('PEXPIRE', base .. 'building', ARGV[4])
  return 1
end

if mode == 'abandon' then
  -- ARGV: lock owner. A failed rebuild: writes stop going to its generation (whose keys the
  -- rebuilder then deletes, or the next rebuild sweeps).
  if redis.call('GET', base .. 'lock') ~= ARGV[3] then
    return 0
  end
  redis.call('DEL', base .. 'building', base .. 'lock')
  return 1
end

return redis.error_reply('fleet script: unknown mode ' .. tostring(mode))
