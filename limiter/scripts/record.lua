-- record.lua: adds calls made while Redis was unreachable to the window
-- (see recordScript in shared.go).
local window_key = KEYS[1]      -- acquire.lua's window
local hold = tonumber(ARGV[1])  -- how long a permit may stay in flight, ms
local span = tonumber(ARGV[2])  -- the window, ms
local FIRST_CALL = 3            -- ARGV[3], ARGV[4], ...: member, age in ms (-1: in flight)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = FIRST_CALL, #ARGV, 2 do
  local age = tonumber(ARGV[i+1])
  local score = now + hold
  if age >= 0 then score = now - age end
  redis.call('ZADD', window_key, score, ARGV[i])
end
redis.call('PEXPIRE', window_key, span + hold + 1000)
return 1
