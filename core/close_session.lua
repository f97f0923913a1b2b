-- Close one session atomically: check the token and the owner, delete the session,
-- leave a tombstone and record the session.closed event in the outbox stream.
--
-- KEYS[1] auth:token:<sha256>   KEYS[2] session:<sid>   KEYS[3] session:closed:<sid>
-- KEYS[4] outbox stream
-- ARGV[1] key prefix  ARGV[2] sid  ARGV[3] event id  ARGV[4] tombstone ttl (s)
-- ARGV[5] closed at (RFC 3339)  ARGV[6] os  ARGV[7] app version  ARGV[8] request id
--
-- Returns one of: 'token' (unknown token), 'missing' (no such session for this user),
-- 'closed' (closed now, or a retry of the very call that closed it), 'already'.
-- user:<uid>:sessions is derived from the token's user id, so it cannot be declared
-- in KEYS; the service therefore needs a single Redis node (no cluster).

local uid = redis.call('HGET', KEYS[1], 'user_id')
if not uid then
  return 'token'
end

local tomb = redis.call('HMGET', KEYS[3], 'user_id', 'event_id')
if tomb[1] then
  if tomb[1] ~= uid then
    return 'missing'
  end
  -- A client library that retries after a timeout sends the same event id again:
  -- the first attempt closed the session, so this one reports the same outcome.
  if tomb[2] == ARGV[3] then
    return 'closed'
  end
  return 'already'
end

local session = redis.call('HMGET', KEYS[2], 'user_id', 'os', 'app_version')
if session[1] ~= uid then
  return 'missing'
end

local os_name = ARGV[6]
if os_name == '' then os_name = session[2] or '' end
local app_version = ARGV[7]
if app_version == '' then app_version = session[3] or '' end

redis.call('DEL', KEYS[2])
redis.call('SREM', ARGV[1] .. 'user:' .. uid .. ':sessions', ARGV[2])
redis.call('HSET', KEYS[3], 'user_id', uid, 'event_id', ARGV[3], 'closed_at', ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('XADD', KEYS[4], '*',
  'event_id', ARGV[3], 'session_id', ARGV[2], 'user_id', uid, 'closed_at', ARGV[5],
  'os', os_name, 'app_version', app_version, 'request_id', ARGV[8])
return 'closed'
