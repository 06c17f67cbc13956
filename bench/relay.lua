-- wrk script: POST a JSON array of EVENTS events (default 1) to the relay,
-- as the Inngest SDKs do; counts the answers by status.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  acked, refused, other = 0, 0, 0
end

local count = tonumber(os.getenv("EVENTS") or "1")
local events = {}
for i = 1, count do
  events[i] = '{"name": "app/bench.sent", "data": {"n": ' .. i .. ', "note": "relay benchmark"}, "v": "1"}'
end
wrk.method = "POST"
wrk.body = "[" .. table.concat(events, ",") .. "]"
wrk.headers["Content-Type"] = "application/json"

function response(status, headers, body)
  if status == 200 then
    acked = acked + 1
  elseif status == 503 then
    refused = refused + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local a, r, o = 0, 0, 0
  for _, thread in ipairs(threads) do
    a = a + thread:get("acked")
    r = r + thread:get("refused")
    o = o + thread:get("other")
  end
  io.write(string.format("STATUS ok=%d refused503=%d other=%d\n", a, r, o))
  io.write(string.format("LATENCY p50=%.3f p99=%.3f\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
