-- Remove a model handle and its index entries atomically.
-- KEYS[1] handle hash, KEYS[2] set of all handles; ARGV[1] model_id, ARGV[2] key prefix.
-- Returns the owner's name, or false if the handle did not exist.
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return false end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', ARGV[2] .. 'worker:' .. owner .. ':handles', ARGV[1])
return owner
