-- wrk script: POST /events/batch with BATCH_SIZE (default 100) events each.
--   BATCH_SIZE=100 wrk -t2 -c100 -d10s -s scripts/post-batch.lua http://127.0.0.1:8080/events/batch
-- API_KEY in the environment is sent as X-API-Key.
-- wrk-common.lua is found beside this file, wherever wrk is run from.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "wrk-common.lua")

local n = tonumber(os.getenv("BATCH_SIZE") or "100")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
common.auth(wrk)
wrk.body = common.batch(n)

events_per_request = n
done = common.done
