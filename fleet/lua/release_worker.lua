-- Deregister a worker: drop its handles, its liveness key and its record atomically.
-- KEYS[1] worker hash, KEYS[2] worker handles set, KEYS[3] alive key,
-- KEYS[4] set of all handles, KEYS[5] set of workers, KEYS[6] worker workloads set,
-- KEYS[7..] the hash of every handle the caller read from KEYS[2];
-- ARGV[1] worker name, ARGV[2..] those handles' model_ids (same order as KEYS[7..]).
-- Returns the released model_ids, or -1 if the handle set changed since the caller
-- read it (the caller retries).
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
if redis.call('SCARD', KEYS[2]) ~= #ids then return -1 end
for i, id in ipairs(ids) do
  if redis.call('SISMEMBER', KEYS[2], id) == 0 then return -1 end
  redis.call('DEL', KEYS[6 + i])
  redis.call('SREM', KEYS[4], id)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[6])
redis.call('SREM', KEYS[5], ARGV[1])
return ids
