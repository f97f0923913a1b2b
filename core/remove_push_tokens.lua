-- Remove from user:<uid>:push every push token still mapped to the closed session.
-- A token that a newer session re-registered maps to that session's id and is kept.
-- KEYS[1] user:<uid>:push   ARGV[1] closed session id.  Returns how many were removed.
local removed = 0
local pairs = redis.call('HGETALL', KEYS[1])
for i = 1, #pairs, 2 do
  if pairs[i + 1] == ARGV[1] then
    removed = removed + redis.call('HDEL', KEYS[1], pairs[i])
  end
end
return removed
