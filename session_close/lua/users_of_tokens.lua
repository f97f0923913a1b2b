-- The user of each token of a batch of closes, in one script run instead of one HGET per
-- close: on a single node and behind Sentinel, where a script may declare keys of many
-- slots (redis-py's cost per pipelined command was most of the lookup's). On Redis
-- Cluster every token's key is in a slot of its own, so the closer pipelines HGETs there.
--
-- KEYS: the tokens' keys.
-- Returns, per key in order, the token's user id; nil for an unknown token; or the error
-- reply of a key Redis cannot read as a hash, which fails only its own close.

local users = {}
for i, key in ipairs(KEYS) do
  local ok, uid = pcall(redis.call, 'HGET', key, 'user_id')
  if not ok then
    uid = error_reply_of(uid)
  end
  users[i] = uid
end
return users
