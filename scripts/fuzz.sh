#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer through cargo-fuzz) of every target in
# fuzz/, SECONDS each (default 30): request heads, a live in-process server
# fed byte streams whole and split, chunked bodies, events, query strings, the TOML config,
# tenants.yaml and the cluster log's messages. Each target's oracle is in src/fuzzing.rs.
#
#   scripts/fuzz.sh            # 30 s per target (what .ci/run does)
#   scripts/fuzz.sh 600        # 10 minutes per target
#   scripts/fuzz.sh 600 events # one target
#
# New inputs go to a scratch corpus (the committed corpora in fuzz/corpus and
# fuzz/regressions are read, not written); a failing input is kept in
# fuzz/artifacts/<target>/ and the script exits non-zero. Add it to
# fuzz/regressions/<target>/ with the fix: `cargo test` replays those.
#
# Needs cargo-fuzz (installed here when missing). It builds on the stable
# toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags, and no
# sanitizer is used (-s none: safe Rust; debug assertions and overflow
# checks are on).
set -euo pipefail
each=${1:-30}
only=${2:-}
cd "$(dirname "$0")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none
targets=${only:-$(cargo fuzz list)}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=0
for t in $targets; do
  mkdir -p "$scratch/$t" "corpus/$t" "regressions/$t"
  log="$scratch/$t.log"
  if cargo fuzz run -s none "$t" "$scratch/$t" "corpus/$t" "regressions/$t" -- \
      -max_total_time="$each" -print_final_stats=1 >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    echo "fuzz $t: ${each}s, $runs runs, no failure"
  else
    echo "fuzz $t: FAILED" >&2
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' -A3 "$log" | head -30 >&2
    failed=1
  fi
done
exit $failed
