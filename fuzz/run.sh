#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 15) on stable Rust (cargo-fuzz with `-s none`:
# no sanitizer, which needs nightly; libFuzzer's coverage guidance still works). Each target starts
# from its committed corpus in fuzz/corpus/<target>; a crash fails the script and leaves its
# input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-15}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build -s none
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  echo "fuzz: $target for ${seconds}s"
  log="$(mktemp)"
  status=0
  cargo fuzz run -s none "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=256 >"$log" 2>&1 || status=$?
  grep -E "^Done|ERROR|panicked|SUMMARY" "$log" || true
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $target failed (exit $status):" >&2
    tail -n 30 "$log" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
  if [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
    echo "fuzz: $target found a crash: $(ls "artifacts/$target")" >&2
    exit 1
  fi
done
