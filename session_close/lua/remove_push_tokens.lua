-- For a batch of closed sessions (the messages a push-cleanup worker has in hand),
-- remove from user:<uid>:push every push token still mapped to the closed session. A
-- token that a newer session re-registered maps to that session's id and is kept.
-- KEYS[i] user:<uid>:push   ARGV[i] the closed session id, for i = 1..n.
-- Returns, per session, how many tokens were removed, or an error reply for one that
-- failed (say, a key of the wrong type), which leaves the others of the batch alone.

local function remove(push_key, sid)
  local removed = 0
  local pairs = redis.call('HGETALL', push_key)
  for i = 1, #pairs, 2 do
    if pairs[i + 1] == sid then
      removed = removed + redis.call('HDEL', push_key, pairs[i])
    end
  end
  return removed
end

local replies = {}
for i = 1, #KEYS do
  local ok, reply = pcall(remove, KEYS[i], ARGV[i])
  if not ok then
    reply = error_reply_of(reply)
  end
  replies[i] = reply
end
return replies
