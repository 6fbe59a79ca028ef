-- Set used_at (and optionally bump the generation) on an existing handle.
-- KEYS[1] handle hash; ARGV[1] timestamp, ARGV[2] "1" to bump the generation.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'used_at', ARGV[1])
if ARGV[2] == '1' then return redis.call('HINCRBY', KEYS[1], 'generation', 1) end
return tonumber(redis.call('HGET', KEYS[1], 'generation'))
