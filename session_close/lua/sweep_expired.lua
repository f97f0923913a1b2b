-- Sweep the expiry index: for at most ARGV[2] sessions whose score (expires_at) is past,
-- by Redis's clock, each in one step: remove the sid from the index, delete the session,
-- remove it from its user's set and record one session.expired event in the outbox.
-- A sid whose hash says a later expires_at (a sliding expiry extended it) is re-scored
-- instead; one whose hash is gone or has no expires_at is dropped from the index, and so
-- is one whose expires_at is not a valid Unix time (lib.lua's expires_at_of), counted
-- apart as invalid. Each
-- run is atomic, so any number of sweepers (and closes) may race: the sid leaves the
-- index in the same step as its event, and only once.
--
-- KEYS[1] a bucket's expiry index   KEYS[2] the bucket's outbox stream
-- ARGV[1] the bucket's key tag (prefix and hash tag: the sessions found in the index and
-- their users' sets are named from it)  ARGV[2] batch size  ARGV[3] closed at (RFC 3339)
-- ARGV[4] event-id namespace (32 hex digits)  ARGV[5] seconds to set a failing sid aside
--
-- Returns {expired, rescored, dropped, failed, lag, invalid}: lag is how many seconds past its
-- expires_at the oldest sid still due is after this run (0 when none is due).

local expiry, outbox = KEYS[1], KEYS[2]
local key, batch, closed_at, namespace, set_aside =
  keys_of(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])

local now = redis_now()

local function sweep(sid)
  local session_key = key.session(sid)
  local fields = redis.call('HMGET', session_key, 'user_id', 'os', 'app_version', 'expires_at')
  local uid = fields[1]
  local expires_at, invalid = expires_at_of(fields[4])
  if not uid or not expires_at then
    redis.call('ZREM', expiry, sid)
    return (uid and invalid) and 'invalid' or 'dropped'
  end
  if expires_at > now then
    redis.call('ZADD', expiry, expires_at, sid)
    return 'rescored'
  end
  -- Every check that can fail runs before the first write.
  local user_sessions = key.user_sessions(uid)
  expect_type(user_sessions, 'set')
  expect_type(outbox, 'stream')
  redis.call('ZREM', expiry, sid)
  redis.call('DEL', session_key)
  redis.call('SREM', user_sessions, sid)
  add_event(outbox, {type = 'session.expired', reason = 'expired',
    event_id = uuid5(namespace, sid .. '@' .. fields[4]), session_id = sid, user_id = uid,
    closed_at = closed_at, expired_at = fields[4], os = fields[2], app_version = fields[3]})
  return 'expired'
end

local counts = {expired = 0, rescored = 0, dropped = 0, failed = 0, invalid = 0}
local due = redis.call('ZRANGE', expiry, '-inf', now, 'BYSCORE', 'LIMIT', 0, batch)
for _, sid in ipairs(due) do
  local ok, outcome = pcall(sweep, sid)
  if not ok then
    -- A session that fails here (a key of the wrong type) wrote nothing; set it aside
    -- so that it cannot hold back the sessions due after it, and try it again later.
    redis.call('ZADD', expiry, now + set_aside, sid)
    outcome = 'failed'
  end
  counts[outcome] = counts[outcome] + 1
end

local lag = 0
local oldest = redis.call('ZRANGE', expiry, 0, 0, 'WITHSCORES')
if oldest[2] and tonumber(oldest[2]) <= now then
  lag = now - tonumber(oldest[2])
end
return {counts.expired, counts.rescored, counts.dropped, counts.failed, tostring(lag),
  counts.invalid}
