-- What every script of this service shares. Redis scripts cannot load one another, so
-- scripts.py puts this file in front of each script it loads.

-- Redis's clock, in Unix seconds: every API process and sweeper agrees on what is past.
local function redis_now()
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end

-- Fail, before a script's first write, when `key` holds another type than `kind`:
-- Redis keeps the writes a script made before an error, so a step that is to be all or
-- nothing checks every key it will write first.
local function expect_type(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found ~= 'none' and found ~= kind then
    error({err = 'WRONGTYPE ' .. key .. ' holds a ' .. found .. ', not a ' .. kind})
  end
end

-- The version-5 UUID of `name` in the namespace given as 32 hex digits: the same inputs
-- always give the same event id. Each namespace is decoded once per script run: a
-- close-all step derives hundreds of ids from one, and decoding it each time was a
-- quarter of the step's time.
local namespaces = {}
local function uuid5(namespace_hex, name)
  local namespace = namespaces[namespace_hex]
  if not namespace then
    namespace = (namespace_hex:gsub('%x%x', function(pair)
      return string.char(tonumber(pair, 16))
    end))
    namespaces[namespace_hex] = namespace
  end
  local h = redis.sha1hex(namespace .. name)
  local variant = string.format('%x', tonumber(h:sub(17, 17), 16) % 4 + 8)
  return h:sub(1, 8) .. '-' .. h:sub(9, 12) .. '-5' .. h:sub(14, 16) .. '-'
    .. variant .. h:sub(18, 20) .. '-' .. h:sub(21, 32)
end

-- The error reply for what a pcall caught: redis.call raises a table {err = ...} (Redis
-- 7) or a string (older).
local function error_reply_of(caught)
  return redis.error_reply(type(caught) == 'table' and caught.err or tostring(caught))
end


-- The key layout of docs/redis.md (session_close/keys.py builds the same keys in
-- Python), for the keys of one bucket: `tag` is what they all start with, the key
-- prefix and the bucket's hash tag ({b<n>}:), which the caller passes as an argument.
-- A script declares in KEYS every key it can name up front; the ones it derives (a
-- session a close-all or a sweep finds) carry the same tag, so they are always in the
-- script's own hash slot.
local function keys_of(tag)
  return {
    session = function(sid) return tag .. 'session:' .. sid end,
    tombstone = function(sid) return tag .. 'session:closed:' .. sid end,
    user_sessions = function(uid) return tag .. 'user:' .. uid .. ':sessions' end,
  }
end

-- The first Unix time that is no longer sane: year 10000.
local EXPIRES_AT_LIMIT = 253402300800

-- A session's expires_at as a number, or nil when it is not given. Text that is not a
-- plain decimal Unix time after 1970 and before the year 10000 is treated as not given,
-- and the second result says so: tonumber alone accepts 'nan', 'inf', '0x10', '1e400'
-- and '-1e20', and Python's float() (the relay reads expired_at) rejects hex.
local function expires_at_of(text)
  if not text then
    return nil, false
  end
  local value = text:find('^[%d.eE+-]+$') and tonumber(text)
  if value and value == value and value ~= math.huge and value ~= -math.huge
      and value > 0 and value < EXPIRES_AT_LIMIT then
    return value, false
  end
  return nil, true
end

-- One outbox entry: a session's end, with the fields events.py's SessionEvent.from_outbox
-- reads. `event` holds type, reason, event_id, session_id, user_id, closed_at and,
-- optionally, os, app_version, request_id, traceparent and expired_at.
local function add_event(outbox, event)
  local entry = {'type', event.type, 'reason', event.reason, 'event_id', event.event_id,
    'session_id', event.session_id, 'user_id', event.user_id, 'closed_at', event.closed_at,
    'os', event.os or '', 'app_version', event.app_version or '',
    'request_id', event.request_id or ''}
  for _, field in ipairs({'expired_at', 'traceparent'}) do
    if event[field] and event[field] ~= '' then
      entry[#entry + 1] = field
      entry[#entry + 1] = event[field]
    end
  end
  return redis.call('XADD', outbox, '*', unpack(entry))
end

-- Close one open session, as a close and a close-all do: delete it, remove it from its
-- user's set and from the expiry index, leave its tombstone (for idempotent repeats) and
-- record its session.closed event. `at` names the session's own keys; the caller has
-- checked every key's type first.
local function close_session(at, outbox, expiry, ttl, event)
  local sid = event.session_id
  redis.call('DEL', at.session)
  redis.call('SREM', at.user_sessions, sid)
  redis.call('ZREM', expiry, sid)
  redis.call('HSET', at.tombstone,
    'user_id', event.user_id, 'event_id', event.event_id, 'closed_at', event.closed_at)
  redis.call('EXPIRE', at.tombstone, ttl)
  add_event(outbox, event)
end
