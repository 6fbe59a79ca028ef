-- Deregister a worker: drop its handles, its liveness key and its record atomically.
-- KEYS[1] worker hash, KEYS[2] worker handles set, KEYS[3] alive key,
-- KEYS[4] set of all handles, KEYS[5] set of workers, KEYS[6] worker workloads set;
-- ARGV[1] key prefix, ARGV[2] worker name. Returns the released model_ids.
local ids = redis.call('SMEMBERS', KEYS[2])
for _, id in ipairs(ids) do
  redis.call('DEL', ARGV[1] .. 'handle:' .. id)
  redis.call('SREM', KEYS[4], id)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[6])
redis.call('SREM', KEYS[5], ARGV[2])
return ids
