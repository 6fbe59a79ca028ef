-- Remove a model handle and its index entries atomically.
-- KEYS[1] handle hash, KEYS[2] set of all handles, KEYS[3] the owner's handle set;
-- ARGV[1] model_id, ARGV[2] the owner the caller read.
-- Returns the owner's name, false if the handle does not exist, or "" if its owner
-- changed since the caller read it (the caller retries with the new owner's set).
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return false end
if owner ~= ARGV[2] then return '' end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return owner
