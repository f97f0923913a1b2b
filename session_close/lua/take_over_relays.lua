-- Take over the outbox entries of relays that are gone. A live relay keeps a short-TTL
-- heartbeat key; a consumer of the group whose heartbeat key is gone is judged dead:
-- the calling relay claims its pending entries at once, and once it holds none its name
-- leaves the group. One script, so no relay can read entries between the check and the
-- delete (XGROUP DELCONSUMER drops the consumer's pending entries, which would then never
-- be published). A relay judged dead that was merely slow loses nothing: what it read is
-- claimed here, and if it reads again its name rejoins the group.
--
-- KEYS[1] outbox stream
-- ARGV[1] group  ARGV[2] key prefix (of the relays' heartbeat keys)
-- ARGV[3] the calling relay's name  ARGV[4] claim at most this many entries
--
-- Returns the claimed entries as XCLAIM gives them: {id, {field, value, ...}}.

local stream, group, key, me = KEYS[1], ARGV[1], keys_of(ARGV[2]), ARGV[3]
local room = tonumber(ARGV[4])
local claimed = {}

local function name_of(consumer)
  for i = 1, #consumer, 2 do
    if consumer[i] == 'name' then return consumer[i + 1] end
  end
end

for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
  local name = name_of(consumer)
  if name ~= me and redis.call('EXISTS', key.relay_heartbeat(name)) == 0 then
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
end
return claimed
