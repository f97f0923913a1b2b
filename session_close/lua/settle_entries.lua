-- Remove outbox entries the broker confirmed, from one bucket's stream: acknowledged in
-- the relay's group and deleted in one step, so that no entry is ever left acknowledged
-- but still in the stream (never read again, yet counted in the backlog forever).
--
-- KEYS[1] a bucket's outbox stream
-- ARGV[1] group  ARGV[2..] the entry ids
--
-- Returns how many entries were deleted.

redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
