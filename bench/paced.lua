-- wrk script for the sustained run: the requests of bench/close.lua, sent at a fixed
-- total rate. delay() hands each request the next slot of one schedule shared by all
-- connections of the (single) thread, so the rate holds whatever the latency.
-- Arguments after `--`: run id, number of users, first session index, session count, rate.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock_id, bench_timespec *tp);
]]
local clock = ffi.new("bench_timespec")

local function now_ms()
  ffi.C.clock_gettime(1, clock) -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end

-- The requests, init and the report are close.lua's; this adds the rate.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "close.lua")

local close_init = init
local interval, next_due

function init(args)
  close_init(args)
  interval = 1000 / tonumber(args[5])
end

function delay()
  local now = now_ms()
  if next_due == nil or next_due < now - 1000 then
    next_due = now -- start, or a stall of over a second: do not burst to catch up
  end
  local slot = next_due
  next_due = next_due + interval
  return math.max(0, math.floor(slot - now + 0.5))
end
