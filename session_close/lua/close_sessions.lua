-- Close a batch of sessions (the close requests of one event-loop iteration whose keys
-- share a Redis node: on Redis Cluster, one bucket), each as one atomic step: check the
-- owner and that the session has not reached its expires_at (by Redis's clock), delete
-- the session, remove it from its user's set and from the expiry index, leave a
-- tombstone and record the session.closed event in its bucket's outbox stream. One
-- script run per batch instead of one per request: redis-py's per-command cost was most
-- of the Redis part of a close. The caller looked each token up first (its key is in a
-- slot of its own) and passes the token's user.
--
-- KEYS, 5 per close: its bucket's outbox stream and expiry index, then the session,
-- its tombstone and its user's set of sessions
-- ARGV[1] tombstone ttl (s)  ARGV[2] closed at (RFC 3339)
-- then 7 per close: the token's user id, sid, event id, os, app version, request id,
-- traceparent ('' for none)
--
-- Returns one reply per close, in order: 'missing' (no such session for this user),
-- 'closed' (closed now, or a retry of the very call that closed it), 'already'; or an
-- error reply for a close that failed (say, a key of the wrong type), which leaves the
-- others of the batch alone.
-- A close is all or nothing: Redis keeps the writes a script made before an error, so
-- every key a close writes is checked before its first write.

local ttl, closed_at = ARGV[1], ARGV[2]
local now = redis_now()

local function close(at, uid, sid, event_id, os_name, app_version, request_id, traceparent)
  local tomb = redis.call('HMGET', at.tombstone, 'user_id', 'event_id')
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

  local session = redis.call('HMGET', at.session, 'user_id', 'os', 'app_version', 'expires_at')
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
  expect_type(at.user_sessions, 'set')
  expect_type(at.outbox, 'stream')
  expect_type(at.expiry, 'zset')
  close_session(at, at.outbox, at.expiry, ttl, {type = 'session.closed', reason = 'user_logout',
    event_id = event_id, session_id = sid, user_id = uid, closed_at = closed_at,
    os = os_name, app_version = app_version, request_id = request_id,
    traceparent = traceparent})
  return 'closed'
end

local replies = {}
for n = 0, #KEYS / 5 - 1 do
  local k, a = n * 5, 3 + n * 7
  local at = {outbox = KEYS[k + 1], expiry = KEYS[k + 2], session = KEYS[k + 3],
    tombstone = KEYS[k + 4], user_sessions = KEYS[k + 5]}
  local ok, reply = pcall(close, at, ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
    ARGV[a + 4], ARGV[a + 5], ARGV[a + 6])
  if not ok then
    reply = error_reply_of(reply)
  end
  replies[#replies + 1] = reply
end
return replies
