-- Renew a worker's liveness, if its record exists.
-- KEYS[1] worker hash, KEYS[2] alive key; ARGV[1] pid, ARGV[2] TTL in ms, ARGV[3] now.
-- Returns 1, or 0 when the record is gone (Redis lost it): the worker registers again.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[3])
return 1
