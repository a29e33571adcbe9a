#!/usr/bin/env bash
# Cluster benchmark: three `nats-server -js` (R3) and three shardcast nodes
# on this one box, beside one single-node shardcast, same wrk flags, in the
# same run, interleaved so that noise hits all of them alike:
#
#   single_1node     POST /events to the single node
#   batch_1node      POST /events/batch (BATCH_SIZE events) to the single node
#   single_cluster   POST /events, one wrk per cluster node at once
#                    (CONNECTIONS split over the three)
#   batch_cluster    POST /events/batch likewise
#
# Cluster rows sum the three wrk's req/s and events/s; their p50 is the
# middle one's, their p99 the worst. Then the replication lag: SUBSCRIBERS
# SSE clients on node C while events are appended on nodes A and B at
# LAG_RATE events/s in all (default: half the median single_cluster rate),
# append → delivery p50/p99 (`shardcast bench sse --publish-addr`).
#
# Every acknowledged event is counted back at the end: each cluster node
# must hold the same number (GET /position), at least what was acknowledged.
# On 2 cores six processes share the CPUs: the absolute numbers are
# CPU-bound, not what three boxes would do.
#
# Settings (environment):
#   DURATION=10s  CONNECTIONS=60  THREADS=1  RUNS=3  BATCH_SIZE=100
#   SUBSCRIBERS=100  LAG_EVENTS=3000  LAG_RATE=(half of single_cluster)
#   SHARDCAST_BIN=path  skip the build and use this binary
#   KEEP_DIR=1          keep the scratch directory (data, logs)
#
#   scripts/bench-cluster.sh
#   DURATION=1s RUNS=1 CONNECTIONS=6 LAG_EVENTS=50 scripts/bench-cluster.sh   # smoke
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-60}
THREADS=${THREADS:-1}
RUNS=${RUNS:-3}
BATCH_SIZE=${BATCH_SIZE:-100}
SUBSCRIBERS=${SUBSCRIBERS:-100}
LAG_EVENTS=${LAG_EVENTS:-3000}
KEY=${API_KEY:-bench-key-0123456789}
export API_KEY=$KEY BATCH_SIZE

command -v wrk >/dev/null || { echo "bench-cluster: wrk is not installed (apt-get install wrk)" >&2; exit 3; }
NATS=$(command -v nats-server || true)
[ -z "$NATS" ] && [ -x /usr/sbin/nats-server ] && NATS=/usr/sbin/nats-server
[ -n "$NATS" ] || { echo "bench-cluster: nats-server is not installed (apt-get install nats-server)" >&2; exit 3; }

if [ -z "${SHARDCAST_BIN:-}" ]; then
  (cd "$root" && cargo build --release --quiet)
  SHARDCAST_BIN=$root/target/release/shardcast
fi

work=$(mktemp -d /tmp/shardcast-bench-cluster.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -z "${KEEP_DIR:-}" ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT

# shellcheck source=scripts/lib.sh
source "$here/lib.sh"

# --- three NATS servers, one JetStream cluster ------------------------------
nports=() cports=()
for i in 1 2 3; do nports+=("$(free_port)"); cports+=("$(free_port)"); done
routes=$(printf 'nats://127.0.0.1:%s,' "${cports[@]}"); routes=${routes%,}
urls=$(printf 'nats://127.0.0.1:%s,' "${nports[@]}"); urls=${urls%,}
for i in 0 1 2; do
  "$NATS" -js -a 127.0.0.1 -n "n$((i + 1))" -p "${nports[$i]}" -sd "$work/nats$i" \
    --cluster_name bench --cluster "nats://127.0.0.1:${cports[$i]}" --routes "$routes" \
    2>"$work/nats$i.log" &
  pids+=($!)
done
for i in 0 1 2; do wait_port "${nports[$i]}" "$work/nats$i.log"; done
for _ in $(seq 1 300); do
  grep -q "metadata leader" "$work"/nats*.log && break
  sleep 0.1
done

# --- shardcast: one single node, three cluster nodes -------------------------
start_shardcast() { # name port [extra env...]
  local name=$1 port=$2; shift 2
  env PORT="$port" DB_PATH="$work/$name/events.db" RATE_LIMIT=0 RUST_LOG="${NODE_LOG:-warn}" \
    SHARDCAST_SERVER_SHARDS=1 SHARDCAST_SERVER_PIN_CPUS=false SHARDCAST_SSE_MAX_PER_KEY=0 "$@" \
    "$SHARDCAST_BIN" serve >"$work/$name.out" 2>"$work/$name.log" &
  pids+=($!)
  wait_port "$port" "$work/$name.log"
}
one=$(free_port)
start_shardcast single "$one"
cports_sc=()
for n in a b c; do
  p=$(free_port); cports_sc+=("$p")
  start_shardcast "node-$n" "$p" SHARDCAST_CLUSTER_NATS_URLS="$urls" SHARDCAST_CLUSTER_NODE_NAME="$n"
done
ready() { # port
  for _ in $(seq 1 600); do
    if { exec 3<>"/dev/tcp/127.0.0.1/$1" &&
      printf 'GET /health?mode=readiness HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n' >&3 &&
      head -c 12 <&3; } 2>/dev/null | grep -q ' 200'; then return 0; fi
    sleep 0.1
  done
  echo "bench-cluster: node on port $1 not ready" >&2; cat "$work"/node-*.log >&2; exit 1
}
for p in "${cports_sc[@]}"; do ready "$p"; done

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) CPUs, $(uname -r); wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $RUNS runs, batch $BATCH_SIZE"
echo "# shardcast $("$SHARDCAST_BIN" --version | cut -d' ' -f2); $("$NATS" --version); 3 NATS servers R3 + 3 nodes vs 1 node, one box"

wrk_line() { # connections url script
  wrk -t"$THREADS" -c"$1" -d"$DURATION" -s "$here/$3" "$2" | grep '^RESULT ' | sed 's/^RESULT //'
}
run_one() { # name url script
  local line; line=$(wrk_line "$CONNECTIONS" "$2" "$3")
  [ -n "$line" ] || { echo "bench-cluster: wrk printed no result for $1" >&2; exit 1; }
  echo "$1 $line" | tee -a "$work/results"
}
run_cluster() { # name path script
  local per=$(( (CONNECTIONS + 2) / 3 )) k w=()
  for k in 0 1 2; do
    wrk_line "$per" "http://127.0.0.1:${cports_sc[$k]}$2" "$3" >"$work/wrk$k" &
    w+=($!)
  done
  wait "${w[@]}"
  # Sum the rates and counts; p50: the middle one; p99: the worst.
  cat "$work/wrk0" "$work/wrk1" "$work/wrk2" | awk -v name="$1" '
    { for (i=1;i<=NF;i++) { split($i,kv,"="); v[NR, kv[1]] = kv[2] } }
    END {
      for (r=1;r<=NR;r++) { req += v[r,"req_s"]; ev += v[r,"events_s"]; n += v[r,"requests"];
        bad += v[r,"non2xx"]; err += v[r,"errors"]; p[r] = v[r,"p50_us"]; if (v[r,"p99_us"] > p99) p99 = v[r,"p99_us"] }
      for (i=1;i<=NR;i++) for (j=i+1;j<=NR;j++) if (p[j]+0 < p[i]+0) { t=p[i]; p[i]=p[j]; p[j]=t }
      printf "%s requests=%d req_s=%.0f events_s=%.0f p50_us=%d p99_us=%d non2xx=%d errors=%d\n",
        name, n, req, ev, p[int((NR+1)/2)], p99, bad, err }' | tee -a "$work/results"
}

for r in $(seq 1 "$RUNS"); do
  run_one single_1node "http://127.0.0.1:$one/events" post-event.lua
  run_cluster single_cluster /events post-event.lua
  run_one batch_1node "http://127.0.0.1:$one/events/batch" post-batch.lua
  run_cluster batch_cluster /events/batch post-batch.lua
done

echo "# medians of $RUNS runs"
awk "$MEDIANS_AWK"'
  END {
    for (k=1;k<=nn;k++) { nm=order[k]; m[nm] = median(nm, "events_s")
      printf "MEDIAN %s req_s=%.0f events_s=%.0f p50_us=%.0f p99_us=%.0f non2xx=%.0f errors=%.0f\n",
        nm, median(nm, "req_s"), m[nm], median(nm, "p50_us"), median(nm, "p99_us"),
        median(nm, "non2xx"), median(nm, "errors") }
    if (m["single_1node"] > 0) printf "RATIO single_cluster/single_1node events_s=%.2f\n", m["single_cluster"] / m["single_1node"]
    if (m["batch_1node"] > 0) printf "RATIO batch_cluster/batch_1node events_s=%.2f\n", m["batch_cluster"] / m["batch_1node"]
  }' "$work/results" | tee "$work/medians"

position() { # port
  { exec 3<>"/dev/tcp/127.0.0.1/$1" &&
    printf 'GET /position HTTP/1.1\r\nHost: bench\r\nX-API-Key: %s\r\nConnection: close\r\n\r\n' "$KEY" >&3 &&
    cat <&3; } 2>/dev/null | grep -o '"position":[0-9]*' | cut -d: -f2 || echo 0
}
# Each node applies every event: after the load, the replicas may still be
# applying the backlog. Wait until they agree (and say how long it took).
t0=$(date +%s.%N)
first=""; for p in "${cports_sc[@]}"; do first="$first $(position "$p")"; done
echo "# positions when the load ended (nodes A B C):$first"
for _ in $(seq 1 1200); do
  heads=""; for p in "${cports_sc[@]}"; do heads="$heads $(position "$p")"; done
  set -- $heads
  [ "$1" = "$2" ] && [ "$2" = "$3" ] && break
  sleep 0.1
done
echo "# replicas agreed at position $1, $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s after the load ended"

# --- replication lag: append on A, delivered on C ------------------------------
rate=${LAG_RATE:-$(awk '$1=="MEDIAN" && $2=="single_cluster" { split($4,kv,"="); printf "%d", kv[2] / 2 }' "$work/medians")}
[ "${rate:-0}" -gt 0 ] || rate=100
echo "# replication lag: $SUBSCRIBERS subscribers on node C, $LAG_EVENTS single appends on nodes A and B at $rate/s"
"$SHARDCAST_BIN" bench sse --addr "127.0.0.1:${cports_sc[2]}" \
  --publish-addr "127.0.0.1:${cports_sc[0]}" --publish-addr "127.0.0.1:${cports_sc[1]}" \
  -n "$SUBSCRIBERS" -m "$LAG_EVENTS" --rate "$rate" --publishers 16 --drain-secs 30 | sed 's/^RESULT /LAG /'

# --- everything acknowledged is on every node ----------------------------------
acked=$(awk -v b="$BATCH_SIZE" '$1 ~ /_cluster$/ { for (i=2;i<=NF;i++) { split($i,kv,"="); v[kv[1]]=kv[2] }
  ok = v["requests"] - v["non2xx"]; n += ($1=="batch_cluster" ? ok*b : ok) } END { printf "%d", n }' "$work/results")
sleep 1
heads=""
for p in "${cports_sc[@]}"; do heads="$heads $(position "$p")"; done
echo "# cluster: acknowledged events (wrk rows): $acked; GET /position on each node:$heads"
set -- $heads
if [ "$1" != "$2" ] || [ "$2" != "$3" ] || [ "$1" -lt "$acked" ]; then
  echo "bench-cluster: FAILED: the nodes disagree or hold fewer events than were acknowledged" >&2
  exit 1
fi
