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

local run, users, first, count, interval
local next_due
sent = 0
local threads = {}
local body = '{ "requestContent": { } }'

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  run = args[1]
  users = tonumber(args[2])
  first = tonumber(args[3])
  count = tonumber(args[4])
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

function request()
  local i = first + (sent % count)
  sent = sent + 1
  return wrk.format("POST", "/v1.0/session/close", {
    ["Content-Type"] = "application/json; multipart/form-data;",
    ["Sessionid"] = string.format("b%s-%d", run, i),
    ["OS"] = "Android",
    ["AppVersion"] = "1.0.10",
    ["Authorization"] = string.format("Basic bt-%s-%d", run, i % users),
  }, body)
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("sent")
  end
  io.write(string.format(
    'BENCH {"sent":%d,"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"status_errors":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
    '"timeouts":%d}\n',
    total, summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout))
end
