-- Log out everywhere, one bounded step per run: close at most ARGV[9] open sessions of
-- the user, each exactly as a single close would (tombstone, removal from the user's
-- set and from the expiry index, one session.closed event in the outbox), except the
-- request's own session when it is kept. Ids in the user's set whose session no longer
-- exists are removed from it without an event. Each run is atomic with its events; the
-- caller runs it again from the cursor it returns until it says done, so no single run
-- holds Redis for long, however many sessions the user has. The caller looked the token
-- up first (its key is in a slot of its own) and passes the token's user.
--
-- The sessions a run closes are counted in the close-all's own record, keyed by the
-- user and ARGV[6] (derived from the request id): a retry of a close-all that timed out,
-- sent with the same X-Request-ID, finishes the job and answers the total of both.
--
-- KEYS[1] the user's bucket's outbox stream  KEYS[2] its expiry index
-- KEYS[3] the user's set of sessions  KEYS[4] the close-all's record
-- KEYS[5] the session to keep (any key of the bucket when none is kept)
-- ARGV[1] the bucket's key tag (prefix and hash tag: the sessions and tombstones found
-- in the user's set are named from it)  ARGV[2] tombstone ttl (s)
-- ARGV[3] closed at (RFC 3339)  ARGV[4] the token's user id
-- ARGV[5] the session to keep ('' for none)
-- ARGV[6] the close-all's id (32 hex digits: its event-id namespace and its record)
-- ARGV[7] request id  ARGV[8] traceparent ('' for none)
-- ARGV[9] at most this many sessions closed by this run
-- ARGV[10] the cursor to go on from ('0' for the first run)
-- ARGV[11] '1' on the first run: only it checks the session to keep
--
-- Returns {'missing'} (first run: the session to keep is not an open session of this
-- user; nothing written) or {'closed', n, total, cursor, done}: n closed by this run,
-- total closed under this close-all's id so far, the cursor for the next run, and done 1
-- when there is no next run. A key of the wrong type fails the whole run before its
-- first write, so it writes nothing.

local key, ttl, closed_at, uid, keep, run, request_id, traceparent =
  keys_of(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local batch, cursor, first = tonumber(ARGV[9]), ARGV[10], ARGV[11] == '1'
local outbox, expiry, user_sessions, record, keep_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

local now = redis_now()

-- The session's fields when it is open for this user: it exists, is theirs, and its
-- logical end (expires_at, when the login side writes a valid one) is still ahead.
local function open_session(session_key)
  local fields = redis.call('HMGET', session_key, 'user_id', 'os', 'app_version', 'expires_at')
  if fields[1] ~= uid then
    return nil, fields[1] == false
  end
  local expires_at = expires_at_of(fields[4])
  if expires_at and expires_at <= now then
    return nil, false
  end
  return fields, false
end

if first and keep ~= '' and not open_session(keep_key) then
  return {'missing'}
end

-- Read everything first: every check that can fail runs before the first write.
expect_type(user_sessions, 'set')
expect_type(outbox, 'stream')
expect_type(expiry, 'zset')
expect_type(record, 'hash')
local page = redis.call('SSCAN', user_sessions, cursor, 'COUNT', batch)
-- SSCAN's COUNT is a hint (a small set comes back whole): a page with more to close than
-- this run may is finished by the next run from the same cursor, which no longer sees
-- the sessions closed here.
local next_cursor, done = page[1], page[1] == '0'
local to_close, gone = {}, {}
for _, sid in ipairs(page[2]) do
  if #to_close == batch then
    next_cursor, done = cursor, false
    break
  end
  if sid ~= keep then
    local fields, missing = open_session(key.session(sid))
    if fields then
      expect_type(key.tombstone(sid), 'hash')
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
  local at = {session = key.session(sid), tombstone = key.tombstone(sid),
    user_sessions = user_sessions}
  close_session(at, outbox, expiry, ttl, {type = 'session.closed',
    reason = 'user_logout_all', event_id = uuid5(run, sid), session_id = sid, user_id = uid,
    closed_at = closed_at, os = fields[2], app_version = fields[3],
    request_id = request_id, traceparent = traceparent})
end
local total
if #to_close > 0 then
  total = redis.call('HINCRBY', record, 'closed', #to_close)
  redis.call('EXPIRE', record, ttl)
else
  total = tonumber(redis.call('HGET', record, 'closed') or '0')
end
return {'closed', #to_close, total, next_cursor, done and 1 or 0}
