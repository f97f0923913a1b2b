-- Read one bucket's outbox for a relay, on Redis Cluster: XREADGROUP without BLOCK, run
-- as a script so that the cluster client routes it by its declared key. (XREADGROUP's
-- keys are "movable": sent as a command, redis-py asks a node where they are, one more
-- round trip per bucket read.)
--
-- KEYS[1] a bucket's outbox stream
-- ARGV[1] group  ARGV[2] the relay's name  ARGV[3] at most this many entries
-- ARGV[4] '>' for new entries, '0' for those this relay holds
--
-- Returns the entries as XREADGROUP gives them: {id, {field, value, ...}}, the fields
-- nil for an entry deleted meanwhile.

local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
  'STREAMS', KEYS[1], ARGV[4])
if not reply then
  return {}
end
return reply[1][2]
