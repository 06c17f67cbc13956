-- Shared by the wrk scripts (loaded with dofile): each thread numbered
-- ("tid") and kept for done(), the answers counted by status, and the
-- summary lines bench/load.py reads.
threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function count(status)
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
