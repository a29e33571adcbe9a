#!/usr/bin/env bash
# Ingestion benchmark: shardcast beside nginx `return 200`, same wrk flags, same run.
#
# Builds the release binary (unless SHARDCAST_BIN is given), starts shardcast on
# a fresh data directory with the durable defaults (synchronous=full), starts
# nginx with one `return 200` location as the ceiling, and runs, RUNS times and
# interleaved so that noise hits all of them alike:
#
#   nginx    POST of the single-event body to `return 200`
#   single   POST /events, one ~200-byte event per request
#   batch    POST /events/batch, BATCH_SIZE events per request
#
# It prints each run, then the medians and shardcast's single-event req/s as a
# share of nginx's. Every acknowledged event is counted back from
# GET /position at the end, so a run that dropped writes cannot look fast.
#
# Settings (environment):
#   DURATION=10s  CONNECTIONS=100  THREADS=2  RUNS=3  BATCH_SIZE=100
#   SYNC="full"         database.synchronous of each shardcast; "full normal"
#                       runs one server per mode, interleaved in the same runs
#                       (rows single/batch for full, the default;
#                       single_normal/batch_normal for normal)
#   SHARDCAST_BIN=path  skip the build and use this binary
#   NGINX=path          nginx binary (default: nginx on PATH); absent → said plainly, skipped
#   KEEP_DIR=1          keep the scratch directory (data, logs) for inspection
#
#   scripts/bench-ingest.sh
#   DURATION=1s RUNS=1 CONNECTIONS=10 scripts/bench-ingest.sh     # smoke
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-100}
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
BATCH_SIZE=${BATCH_SIZE:-100}
SYNC=${SYNC:-full}
KEY=${API_KEY:-bench-key-0123456789}
export API_KEY=$KEY BATCH_SIZE

command -v wrk >/dev/null || { echo "bench-ingest: wrk is not installed (apt-get install wrk)" >&2; exit 3; }

if [ -z "${SHARDCAST_BIN:-}" ]; then
  (cd "$root" && cargo build --release --quiet)
  SHARDCAST_BIN=$root/target/release/shardcast
fi

work=$(mktemp -d /tmp/shardcast-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -z "${KEEP_DIR:-}" ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT

# shellcheck source=scripts/lib.sh
source "$here/lib.sh"

# --- shardcast, one per synchronous mode -----------------------------------
declare -A sc_ports
for mode in $SYNC; do
  port=$(free_port)
  PORT=$port DB_PATH=$work/data-$mode/events.db RATE_LIMIT=0 RUST_LOG=warn \
    SHARDCAST_DATABASE_SYNCHRONOUS=$mode \
    "$SHARDCAST_BIN" serve >"$work/shardcast-$mode.out" 2>"$work/shardcast-$mode.log" &
  pids+=($!)
  wait_port "$port" "$work/shardcast-$mode.log"
  sc_ports[$mode]=$port
done
suffix() { [ "$1" = full ] && echo "" || echo "_$1"; }

# --- nginx -----------------------------------------------------------------
NGINX=${NGINX:-$(command -v nginx || true)}
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
ng_port=
if [ -n "$NGINX" ]; then
  ng_port=$(free_port)
  mkdir -p "$work/nginx/logs"
  cat >"$work/nginx/nginx.conf" <<EOF
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_buffer_size 64k;
  server {
    listen 127.0.0.1:$ng_port reuseport;
    location / { return 200 '{"ok":true}'; }
  }
}
EOF
  "$NGINX" -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>"$work/nginx/stderr" &
  pids+=($!)
  wait_port "$ng_port" "$work/nginx/stderr"
else
  echo "bench-ingest: nginx is not installed (apt-get install nginx): no ceiling to compare with, shardcast runs alone"
fi

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) CPUs, $(uname -r); wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $RUNS runs, batch $BATCH_SIZE"
echo "# shardcast $("$SHARDCAST_BIN" --version | cut -d' ' -f2) synchronous=${SYNC// /,}; nginx: ${NGINX:-absent}"

run() { # name url script
  local line
  line=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s "$here/$3" "$2" | grep '^RESULT ' || true)
  if [ -z "$line" ]; then
    echo "bench-ingest: wrk printed no result for $1" >&2
    exit 1
  fi
  echo "$1 ${line#RESULT }" | tee -a "$work/results"
}

for r in $(seq 1 "$RUNS"); do
  [ -n "$ng_port" ] && run nginx "http://127.0.0.1:$ng_port/events" post-event.lua
  for mode in $SYNC; do
    run "single$(suffix "$mode")" "http://127.0.0.1:${sc_ports[$mode]}/events" post-event.lua
  done
  for mode in $SYNC; do
    run "batch$(suffix "$mode")" "http://127.0.0.1:${sc_ports[$mode]}/events/batch" post-batch.lua
  done
done

# Everything acknowledged must be stored: sum the 2xx answers × events each.
lost=0
for mode in $SYNC; do
  sfx=$(suffix "$mode")
  acked=$(awk -v s="single$sfx" -v b="batch$sfx" '$1==s||$1==b {
    for (i=2;i<=NF;i++) { split($i,kv,"="); v[kv[1]]=kv[2] }
    ok = v["requests"] - v["non2xx"]; n += ($1==b ? ok*'"$BATCH_SIZE"' : ok) }
    END { printf "%d", n }' "$work/results")
  stored=$( { exec 3<>"/dev/tcp/127.0.0.1/${sc_ports[$mode]}" &&
    printf 'GET /position HTTP/1.1\r\nHost: bench\r\nX-API-Key: %s\r\nConnection: close\r\n\r\n' "$KEY" >&3 &&
    cat <&3; } 2>/dev/null | grep -o '"position":[0-9]*' | cut -d: -f2 || true)
  stored=${stored:-?}
  echo "# synchronous=$mode: acknowledged events: $acked, stored (GET /position): $stored"
  if [ "$stored" != "?" ] && [ "$stored" -lt "$acked" ]; then lost=1; fi
done

echo "# medians of $RUNS runs"
awk "$MEDIANS_AWK"'
  END {
    for (k=1;k<=nn;k++) { nm=order[k]
      m[nm] = median(nm, "req_s")
      printf "MEDIAN %s req_s=%.0f events_s=%.0f p50_us=%.0f p99_us=%.0f non2xx=%.0f errors=%.0f\n",
        nm, m[nm], median(nm, "events_s"), median(nm, "p50_us"), median(nm, "p99_us"),
        median(nm, "non2xx"), median(nm, "errors") }
    if (("nginx" in names) && m["nginx"] > 0 && ("single" in names))
      printf "RATIO single/nginx req_s=%.2f\n", m["single"] / m["nginx"]
    for (k=1;k<=nn;k++) { nm=order[k]; split(nm, parts, "_")
      if (parts[2] != "" && (parts[1] in m) && m[parts[1]] > 0)
        printf "RATIO %s/%s req_s=%.2f\n", nm, parts[1], m[nm] / m[parts[1]] }
  }' "$work/results"

if [ "$lost" = 1 ]; then
  echo "bench-ingest: FAILED: a server stored fewer events than it acknowledged" >&2
  exit 1
fi
