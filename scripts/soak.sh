#!/usr/bin/env bash
# Soak: a fresh shardcast (defaults, durable) holding SUBSCRIBERS SSE
# subscribers (half following everything, half one of ten types) under
# mixed ingestion (single POSTs, batches of 10, page reads) for SECONDS.
# `shardcast bench soak` checks every delivery (no position lost, repeated
# or out of order; every acknowledged event reaches every subscriber that
# follows it) and samples the server's anonymous memory and descriptors
# every SAMPLE_SECS. It fails on any lost or duplicated position, failed
# request, dropped subscriber, anonymous memory growing more than 32 MiB +
# 10% past the first sample, or descriptors growing by more than 16. Not
# part of CI (it runs for minutes); results are in docs/benchmarks.md.
#
# Settings (environment):
#   SUBSCRIBERS=10000  SECONDS_RUN=600  SINGLES=10 (/s)  BATCHES=1 (/s)
#   READS=5 (/s)  SAMPLE_SECS=10  SHARDCAST_BIN=path (skip the build)
#
#   scripts/soak.sh                                   # 10 minutes, 10,000 subscribers
#   SUBSCRIBERS=500 SECONDS_RUN=30 scripts/soak.sh   # a quick look
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
SUBSCRIBERS=${SUBSCRIBERS:-10000}
SECONDS_RUN=${SECONDS_RUN:-600}
SINGLES=${SINGLES:-10}
BATCHES=${BATCHES:-1}
READS=${READS:-5}
SAMPLE_SECS=${SAMPLE_SECS:-10}

if [ -z "${SHARDCAST_BIN:-}" ]; then
  (cd "$root" && cargo build --release --quiet)
  SHARDCAST_BIN=$root/target/release/shardcast
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# shellcheck source=scripts/lib.sh
source "$here/lib.sh"
work=$(mktemp -d /tmp/shardcast-soak.XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -z "${KEEP_DIR:-}" ] && rm -rf "$work"
}
trap cleanup EXIT

port=$(free_port)
PORT=$port DB_PATH=$work/events.db RATE_LIMIT=0 RUST_LOG=warn \
  "$SHARDCAST_BIN" serve >"$work/server.out" 2>"$work/server.err" &
pid=$!
wait_port "$port" "$work/server.err"
echo "soak: $SUBSCRIBERS subscribers, ${SECONDS_RUN}s, $SINGLES singles/s + $BATCHES batches/s of 10 + $READS reads/s; $(date -u +%FT%TZ)"
status=0
"$SHARDCAST_BIN" bench soak --addr "127.0.0.1:$port" --server-pid "$pid" \
  -n "$SUBSCRIBERS" --seconds "$SECONDS_RUN" --singles "$SINGLES" \
  --batches "$BATCHES" --reads "$READS" --sample-secs "$SAMPLE_SECS" || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
  echo "soak: the server died" >&2
  cat "$work/server.err" >&2
  exit 1
fi
grep -E 'ERROR|panic' "$work/server.err" >&2 && status=1
exit $status
