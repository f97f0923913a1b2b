-- Close a batch of sessions (the close requests of one event-loop iteration), each as
-- one atomic step: check the token, the owner and that the session has not reached its
-- expires_at (by Redis's clock), delete the session, remove it from its user's set and
-- from the expiry index, leave a tombstone and record the session.closed event in the
-- outbox stream. One script run
-- per batch instead of one per request: redis-py's per-command cost was most of the
-- Redis part of a close.
--
-- KEYS[1] outbox stream  KEYS[2] expiry index
-- ARGV[1] key prefix  ARGV[2] tombstone ttl (s)  ARGV[3] closed at (RFC 3339)
-- then 7 per close: sha256 hex of the token, sid, event id, os, app version, request id,
-- traceparent ('' for none)
--
-- Returns one reply per close, in order: 'token' (unknown token), 'missing' (no such
-- session for this user), 'closed' (closed now, or a retry of the very call that closed
-- it), 'already'; or an error reply for a close that failed (say, a key of the wrong
-- type), which leaves the others of the batch alone.
-- A close is all or nothing: Redis keeps the writes a script made before an error, so
-- every key a close writes is checked before its first write.
-- The keys are derived from the token and the session id, so they cannot be declared
-- in KEYS; the service therefore needs a single Redis node (no cluster).

local key, ttl, closed_at = keys_of(ARGV[1]), ARGV[2], ARGV[3]
local outbox, expiry = KEYS[1], KEYS[2]
local now = redis_now()

local function close(digest, sid, event_id, os_name, app_version, request_id, traceparent)
  local uid = redis.call('HGET', key.token(digest), 'user_id')
  if not uid then
    return 'token'
  end

  local tomb = redis.call('HMGET', key.tombstone(sid), 'user_id', 'event_id')
  if tomb[1] then
    if tomb[1] ~= uid then
      return 'missing'
    end
    -- A client library that retries after a timeout sends the same event id again:
    -- the first attempt closed the session, so this one reports the same outcome.
    if tomb[2] == event_id then
      return 'closed'
    end
    return 'already'
  end

  local session = redis.call('HMGET', key.session(sid), 'user_id', 'os', 'app_version', 'expires_at')
  if session[1] ~= uid then
    return 'missing'
  end
  -- Past its logical end it is expired, whether or not the sweeper got to it yet.
  local expires_at = expires_at_of(session[4])
  if expires_at and expires_at <= now then
    return 'missing'
  end

  if os_name == '' then os_name = session[2] or '' end
  if app_version == '' then app_version = session[3] or '' end

  -- The session hash and the tombstone were read above, which fails on a wrong type.
  expect_type(key.user_sessions(uid), 'set')
  expect_type(outbox, 'stream')
  expect_type(expiry, 'zset')
  close_session(key, outbox, expiry, ttl, {type = 'session.closed', reason = 'user_logout',
    event_id = event_id, session_id = sid, user_id = uid, closed_at = closed_at,
    os = os_name, app_version = app_version, request_id = request_id,
    traceparent = traceparent})
  return 'closed'
end

local replies = {}
for i = 4, #ARGV, 7 do
  local ok, reply = pcall(close, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4], ARGV[i + 5], ARGV[i + 6])
  if not ok then
    reply = error_reply_of(reply)
  end
  replies[#replies + 1] = reply
end
return replies
