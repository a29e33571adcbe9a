-- wrk script: one event per POST /events, the shape ebuse's users send
-- (~200 bytes, server-generated id and timestamp).
--   wrk -t2 -c100 -d10s -s scripts/post-event.lua http://127.0.0.1:8080/events
-- API_KEY in the environment is sent as X-API-Key.
-- wrk-common.lua is found beside this file, wherever wrk is run from.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "wrk-common.lua")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
common.auth(wrk)
wrk.body = common.event(1)

events_per_request = 1
done = common.done
