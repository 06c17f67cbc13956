-- wrk script: POST a JSON array of EVENTS events (default 1) to the relay,
-- as the Inngest SDKs do; counts the answers by status.
dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "counts.lua")

function init(args)
  acked, refused, other = 0, 0, 0
end

local count_events = tonumber(os.getenv("EVENTS") or "1")
local events = {}
for i = 1, count_events do
  events[i] = '{"name": "app/bench.sent", "data": {"n": ' .. i .. ', "note": "relay benchmark"}, "v": "1"}'
end
wrk.method = "POST"
wrk.body = "[" .. table.concat(events, ",") .. "]"
wrk.headers["Content-Type"] = "application/json"

function response(status, headers, body)
  count(status)
end
