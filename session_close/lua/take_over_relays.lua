-- Take over the outbox entries of relays that are gone, in one bucket's stream. A live
-- relay keeps a short-TTL heartbeat key (in a slot of its own); the calling relay found
-- the consumers of this stream's group whose heartbeat is gone and names them here: it
-- claims their pending entries at once, and once one holds none its name leaves the
-- group. One script, so no relay can read entries between the check and the delete
-- (XGROUP DELCONSUMER drops the consumer's pending entries, which would then never be
-- published). A relay judged dead that was merely slow loses nothing: what it read is
-- claimed here, and if it reads again its name rejoins the group.
--
-- KEYS[1] a bucket's outbox stream
-- ARGV[1] group  ARGV[2] the calling relay's name  ARGV[3] claim at most this many
-- entries  ARGV[4..] the names of the dead relays
--
-- Returns the claimed entries as XCLAIM gives them: {id, {field, value, ...}}.

local stream, group, me, room = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local claimed = {}

for i = 4, #ARGV do
  local name = ARGV[i]
  if room > 0 then
    for _, pending in ipairs(redis.call('XPENDING', stream, group, '-', '+', room, name)) do
      -- An entry deleted meanwhile leaves the pending list and comes back empty.
      for _, entry in ipairs(redis.call('XCLAIM', stream, group, me, 0, pending[1])) do
        claimed[#claimed + 1] = entry
      end
      room = room - 1
    end
  end
  if #redis.call('XPENDING', stream, group, '-', '+', 1, name) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, name)
  end
end
return claimed
