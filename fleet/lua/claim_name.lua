-- Claim, renew or release a worker name (its GPU or CPU slot on a node).
-- KEYS[1] the name's claim key; ARGV[1] op ("claim", "take", "renew", "release"),
-- ARGV[2] claim JSON {pid, host, ...}, ARGV[3] TTL in ms, ARGV[4] the claim the caller
-- expects to find (for "take": a stale claim of a dead process), ARGV[5] our pid.
-- claim: SET NX; returns "" on success, else the current claim.
-- take: replaces the claim only if it is still ARGV[4]; returns "" or the current one.
-- renew / release: only while the claim holds our pid; returns 1, or 0 if it is lost.
local op = ARGV[1]
local current = redis.call('GET', KEYS[1])
if op == 'claim' then
  if current then return current end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return ''
elseif op == 'take' then
  if current and current ~= ARGV[4] then return current end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return ''
end
if not current then return 0 end
if tostring(cjson.decode(current)['pid']) ~= ARGV[5] then return 0 end
if op == 'renew' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
