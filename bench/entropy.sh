#!/usr/bin/env bash
# bench/entropy.sh: the ransomware detector's cost. Classifying a 4 KiB
# block (entropy over its 2048 even bytes) on one core, in MB/s, next to
# two tools that also touch every byte, on the same data in the same run:
# sha256sum and zstd -1 (one thread). And what share of one core the
# detector needs at the 100 MB/s churn issue 19 names.
# Last line: RESULT entropy classify_mbps=… vs_sha256=… vs_zstd1=… core_share_at_100mbps=…
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# 256 MiB: half text-like (a repeated log), half random.
head -c 134217728 /dev/urandom >"$tmp/data"
yes "2026-12-02T10:42:00Z INFO GET /orders/42 served in 12 ms by replica west" | head -c 134217728 >>"$tmp/data" || true # yes ends on SIGPIPE
cat "$tmp/data" >/dev/null # in the page cache for every tool
mbps() { echo "scale=0; 268.435456 / $1" | bc; }
secs() { local s; s=$(date +%s.%N); "$@" >/dev/null; echo "$(date +%s.%N) - $s" | bc; }
sha=$(mbps "$(secs sha256sum "$tmp/data")")
zst=$(mbps "$(secs zstd -1 -T1 -c "$tmp/data")")
cls=$(go test -run '^$' -bench '^BenchmarkClassify$' -benchtime 2s ./internal/entropy | awk '/MB\/s/ {for (i = 1; i < NF; i++) if ($(i+1) == "MB/s") print int($i)}')
echo "classify $cls MB/s, sha256sum $sha MB/s, zstd -1 $zst MB/s (one core each)"
echo "RESULT entropy classify_mbps=$cls vs_sha256=$(echo "scale=2; $cls / $sha" | bc) vs_zstd1=$(echo "scale=2; $cls / $zst" | bc) core_share_at_100mbps=$(echo "scale=3; 100 / $cls" | bc)"
