-- A write by a job's owner, checked against the fencing token atomically.
-- KEYS[1] fencing counter, KEYS[2] job state hash, KEYS[3] job metrics list,
-- KEYS[4] the job's record hash;
-- ARGV[1] the writer's token, ARGV[2] op:
--   "plan"   ARGV[3] the in-flight round's plan (JSON) -> state hash field "plan";
--   "state"  ARGV[3] the driver state (JSON) -> field "state";
--   "commit" ARGV[3] the driver state, ARGV[4] the round's record: sets the state,
--            appends the record, drops the plan, all at once;
--   "spec"   ARGV[3] the job's spec (JSON) -> the record's field "spec".
-- Returns the token, or -(current token) when a newer owner holds the job.
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
if fence ~= tonumber(ARGV[1]) then return -fence end
local op = ARGV[2]
if op == 'plan' then
  redis.call('HSET', KEYS[2], 'plan', ARGV[3])
elseif op == 'state' then
  redis.call('HSET', KEYS[2], 'state', ARGV[3])
elseif op == 'commit' then
  redis.call('HSET', KEYS[2], 'state', ARGV[3])
  redis.call('HDEL', KEYS[2], 'plan')
  redis.call('RPUSH', KEYS[3], ARGV[4])
elseif op == 'spec' then
  redis.call('HSET', KEYS[4], 'spec', ARGV[3])
end
return fence
