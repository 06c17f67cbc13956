-- wrk script: POST the same JSON document; with IDS_DIR set, write every
-- acknowledged event id to a file per thread, so the benchmark can check each
-- one is in the database.
dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "counts.lua")

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
  count(status)
  if status == 200 and ids then
    local id = body:match('"id": *"([^"]+)"')
    if id then ids:write(id, "\n") end
  end
end
