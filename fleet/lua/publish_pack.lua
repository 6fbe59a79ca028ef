-- Record a newly published pack on an existing handle: last_pack and used_at.
-- KEYS[1] handle hash; ARGV[1] PackRef JSON, ARGV[2] timestamp.
-- Returns the handle's generation, or false if the handle does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'last_pack', ARGV[1], 'used_at', ARGV[2])
return tonumber(redis.call('HGET', KEYS[1], 'generation'))
