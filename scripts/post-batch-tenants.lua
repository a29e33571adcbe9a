-- wrk script: POST /events/batch (BATCH_SIZE events each) with the key of a
-- different tenant on each request, round-robin over API_KEYS (comma-separated),
-- so every group commit touches many tenants.
--   API_KEYS=k1,k2 BATCH_SIZE=100 wrk -t2 -c100 -d10s -s scripts/post-batch-tenants.lua http://127.0.0.1:8080/events/batch
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "wrk-common.lua")

local n = tonumber(os.getenv("BATCH_SIZE") or "100")
local body = common.batch(n)

local keys = {}
for k in string.gmatch(os.getenv("API_KEYS") or "", "[^,]+") do
  keys[#keys + 1] = k
end
assert(#keys > 0, "API_KEYS is empty")

-- One pre-formatted request per key; each thread starts at its own offset.
local requests = {}
local next_req = 0

function init(args)
  for j, k in ipairs(keys) do
    requests[j] = wrk.format("POST", nil, {
      ["Content-Type"] = "application/json",
      ["X-API-Key"] = k,
    }, body)
  end
  next_req = math.random(#keys)
end

function request()
  next_req = next_req % #requests + 1
  return requests[next_req]
end

events_per_request = n
done = common.done
