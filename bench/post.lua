-- wrk script: POST the same JSON document; with IDS_DIR set, write every
-- acknowledged event id to a file per thread, so the benchmark can check each
-- one is in the database.
local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

function init(args)
  acked, refused, other = 0, 0, 0
  local dir = os.getenv("IDS_DIR")
  if dir and dir ~= "" then
    ids = io.open(dir .. "/ids-" .. tid .. ".txt", "w")
    -- Fully buffered (flushed when wrk exits): a write() per response cost
    -- wrk's threads a system call each, on the file system the service
    -- fsyncs, and the service 12-20 % of its req/s (six paired runs).
    ids:setvbuf("full", 1048576)
  end
end

wrk.method = "POST"
wrk.body = '{"documentName": "reports/2026/q3.pdf", "data": {"pages": 3, "priority": "normal"}}'
wrk.headers["Content-Type"] = "application/json"
local cookie = os.getenv("COOKIE")
if cookie and cookie ~= "" then
  wrk.headers["Cookie"] = cookie
end

function response(status, headers, body)
  if status == 200 then
    acked = acked + 1
    if ids then
      local id = body:match('"id": *"([^"]+)"')
      if id then ids:write(id, "\n") end
    end
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
