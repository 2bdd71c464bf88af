-- write.lua: writes one account's fields, each only if it supersedes the
-- field stored, by the rules of cache.Merge on the encoded form (see
-- writeScript in scripts.go). Returns the number of fields stored.
local hash_key = KEYS[1]       -- the account's hash (Tier.Key)
local claim_key = KEYS[2]      -- the account's claim marker (Tier.claimKey)
local key_ttl_ms = ARGV[1]     -- how long the hash lives after this write
local skew = tonumber(ARGV[2]) -- the clock skew, ms
local neg = ARGV[3]            -- the encoded negative entry to store, or ''
local mode = ARGV[4]           -- MODE_MERGE, MODE_RELEASE or MODE_EXISTING
local FIRST_PAIR = 5           -- ARGV[5], ARGV[6], ...: field, encoded value

-- The encoding (codec.go) and the record model's names (cache); the
-- layout test checks every value against Go's.
local FIELD_HEAD = 13          -- layout: fieldHead, the bytes before the deadlines
local VER_AT = 2               -- layout: fieldVer + 1
local EVENT_AT = 8             -- layout: fieldEvent + 1
local VER_LEN = 6              -- layout: verLen, a version's width
local NEG_VER_AT = 1           -- layout: negVer + 1
local ORIGIN_UNIT = 2          -- layout: 1 << originShift, the flags of one Origin
local ORIGIN_FETCH = 0         -- layout: cache.FromFetch
local ORIGIN_SET = 1           -- layout: cache.FromSet
local ORIGIN_CALLBACK = 2      -- layout: cache.FromCallback
local ORIGIN_INVALIDATE = 3    -- layout: cache.FromInvalidate
local NEG_FIELD = '!'          -- layout: negField
local MARKER_STD = '!s'        -- layout: cache.MarkerStandard
local MARKER_CUSTOM = '!c'     -- layout: cache.MarkerCustom
local STD_FIELD_LEN = 1        -- layout: the length of a standard tag's field name
local MODE_RELEASE = '1'       -- layout: writeRelease
local MODE_EXISTING = '2'      -- layout: writeExisting

local function be48(s, i)
  local v = 0
  for k = i, i + VER_LEN - 1 do v = v * 256 + string.byte(s, k) end
  return v
end
local existing = mode == MODE_EXISTING
local function origin(s) return math.floor(string.byte(s, 1) / ORIGIN_UNIT) end
-- cache's supersedes
local function supersedes(u, o)
  if not o or #o < FIELD_HEAD then return true end
  local uo, oo = origin(u), origin(o)
  local uv, ov = be48(u, VER_AT), be48(o, VER_AT)
  if uo == ORIGIN_FETCH then
    if oo == ORIGIN_FETCH then return uv >= ov end
    return uv - skew >= ov
  elseif uo == ORIGIN_SET or uo == ORIGIN_INVALIDATE then
    return uv >= ov
  end
  local ue, oe = be48(u, EVENT_AT), be48(o, EVENT_AT)
  if oo == ORIGIN_CALLBACK then return ue >= oe end
  return ue > oe and ue + skew > ov
end
-- the class entry of field f's tag class; nil for an entry itself
local function classEntry(f)
  if f == NEG_FIELD or f == MARKER_STD or f == MARKER_CUSTOM then return nil end
  if #f == STD_FIELD_LEN then return MARKER_STD end
  return MARKER_CUSTOM
end
-- the value's bytes: past the head and the two deadlines (uvarints)
local function body(s)
  local i = FIELD_HEAD + 1
  for _ = 1, 2 do
    while (string.byte(s, i) or 0) >= 128 do i = i + 1 end
    i = i + 1
  end
  return string.sub(s, i)
end
-- the same callback again
local function again(u, o)
  return o and #o >= FIELD_HEAD and origin(u) == ORIGIN_CALLBACK and string.sub(u, 1, 1) == string.sub(o, 1, 1)
    and string.sub(u, EVENT_AT, FIELD_HEAD) == string.sub(o, EVENT_AT, FIELD_HEAD) and body(u) == body(o)
end
local hash = nil
local function entryFits(f, u)
  if f ~= MARKER_STD and f ~= MARKER_CUSTOM then return true end
  hash = hash or redis.call('HGETALL', hash_key)
  for i = 1, #hash, 2 do
    if classEntry(hash[i]) == f and not supersedes(u, hash[i + 1]) then return false end
  end
  return true
end
local fields = {}
for i = FIRST_PAIR, #ARGV, 2 do fields[#fields + 1] = ARGV[i] end
local n = 0
if #fields > 0 then
  local olds = redis.call('HMGET', hash_key, unpack(fields))
  local negOld = redis.call('HGET', hash_key, NEG_FIELD)
  local negVer = nil
  if negOld and #negOld >= VER_LEN then negVer = be48(negOld, NEG_VER_AT) end
  local set = {}
  for j = 1, #fields do
    local u, o = ARGV[FIRST_PAIR - 1 + 2 * j], olds[j]
    local uo = origin(u)
    local early = negVer and uo ~= ORIGIN_INVALIDATE and (uo == ORIGIN_CALLBACK and be48(u, EVENT_AT) or be48(u, VER_AT)) < negVer -- changedAt
    if not early and (o or not existing) and supersedes(u, o) and not again(u, o) and entryFits(fields[j], u) then
      if o and #o >= FIELD_HEAD and origin(u) ~= ORIGIN_CALLBACK and be48(o, EVENT_AT) > be48(u, EVENT_AT) then
        -- keep the newest EventTime seen
        u = string.sub(u, 1, EVENT_AT - 1) .. string.sub(o, EVENT_AT, FIELD_HEAD) .. string.sub(u, FIELD_HEAD + 1)
      end
      set[#set + 1] = fields[j]
      set[#set + 1] = u
    end
  end
  if #set > 0 then
    redis.call('HSET', hash_key, unpack(set))
    redis.call('HDEL', hash_key, NEG_FIELD)
    n = #set / 2
    for _, m in ipairs({MARKER_STD, MARKER_CUSTOM}) do
      local e = redis.call('HGET', hash_key, m)
      if e then
        for k = 1, #set, 2 do
          if classEntry(set[k]) == m and (#e < FIELD_HEAD or not supersedes(e, set[k + 1])) then
            redis.call('HDEL', hash_key, m)
            break
          end
        end
      end
    end
  end
end
if neg ~= '' then
  local old = redis.call('HGET', hash_key, NEG_FIELD)
  local ok = not old or #old < VER_LEN or be48(neg, NEG_VER_AT) >= be48(old, NEG_VER_AT)
  if ok then
    -- the head of a fetched field as old as neg: what neg must supersede
    local probe = string.char(ORIGIN_FETCH * ORIGIN_UNIT) .. string.sub(neg, NEG_VER_AT, NEG_VER_AT + VER_LEN - 1) .. string.rep(string.char(0), VER_LEN)
    local all = redis.call('HGETALL', hash_key)
    local drop = {}
    for i = 1, #all, 2 do
      if all[i] ~= NEG_FIELD then
        if not supersedes(probe, all[i + 1]) then ok = false break end
        drop[#drop + 1] = all[i]
      end
    end
    if ok and #drop > 0 then redis.call('HDEL', hash_key, unpack(drop)) end
  end
  if ok then
    redis.call('HSET', hash_key, NEG_FIELD, neg)
    n = n + 1
  end
end
if not existing then redis.call('PEXPIRE', hash_key, key_ttl_ms) end
if mode == MODE_RELEASE then redis.call('DEL', claim_key) end
return n
