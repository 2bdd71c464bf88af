-- release.lua: ends a permit (see releaseScript in shared.go).
local window_key = KEYS[1] -- acquire.lua's window
local wait_key = KEYS[2]   -- acquire.lua's waiting acquirers (first asked)
local seen_key = KEYS[3]   -- acquire.lua's waiting acquirers (last asked)
local held_key = KEYS[4]   -- acquire.lua's slots reserved for waiters
local member = ARGV[1]     -- the permit
local called = ARGV[2]     -- '1': the call was made; '0': the permit is given up

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if called == '1' then
  redis.call('ZADD', window_key, 'XX', now, member)
else
  redis.call('ZREM', window_key, member)
  redis.call('ZREM', wait_key, member)
  redis.call('ZREM', seen_key, member)
  redis.call('HDEL', held_key, member)
end
return 1
