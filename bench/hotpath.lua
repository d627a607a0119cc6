-- wrk script for bench/hotpath.py: one endpoint per run; every response is checked and non-200s are counted.
--
--   wrk -t2 -c64 -d15s --latency -s bench/hotpath.lua http://127.0.0.1:PORT -- healthz
--   wrk -t2 -c64 -d15s --latency -s bench/hotpath.lua http://127.0.0.1:PORT -- access-token 1000 bench-key-0123456789 bench-user-
--
-- access-token: GET /v1/users/<prefix><n>/access-token with n uniform in [0, users) per request, and the header
-- `Authorization: Bearer <key>`. Both modes go through the same Lua callbacks, so wrk's own cost is the same.
-- done() prints one machine-readable line, `BENCH_RESULT {json}`, and `BENCH_FIRST_BAD <status> <body>` when a
-- response was not a 200 (a 200 from access-token must also carry an "access_token" field).

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
  table.insert(threads, thread)
end

function init(args)
  mode = args[1] or "healthz"
  users = tonumber(args[2] or "1")
  prefix = args[4] or "bench-user-"
  responses = 0
  non200 = 0
  first_bad = ""
  math.randomseed(os.time() * 97 + thread_id * 7919)
  if mode == "access-token" then
    wrk.headers["Authorization"] = "Bearer " .. (args[3] or "bench-key-0123456789")
  elseif mode ~= "healthz" then
    error("mode must be healthz or access-token, got " .. tostring(mode))
  end
end

function request()
  if mode == "healthz" then
    return wrk.format("GET", "/healthz")
  end
  return wrk.format("GET", "/v1/users/" .. prefix .. math.random(0, users - 1) .. "/access-token")
end

function response(status, headers, body)
  responses = responses + 1
  local ok = status == 200
  if ok and mode == "access-token" then
    ok = string.find(body, '"access_token"', 1, true) ~= nil
  end
  if not ok then
    non200 = non200 + 1
    if first_bad == "" then
      -- a failed response carries a problem document, never a token
      first_bad = status .. " " .. string.sub(string.gsub(body, "%s+", " "), 1, 300)
    end
  end
end

function done(summary, latency, requests)
  local total_responses, total_non200, bad, run_mode = 0, 0, "", "?"
  for _, thread in ipairs(threads) do
    run_mode = thread:get("mode")
    total_responses = total_responses + thread:get("responses")
    total_non200 = total_non200 + thread:get("non200")
    if bad == "" then
      bad = thread:get("first_bad")
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"mode": "%s", "requests": %d, "duration_us": %d, "responses": %d, "non200": %d, '
      .. '"mean_us": %.1f, "p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, "max_us": %.1f, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    run_mode, summary.requests, summary.duration, total_responses, total_non200,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout
  ))
  if bad ~= "" then
    io.write("BENCH_FIRST_BAD " .. bad .. "\n")
  end
end
