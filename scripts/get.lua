-- wrk script: GET the URL given to wrk (for reads), with API_KEY as X-API-Key.
--   wrk -t2 -c100 -d10s -s scripts/get.lua http://127.0.0.1:8080/position
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "wrk-common.lua")

common.auth(wrk)
events_per_request = 1
done = common.done
