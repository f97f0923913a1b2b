-- Remove outbox entries the broker confirmed: acknowledged in the relay's group and
-- deleted in one step, so that no entry is ever left acknowledged but still in the
-- stream (never read again, yet counted in the backlog forever). One run settles the
-- entries of several buckets on a single node; on Redis Cluster, those of one bucket.
--
-- KEYS the outbox streams (a bucket's each)
-- ARGV[1] group, then for each stream of KEYS in order: how many ids, then the ids
--
-- Returns how many entries were deleted.

local at, deleted = 2, 0
for _, stream in ipairs(KEYS) do
  local last = at + tonumber(ARGV[at])
  redis.call('XACK', stream, ARGV[1], unpack(ARGV, at + 1, last))
  deleted = deleted + redis.call('XDEL', stream, unpack(ARGV, at + 1, last))
  at = last + 1
end
return deleted
