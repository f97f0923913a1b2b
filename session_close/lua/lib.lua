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
-- always give the same event id.
local function uuid5(namespace_hex, name)
  local namespace = (namespace_hex:gsub('%x%x', function(pair)
    return string.char(tonumber(pair, 16))
  end))
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

