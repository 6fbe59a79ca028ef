-- Claim, renew or release a job's owner lease; the fencing token is a counter.
-- KEYS[1] owner key (JSON, with a TTL), KEYS[2] fencing counter;
-- ARGV[1] op ("claim", "renew", "release"), ARGV[2] owner JSON (host, pid, times),
-- ARGV[3] TTL in ms, ARGV[4] the caller's token (renew, release).
-- claim: if a live owner holds the lease, returns {0, its JSON}; else increments the
--   counter and returns {token, ""}.
-- renew / release: only while the counter still equals the caller's token (no newer
--   owner took over): returns {token, ""} (renew sets the lease again, even after it
--   expired while Redis was away), else {0, ""}.
local op = ARGV[1]
if op == 'claim' then
  local current = redis.call('GET', KEYS[1])
  if current then return {0, current} end
  local token = redis.call('INCR', KEYS[2])
  local owner = cjson.decode(ARGV[2])
  owner['token'] = token
  redis.call('SET', KEYS[1], cjson.encode(owner), 'PX', ARGV[3])
  return {token, ''}
end
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if fence ~= tonumber(ARGV[4]) then return {0, ''} end
if op == 'renew' then
  local owner = cjson.decode(ARGV[2])
  owner['token'] = fence
  redis.call('SET', KEYS[1], cjson.encode(owner), 'PX', ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return {fence, ''}
