-- Shared by the wrk scripts: the event body, auth, and one machine-readable
-- result line that scripts/bench-ingest.sh parses:
--   RESULT requests=… duration_us=… req_s=… events_s=… p50_us=… p99_us=… non2xx=… errors=…
local M = {}

-- STREAMS=1 in the environment puts each event in one of 1,000 streams
-- ("order-N"), so the stream index and version checks are exercised.
local streams = os.getenv("STREAMS")

function M.event(i)
  local stream = ""
  if streams and streams ~= "" and streams ~= "0" then
    stream = string.format(',"stream":"order-%d"', i % 1000)
  end
  return string.format(
    '{"type":"order.placed","data":{"order_id":%d,"customer":"c-%d",' ..
    '"items":[{"sku":"SKU-%05d","qty":%d,"price":19.99}],"total":39.98,"currency":"EUR"},' ..
    '"metadata":{"source":"wrk"}%s}',
    100000 + i, i % 977, (i * 7919) % 100000, 1 + i % 4, stream)
end

-- A batch body: a JSON array of n events.
function M.batch(n)
  local parts = {}
  for i = 1, n do
    parts[i] = M.event(i)
  end
  return "[" .. table.concat(parts, ",") .. "]"
end

function M.auth(w)
  local key = os.getenv("API_KEY")
  if key and key ~= "" then
    w.headers["X-API-Key"] = key
  end
end

function M.done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local per = events_per_request or 1
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d req_s=%.0f events_s=%.0f p50_us=%d p99_us=%d non2xx=%d errors=%d\n",
    summary.requests, summary.duration, summary.requests / secs,
    summary.requests * per / secs, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end

return M
