#!/usr/bin/env bash
# Multi-tenant ingestion: what "one transaction per tenant touched" costs a
# group commit. For each tenant count in TENANTS, RUNS times interleaved, a
# fresh shardcast in multi-tenant mode (a tenants file of that many tenants)
# takes POST /events/batch from wrk with the key of a different tenant on
# each request (round-robin), so every wakeup of the writer commits to many
# tenants at once. Prints each run, medians, events/s relative to 1 tenant,
# and checks that every acknowledged event is stored (the tenants' heads).
#
# Settings: TENANTS="1 4 16" DURATION=10s CONNECTIONS=100 THREADS=2 RUNS=3
#           BATCH_SIZE=100 SHARDCAST_BIN=path (skip the build)
#   scripts/bench-tenants.sh
#   TENANTS="1 2" DURATION=1s RUNS=1 CONNECTIONS=4 scripts/bench-tenants.sh   # smoke
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
TENANTS=${TENANTS:-"1 4 16"}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-100}
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
export BATCH_SIZE=${BATCH_SIZE:-100}

command -v wrk >/dev/null || { echo "bench-tenants: wrk is not installed (apt-get install wrk)" >&2; exit 3; }
if [ -z "${SHARDCAST_BIN:-}" ]; then
  (cd "$root" && cargo build --release --quiet)
  SHARDCAST_BIN=$root/target/release/shardcast
fi

work=$(mktemp -d /tmp/shardcast-bench-tenants.XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"
position() { # port key
  { exec 3<>"/dev/tcp/127.0.0.1/$1" &&
    printf 'GET /position HTTP/1.1\r\nHost: b\r\nX-API-Key: %s\r\nConnection: close\r\n\r\n' "$2" >&3 &&
    cat <&3; } 2>/dev/null | grep -o '"position":[0-9]*' | cut -d: -f2
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) CPUs; wrk -t$THREADS -c$CONNECTIONS -d$DURATION; batch $BATCH_SIZE; $RUNS runs; tenants: $TENANTS"
for r in $(seq 1 "$RUNS"); do
  for t in $TENANTS; do
    dir=$work/run-$r-$t
    mkdir -p "$dir"
    keys=""
    { echo "data_dir: \"$dir/data\""; echo "tenants:"; } >"$dir/tenants.yaml"
    for i in $(seq 1 "$t"); do
      k="bench-tenant-$i-key-0123456789"
      keys="$keys${keys:+,}$k"
      printf '  - name: "t%d"\n    api_key: "%s"\n' "$i" "$k" >>"$dir/tenants.yaml"
    done
    port=$(free_port)
    PORT=$port SHARDCAST_AUTH_TENANTS_FILE=$dir/tenants.yaml RATE_LIMIT=0 RUST_LOG=warn \
      "$SHARDCAST_BIN" serve >"$dir/out" 2>"$dir/log" &
    pid=$!
    wait_port "$port" "$dir/log"
    line=$(API_KEYS=$keys wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" -s "$here/post-batch-tenants.lua" \
      "http://127.0.0.1:$port/events/batch" | grep '^RESULT ' || true)
    [ -n "$line" ] || { echo "bench-tenants: no result for $t tenants" >&2; exit 1; }
    stored=0
    for i in $(seq 1 "$t"); do
      p=$(position "$port" "bench-tenant-$i-key-0123456789")
      stored=$((stored + ${p:-0}))
    done
    echo "tenants=$t ${line#RESULT } stored=$stored" | tee -a "$work/results"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  done
done

echo "# medians of $RUNS runs"
awk -v batch="$BATCH_SIZE" '
  { split($1, a, "="); t=a[2]; ts[t]=1
    for (i=2;i<=NF;i++) { split($i,kv,"="); v[t, kv[1], ++c[t, kv[1]]] = kv[2] }
    # every acknowledged event stored (answers that wrk counted × batch)
    for (i=2;i<=NF;i++) { split($i,kv,"="); f[kv[1]]=kv[2] }
    acked = (f["requests"] - f["non2xx"]) * batch
    if (f["stored"] + 0 < acked) { printf "LOST tenants=%s acked=%d stored=%d\n", t, acked, f["stored"]; lost=1 } }
  function med(t, k,   n, i, j, x, y) {
    n = c[t, k]; for (i=1;i<=n;i++) y[i] = v[t, k, i]
    for (i=1;i<=n;i++) for (j=i+1;j<=n;j++) if (y[j]+0 < y[i]+0) { x=y[i]; y[i]=y[j]; y[j]=x }
    return (n % 2) ? y[(n+1)/2] : (y[n/2] + y[n/2+1]) / 2 }
  END {
    x = 0
    n = 0; for (t in ts) order[++n] = t
    for (i=1;i<=n;i++) for (j=i+1;j<=n;j++) if (order[j]+0 < order[i]+0) { x=order[i]; order[i]=order[j]; order[j]=x }
    for (i=1;i<=n;i++) { t=order[i]; e[t]=med(t,"events_s")
      printf "MEDIAN tenants=%s events_s=%.0f p50_us=%.0f p99_us=%.0f non2xx=%.0f", t, e[t], med(t,"p50_us"), med(t,"p99_us"), med(t,"non2xx")
      if (1 in e) printf " vs_1_tenant=%.2f", e[t]/e[1]
      printf "\n" }
    exit lost }' "$work/results"
