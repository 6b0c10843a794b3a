-- wrk script: GET /healthz with the same Lua accounting cost as feedback.lua (a response() hook and
-- the same report), so the ratio compares the endpoints, not the load generator's work.
-- BENCH_OUT=FILE wrk -t2 -c32 -d20s -s healthz.lua URL

local threads = {}
local out_file = os.getenv("BENCH_OUT")
statuses = {}

function setup(thread)
  table.insert(threads, thread)
end

function request()
  return wrk.format("GET", "/healthz")
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local out = io.open(out_file, "w")
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
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      out:write("status ", status, " ", count, "\n")
    end
  end
  out:close()
end
