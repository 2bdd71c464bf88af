-- acquire.lua: grants a permit when the window has room and the shared
-- spacing allows, first come, first served across replicas (see
-- acquireScript in shared.go). Returns {1, 0, f·1000} for a grant, else
-- {0, µs to wait, f·1000} (wait -1: every slot is in flight, poll).
local window_key = KEYS[1] -- permits: in flight (grant time + hold) or answered (answer time), ms
local pause_key = KEYS[2]  -- set while every replica pauses after throttling
local next_key = KEYS[3]   -- the theoretical time of the next grant, µs
local cut_key = KEYS[4]    -- the last throttling cut: f (the factor) and t (its time, ms)
local wait_key = KEYS[5]   -- waiting acquirers: member → when it first asked, µs
local seen_key = KEYS[6]   -- waiting acquirers: member → when it last asked, ms
local held_key = KEYS[7]   -- slots reserved for waiters: member → 1
local quota = tonumber(ARGV[1])       -- calls per window at the full rate
local span = tonumber(ARGV[2])        -- the window, ms
local hold = tonumber(ARGV[3])        -- how long a permit may stay in flight, ms
local me = ARGV[4]                    -- this acquirer's member
local interval_us = tonumber(ARGV[5]) -- the spacing of grants at the full rate, µs
local recover = tonumber(ARGV[6])     -- how much of the rate a cut climbs back per second
local staleMs = tonumber(ARGV[7])     -- a waiter that stops asking this long is forgotten

local t = redis.call('TIME')
local nowus = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(nowus / 1000)
-- factor: begin (f, the part of the rate in force, and cutAt; the same
-- in acquire.lua and throttle.lua, which a test checks)
local f, cutAt = 1, nil
local cut = redis.call('HMGET', cut_key, 'f', 't')
if cut[1] then
  cutAt = tonumber(cut[2])
  f = math.min(1, tonumber(cut[1]) + (now - cutAt) * recover / 1000)
end
-- factor: end
local fk = math.floor(f * 1000)
if redis.call('HDEL', held_key, me) == 1 then
  redis.call('ZREM', wait_key, me)
  redis.call('ZREM', seen_key, me)
  return {1, 0, fk}
end
local gone = redis.call('ZRANGEBYSCORE', seen_key, '-inf', now - staleMs)
for _, m in ipairs(gone) do
  redis.call('ZREM', wait_key, m)
  redis.call('ZREM', seen_key, m)
  if redis.call('HDEL', held_key, m) == 1 then redis.call('ZREM', window_key, m) end
end
local function wait(us)
  redis.call('ZADD', wait_key, 'NX', nowus, me)
  redis.call('ZADD', seen_key, now, me)
  redis.call('PEXPIRE', wait_key, staleMs + 1000)
  redis.call('PEXPIRE', seen_key, staleMs + 1000)
  return {0, us, fk}
end
local interval = interval_us / f
quota = math.max(1, math.floor(quota * f))
local pause = redis.call('PTTL', pause_key)
if pause > 0 then return wait(pause * 1000) end
redis.call('ZREMRANGEBYSCORE', window_key, '-inf', now - span)
local n = redis.call('ZCARD', window_key)
if n < quota then
  local tat = tonumber(redis.call('GET', next_key) or '0')
  if tat - interval > nowus then return wait(tat - interval - nowus) end
  local taker = me
  local head = redis.call('ZRANGE', wait_key, 0, 0)[1]
  if head and head ~= me then taker = head end
  redis.call('ZADD', window_key, now + hold, taker)
  redis.call('PEXPIRE', window_key, span + hold + 1000)
  redis.call('SET', next_key, string.format('%.0f', math.max(tat, nowus) + interval), 'PX', 1000 + math.ceil(2 * interval / 1000))
  redis.call('ZREM', wait_key, taker)
  if taker == me then
    redis.call('ZREM', seen_key, me)
    return {1, 0, fk}
  end
  redis.call('HSET', held_key, taker, '1')
  redis.call('PEXPIRE', held_key, staleMs + 1000)
  return wait(interval)
end
local first = redis.call('ZRANGE', window_key, 0, 0, 'WITHSCORES')
local s = tonumber(first[2])
if s > now then return wait(-1) end
local w = s + span - now
if f < 1 then w = math.min(w, 100) end -- the rate climbs back: look again
return wait(w * 1000)
