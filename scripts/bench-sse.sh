#!/usr/bin/env bash
# SSE fan-out benchmark: shardcast beside nginx + nchan (one worker), same
# load, same run, same load tool (`shardcast bench sse`).
#
# For each subscriber count in SUBSCRIBERS, and RUNS times interleaved:
#   1. a fresh shardcast (defaults, durable) and a fresh nginx with nchan;
#   2. the tool opens N SSE connections to one, measures the server's RSS per
#      idle connection, publishes EVENTS events at RATE/s, waits for delivery,
#      and prints connections held, delivery ratio, deliveries/s, p50/p99
#      publish→deliver latency; then the same against the other.
# Then medians per server and count, and shardcast/nchan ratios.
#
# Settings (environment):
#   SUBSCRIBERS="1000 10000"  EVENTS=100  RATE=0 (as fast as answered)  RUNS=3
#   SHARDCAST_BIN=path   skip the build
#   DRAIN_SECS=60        wait for deliveries after the last publish
#   TYPES=0              topics: subscriber i follows t{i mod TYPES}, event n is
#                        t{n mod TYPES} (nchan: one channel per topic); 0 = all
#   PUBLISHERS=4         publishing keep-alive connections
#   SERIAL=              set (SERIAL=1): one event in flight per publisher
#   TOKENS=              set (TOKENS=1): shardcast twice, with an API key
#                        (shardcast-key) and with a subscription token per
#                        subscriber scoped to its topic (shardcast-token),
#                        and their ratio
#
# The workloads of docs/benchmarks.md:
#   scripts/bench-sse.sh                                        # burst broadcast
#   SUBSCRIBERS=10000 TYPES=1000 EVENTS=100000 RATE=20000 PUBLISHERS=16 \
#     scripts/bench-sse.sh                                      # many topics
#   SUBSCRIBERS=10000 EVENTS=2000 PUBLISHERS=1 SERIAL=1 scripts/bench-sse.sh  # one at a time
# Needs nginx with nchan (apt-get install nginx libnginx-mod-nchan); without
# it shardcast runs alone and the script says so.
#
#   scripts/bench-sse.sh
#   SUBSCRIBERS=200 EVENTS=20 RUNS=1 scripts/bench-sse.sh     # smoke
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
SUBSCRIBERS=${SUBSCRIBERS:-"1000 10000"}
EVENTS=${EVENTS:-100}
RATE=${RATE:-0}
RUNS=${RUNS:-3}
DRAIN_SECS=${DRAIN_SECS:-60}
TYPES=${TYPES:-0}
PUBLISHERS=${PUBLISHERS:-4}
SERIAL=${SERIAL:-}
TOKENS=${TOKENS:-}
BENCH_KEY=bench-api-key-0123456789
BENCH_SECRET=bench-token-secret-0123456789abcdef
extra=(--types "$TYPES" --publishers "$PUBLISHERS")
[ -n "$SERIAL" ] && extra+=(--serial)

if [ -z "${SHARDCAST_BIN:-}" ]; then
  (cd "$root" && cargo build --release --quiet)
  SHARDCAST_BIN=$root/target/release/shardcast
fi

# Both servers and the tool need a descriptor per connection.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d /tmp/shardcast-bench-sse.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -z "${KEEP_DIR:-}" ] && rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=scripts/lib.sh
source "$here/lib.sh"

NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
NCHAN_SO=$(ls /usr/lib/nginx/modules/ngx_nchan_module.so 2>/dev/null || true)
if [ ! -x "$NGINX" ] || [ -z "$NCHAN_SO" ]; then
  echo "bench-sse: nginx with nchan is not installed (apt-get install nginx libnginx-mod-nchan): shardcast runs alone"
  NCHAN_SO=
fi

run_shardcast() { # N run [key|token]: open (no auth), an API key, or a token per subscriber
  local dir=$work/sc-$1-$2-${3:-open} port name=shardcast auth=()
  port=$(free_port)
  mkdir -p "$dir"
  local env=(PORT="$port" DB_PATH="$dir/events.db" RATE_LIMIT=0 RUST_LOG=warn)
  case "${3:-}" in
    key) name=shardcast-key; auth=(--api-key "$BENCH_KEY")
         env+=(API_KEY="$BENCH_KEY" SHARDCAST_SSE_MAX_PER_KEY=0) ;;
    token) name=shardcast-token; auth=(--api-key "$BENCH_KEY" --token-secret "$BENCH_SECRET")
         env+=(API_KEY="$BENCH_KEY" SHARDCAST_AUTH_TOKEN_SECRET="$BENCH_SECRET") ;;
  esac
  env "${env[@]}" "$SHARDCAST_BIN" serve >"$dir/out" 2>"$dir/log" &
  local pid=$!
  wait_port "$port"
  local line
  line=$("$SHARDCAST_BIN" bench sse --addr "127.0.0.1:$port" -n "$1" -m "$EVENTS" --rate "$RATE" \
    --server-pid "$pid" --drain-secs "$DRAIN_SECS" "${extra[@]}" "${auth[@]}" | grep '^RESULT ' || true)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  [ -n "$line" ] || { echo "bench-sse: no result from $name at $1"; cat "$dir/log" >&2; exit 1; }
  echo "$name n=$1 ${line#RESULT }" | tee -a "$work/results"
}

run_nchan() { # N run
  local dir=$work/nchan-$1-$2 port
  port=$(free_port)
  mkdir -p "$dir/logs"
  cat >"$dir/nginx.conf" <<EOF
load_module $NCHAN_SO;
worker_processes 1;
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 19000; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$port;
    location = /pub/bench { nchan_publisher; nchan_channel_id bench; }
    location = /sub/bench { nchan_subscriber eventsource; nchan_channel_id bench; }
    location ~ ^/pub/bench/(\w+)\$ { nchan_publisher; nchan_channel_id \$1; }
    location ~ ^/sub/bench/(\w+)\$ { nchan_subscriber eventsource; nchan_channel_id \$1; }
  }
}
EOF
  "$NGINX" -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' 2>"$dir/stderr" &
  local master=$!
  wait_port "$port"
  # The worker holds the connections; measure its RSS.
  local worker
  for _ in $(seq 1 50); do
    worker=$(pgrep -P "$master" | head -1 || true)
    [ -n "$worker" ] && break
    sleep 0.05
  done
  local line
  line=$("$SHARDCAST_BIN" bench sse --target nchan --addr "127.0.0.1:$port" -n "$1" -m "$EVENTS" \
    --rate "$RATE" --server-pid "$worker" --drain-secs "$DRAIN_SECS" "${extra[@]}" | grep '^RESULT ' || true)
  kill "$master"; wait "$master" 2>/dev/null || true
  [ -n "$line" ] || { echo "bench-sse: no result from nchan at $1"; cat "$dir/stderr" "$dir/logs/error.log" >&2; exit 1; }
  echo "nchan n=$1 ${line#RESULT }" | tee -a "$work/results"
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) CPUs, $(uname -r); events=$EVENTS rate=$RATE runs=$RUNS types=$TYPES publishers=$PUBLISHERS serial=${SERIAL:-0} tokens=${TOKENS:-0} nofile=$(ulimit -n)"
for r in $(seq 1 "$RUNS"); do
  for n in $SUBSCRIBERS; do
    if [ -n "$TOKENS" ]; then
      run_shardcast "$n" "$r" key
      run_shardcast "$n" "$r" token
    else
      run_shardcast "$n" "$r"
    fi
    [ -n "$NCHAN_SO" ] && run_nchan "$n" "$r"
  done
done

echo "# medians of $RUNS runs"
awk '
  { key=$1" "$2; keys[key]=1; for (i=3;i<=NF;i++) { split($i,kv,"="); v[key, kv[1], ++c[key, kv[1]]] = kv[2] } }
  function med(key, f,   n, i, j, t, a) {
    n = c[key, f]; for (i=1;i<=n;i++) a[i] = v[key, f, i]
    for (i=1;i<=n;i++) for (j=i+1;j<=n;j++) if (a[j]+0 < a[i]+0) { t=a[i]; a[i]=a[j]; a[j]=t }
    return (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
  }
  END {
    for (key in keys) {
      printf "MEDIAN %s connections=%d delivery_ratio=%.4f deliveries_s=%.0f p50_us=%.0f p99_us=%.0f rss_per_conn_bytes=%.0f events_s=%.0f cpu_ns_per_delivery=%.0f\n",
        key, med(key,"connections"), med(key,"delivery_ratio"), med(key,"deliveries_s"),
        med(key,"p50_us"), med(key,"p99_us"), med(key,"rss_per_conn_bytes"), med(key,"events_s"),
        med(key,"cpu_ns_per_delivery")
      m[key] = med(key,"deliveries_s"); p[key] = med(key,"p99_us"); e[key] = med(key,"events_s")
    }
    for (key in keys) { split(key, kk, " "); if (kk[1] ~ /^shardcast/ && (("nchan " kk[2]) in keys))
      printf "RATIO %s deliveries_s %s/nchan=%.2f p99 %s/nchan=%.2f\n", kk[2], kk[1], m[key] / m["nchan " kk[2]], kk[1], p[key] / p["nchan " kk[2]] }
    for (key in keys) { split(key, kk, " "); if (kk[1] == "shardcast-token" && (("shardcast-key " kk[2]) in keys))
      printf "RATIO %s deliveries_s token/key=%.3f events_s token/key=%.3f p99 token/key=%.2f\n", kk[2], m[key] / m["shardcast-key " kk[2]], e[key] / e["shardcast-key " kk[2]], p[key] / p["shardcast-key " kk[2]] }
  }' "$work/results" | sort
