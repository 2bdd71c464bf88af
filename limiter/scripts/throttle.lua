-- throttle.lua: pauses every replica and cuts the shared rate after a
-- throttling answer (see throttleScript in shared.go). Returns the
-- factor·1000 now in force. Its keys are acquire.lua's.
local pause_key = KEYS[2] -- set while every replica pauses
local cut_key = KEYS[4]   -- the last cut: f (the factor) and t (its time, ms)
local pause_ms = ARGV[1]                  -- how long to pause
local cut_every_ms = tonumber(ARGV[2])    -- no new cut within this of the last one
local cut_factor = tonumber(ARGV[3])      -- a cut multiplies the factor by this
local min_factor = tonumber(ARGV[4])      -- but not below this
local recover = tonumber(ARGV[5])         -- how much of the rate a cut climbs back per second

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('PTTL', pause_key) < tonumber(pause_ms) then
  redis.call('SET', pause_key, '1', 'PX', pause_ms)
end
-- factor: begin (f, the part of the rate in force, and cutAt; the same
-- in acquire.lua and throttle.lua, which a test checks)
local f, cutAt = 1, nil
local cut = redis.call('HMGET', cut_key, 'f', 't')
if cut[1] then
  cutAt = tonumber(cut[2])
  f = math.min(1, tonumber(cut[1]) + (now - cutAt) * recover / 1000)
end
-- factor: end
if cutAt == nil or now - cutAt >= cut_every_ms then
  f = math.max(min_factor, f * cut_factor)
  redis.call('HSET', cut_key, 'f', string.format('%.6f', f), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', cut_key, math.ceil((1 - f) / recover * 1000) + 1000)
end
return math.floor(f * 1000)
