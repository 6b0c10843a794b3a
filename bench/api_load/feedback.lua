-- wrk script: POST /users/<id>/feedback, one pair per request, a unique Idempotency-Key each.
-- A share of the requests re-sends one of the thread's recent keys with the identical body (a
-- client retrying), possibly while the first is still in flight on another connection.
-- Every 201 body names its pair's key (metadata.bench_key): the keys acknowledged are written out,
-- with the status counts and latency percentiles, for the row count afterwards.
--
-- BENCH_USERS=FILE BENCH_RETRY=0.1 BENCH_RUN=LABEL BENCH_OUT=FILE wrk -t2 -c32 -d20s -s feedback.lua URL
--   FILE: one "user_id api_key" per line. (Settings come from the environment: wrk runs done() in
--   a Lua state that never sees the script arguments.)

local threads = {}
local users = {}
local recent = {}
local RECENT = 256
local counter = 0
local retry_fraction = tonumber(os.getenv("BENCH_RETRY") or "0")
local run_label = os.getenv("BENCH_RUN") or "run"
local out_file = os.getenv("BENCH_OUT")
acked = {}
statuses = {}
retries = 0
replays = 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

function init(args)
  for line in io.lines(os.getenv("BENCH_USERS")) do
    local user_id, key = line:match("^(%S+)%s+(%S+)$")
    if user_id then
      table.insert(users, { id = user_id, key = key })
    end
  end
  math.randomseed(id * 7919)
end

local function body_for(key)
  return string.format(
    '{"prompt":"How do I keep basil alive indoors? (%s)",' ..
      '"chosen":"Give it sun, water when the top of the soil is dry, and pinch off the flowers.",' ..
      '"rejected":"Just water it.","metadata":{"bench_key":"%s"}}',
    key, key)
end

function request()
  local key, user
  if #recent > 0 and math.random() < retry_fraction then
    local pick = recent[math.random(#recent)]
    key, user = pick[1], pick[2]
    retries = retries + 1
  else
    counter = counter + 1
    key = string.format("%s-t%d-%d", run_label, id, counter)
    user = users[(counter % #users) + 1]
    recent[((counter - 1) % RECENT) + 1] = { key, user }
  end
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. user.key,
    ["Idempotency-Key"] = key,
  }
  return wrk.format("POST", "/users/" .. user.id .. "/feedback", headers, body_for(key))
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 201 then
    local key = body:match('"bench_key"%s*:%s*"([^"]+)"')
    if key then
      acked[key] = true
    end
    if headers["idempotent-replayed"] or headers["Idempotent-Replayed"] then
      replays = replays + 1
    end
  end
end

function done(summary, latency, requests)
  local out = io.open(out_file, "w")
  report(out, summary, latency)
  for _, thread in ipairs(threads) do
    for key, _ in pairs(thread:get("acked")) do
      out:write("acked ", key, "\n")
    end
    for status, count in pairs(thread:get("statuses")) do
      out:write("status ", status, " ", count, "\n")
    end
    out:write("retries ", thread:get("retries"), "\n")
    out:write("replays ", thread:get("replays"), "\n")
  end
  out:close()
end

function report(out, summary, latency)
  out:write("requests ", summary.requests, "\n")
  out:write("duration_us ", summary.duration, "\n")
  out:write("bytes ", summary.bytes, "\n")
  local e = summary.errors
  out:write("socket_errors ", e.connect, " ", e.read, " ", e.write, " ", e.timeout, "\n")
  out:write("non_2xx_3xx ", e.status, "\n")
  for _, p in ipairs({ 50, 90, 99 }) do
    out:write("latency_p", p, "_us ", latency:percentile(p), "\n")
  end
  out:write("latency_mean_us ", latency.mean, "\n")
  out:write("latency_max_us ", latency.max, "\n")
end
