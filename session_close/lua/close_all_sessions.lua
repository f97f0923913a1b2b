-- Log out everywhere: close every open session of the token's user in one atomic step,
-- each exactly as a single close would (tombstone, removal from the user's set and from
-- the expiry index, one session.closed event in the outbox), except the request's own
-- session when it is kept. Ids in the user's set whose session no longer exists are
-- removed from it without an event.
--
-- KEYS[1] outbox stream   KEYS[2] expiry index
-- ARGV[1] key prefix  ARGV[2] tombstone ttl (s)  ARGV[3] closed at (RFC 3339)
-- ARGV[4] sha256 hex of the token  ARGV[5] the session to keep open ('' for none)
-- ARGV[6] the request's event-id namespace (32 hex digits)  ARGV[7] request id
-- ARGV[8] traceparent ('' for none)
--
-- Returns {'token'} (unknown token), {'missing'} (the session to keep is not an open
-- session of this user; nothing written) or {'closed', n}. A key of the wrong type fails
-- the whole step before its first write, so it writes nothing.

local prefix, ttl, closed_at, digest, keep, namespace, request_id, traceparent =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local outbox, expiry = KEYS[1], KEYS[2]

local uid = redis.call('HGET', prefix .. 'auth:token:' .. digest, 'user_id')
if not uid then
  return {'token'}
end

local now = redis_now()

-- The session's fields when it is open for this user: it exists, is theirs, and its
-- logical end (expires_at, when the login side writes one) is still ahead.
local function open_session(sid)
  local fields = redis.call('HMGET', prefix .. 'session:' .. sid,
    'user_id', 'os', 'app_version', 'expires_at')
  if fields[1] ~= uid then
    return nil, fields[1] == false
  end
  local expires_at = tonumber(fields[4])
  if expires_at and expires_at <= now then
    return nil, false
  end
  return fields, false
end

if keep ~= '' and not open_session(keep) then
  return {'missing'}
end

-- Read everything first: every check that can fail runs before the first write.
local user_sessions = prefix .. 'user:' .. uid .. ':sessions'
expect_type(user_sessions, 'set')
expect_type(outbox, 'stream')
expect_type(expiry, 'zset')
local to_close, gone = {}, {}
for _, sid in ipairs(redis.call('SMEMBERS', user_sessions)) do
  if sid ~= keep then
    local fields, missing = open_session(sid)
    if fields then
      expect_type(prefix .. 'session:closed:' .. sid, 'hash')
      to_close[#to_close + 1] = {sid, fields}
    elseif missing then
      gone[#gone + 1] = sid
    end
  end
end

for _, sid in ipairs(gone) do
  redis.call('SREM', user_sessions, sid)
end
for _, item in ipairs(to_close) do
  local sid, fields = item[1], item[2]
  -- Unique per session closed, and the same if this very step is run again.
  local id = uuid5(namespace, sid)
  local tombstone = prefix .. 'session:closed:' .. sid
  redis.call('DEL', prefix .. 'session:' .. sid)
  redis.call('SREM', user_sessions, sid)
  redis.call('ZREM', expiry, sid)
  redis.call('HSET', tombstone, 'user_id', uid, 'event_id', id, 'closed_at', closed_at)
  redis.call('EXPIRE', tombstone, ttl)
  redis.call('XADD', outbox, '*',
    'type', 'session.closed', 'reason', 'user_logout_all',
    'event_id', id, 'session_id', sid, 'user_id', uid, 'closed_at', closed_at,
    'os', fields[2] or '', 'app_version', fields[3] or '', 'request_id', request_id,
    'traceparent', traceparent)
end
return {'closed', #to_close}
