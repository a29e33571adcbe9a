#!/usr/bin/env bash
# Read benchmark: shardcast's read endpoints beside nginx `return 200`.
#
# Seeds EVENTS events (batches of 1,000), then, RUNS times interleaved:
#   nginx      GET to `return 200` (the ceiling)
#   position   GET /position                         (LMDB)
#   consumer   GET /subscriptions/bench/position     (LMDB)
#   load10k    GET /events?from=1&limit=10000, one connection: latency of a 10k page
# and once: GET /events/stream of every event, timed, with the server's RssAnon
# before and after.
#
# Settings: EVENTS=1000000 DURATION=10s CONNECTIONS=100 THREADS=2 RUNS=3
#           SHARDCAST_BIN=path (skip the build)
#   scripts/bench-reads.sh
#   EVENTS=20000 DURATION=1s RUNS=1 scripts/bench-reads.sh     # smoke
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
EVENTS=${EVENTS:-1000000}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-100}
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
export API_KEY=${API_KEY:-bench-key-0123456789}

command -v wrk >/dev/null || { echo "bench-reads: wrk is not installed (apt-get install wrk)" >&2; exit 3; }
command -v curl >/dev/null || { echo "bench-reads: curl is not installed" >&2; exit 3; }
if [ -z "${SHARDCAST_BIN:-}" ]; then
  (cd "$root" && cargo build --release --quiet)
  SHARDCAST_BIN=$root/target/release/shardcast
fi

work=$(mktemp -d /tmp/shardcast-bench-reads.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"
anon_kib() { awk '/^RssAnon:/ {print $2}' "/proc/$1/status"; }

port=$(free_port)
PORT=$port DB_PATH=$work/data/events.db RATE_LIMIT=0 RUST_LOG=warn "$SHARDCAST_BIN" serve >"$work/out" 2>"$work/log" &
sc=$!; pids+=($sc)
wait_port "$port"
base=http://127.0.0.1:$port

# Seed with the batch script's body, 1,000 events a request.
python3 - "$base" "$EVENTS" "$API_KEY" <<'PY'
import json, sys, http.client
base, n, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
host, port = base[7:].split(":")
c = http.client.HTTPConnection(host, int(port))
body = json.dumps([{"type": "order.placed", "data": {"order_id": i, "total": 39.98, "currency": "EUR"}} for i in range(1000)])
for _ in range(n // 1000):
    c.request("POST", "/events/batch", body, {"Content-Type": "application/json", "X-API-Key": key})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
c.request("POST", "/subscriptions/bench/position", '{"position":1}', {"Content-Type": "application/json", "X-API-Key": key})
r = c.getresponse(); r.read(); assert r.status == 204
PY

NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
ng=
if [ -x "$NGINX" ]; then
  ng=$(free_port); mkdir -p "$work/nginx/logs"
  cat >"$work/nginx/nginx.conf" <<EOF2
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$ng reuseport; location / { return 200 '{"position":1}'; } } }
EOF2
  "$NGINX" -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>"$work/nginx/stderr" &
  pids+=($!); wait_port "$ng"
else
  echo "bench-reads: nginx is not installed: no ceiling to compare with"
fi

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) CPUs; $EVENTS events; wrk -t$THREADS -c$CONNECTIONS -d$DURATION; $RUNS runs"
run() { # name url connections threads
  local line
  line=$(wrk -t"$4" -c"$3" -d"$DURATION" -s "$here/get.lua" "$2" | grep '^RESULT ' || true)
  [ -n "$line" ] || { echo "bench-reads: no result for $1" >&2; exit 1; }
  echo "$1 ${line#RESULT }" | tee -a "$work/results"
}
for _ in $(seq 1 "$RUNS"); do
  [ -n "$ng" ] && run nginx "http://127.0.0.1:$ng/position" "$CONNECTIONS" "$THREADS"
  run position "$base/position" "$CONNECTIONS" "$THREADS"
  run consumer "$base/subscriptions/bench/position" "$CONNECTIONS" "$THREADS"
  run load10k "$base/events?from=1&limit=10000" 1 1
done

before=$(anon_kib "$sc")
start=$(date +%s.%N)
bytes=$(curl -sS -H "X-API-Key: $API_KEY" "$base/events/stream?from=1&batch_size=5000" | wc -c)
end=$(date +%s.%N)
after=$(anon_kib "$sc")
awk -v s="$start" -v e="$end" -v n="$EVENTS" -v b="$bytes" -v a0="$before" -v a1="$after" 'BEGIN {
  printf "STREAM events=%d bytes=%d secs=%.2f events_s=%.0f rss_anon_before_kib=%d rss_anon_after_kib=%d\n", n, b, e-s, n/(e-s), a0, a1 }'

echo "# medians of $RUNS runs"
awk '
  { name=$1; names[name]=1; for (i=2;i<=NF;i++) { split($i,kv,"="); v[name, kv[1], ++c[name, kv[1]]] = kv[2] } }
  function med(name, f,   n, i, j, t, a) {
    n = c[name, f]; for (i=1;i<=n;i++) a[i] = v[name, f, i]
    for (i=1;i<=n;i++) for (j=i+1;j<=n;j++) if (a[j]+0 < a[i]+0) { t=a[i]; a[i]=a[j]; a[j]=t }
    return (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
  }
  END {
    split("nginx position consumer load10k", order, " ")
    for (k=1;k<=4;k++) { nm=order[k]; if (!(nm in names)) continue
      m[nm]=med(nm,"req_s")
      printf "MEDIAN %s req_s=%.0f p50_us=%.0f p99_us=%.0f non2xx=%.0f errors=%.0f\n", nm, m[nm], med(nm,"p50_us"), med(nm,"p99_us"), med(nm,"non2xx"), med(nm,"errors") }
    if ("nginx" in names) {
      printf "RATIO position/nginx req_s=%.2f\n", m["position"]/m["nginx"]
      printf "RATIO consumer/nginx req_s=%.2f\n", m["consumer"]/m["nginx"] }
  }' "$work/results"
