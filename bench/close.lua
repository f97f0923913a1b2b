-- wrk script: POST /v1.0/session/close with the apps' headers, a distinct seeded session
-- per request (one wrk thread, so a plain counter is enough).
-- Arguments after `--`: run id, number of users, first session index, session count.
-- Session i is "b<run>-<i>", owned by user i % users whose token is "bt-<run>-<i % users>"
-- (bench/seed.py writes them). Past `count` requests it wraps around (those closes answer
-- "already closed"); done() reports how many were sent so the caller can tell, in one
-- JSON line for bench/wrk.py. (wrk's thread:stop() would not end the run early, and the
-- req/s it then prints would be wrong.)

local run, users, first, count
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
