#!/usr/bin/env bash
# bench/nbd.sh: ferry's NBD write path (journaling on) against qemu-nbd and
# nbdkit (file plugin), side by side in one run, alternating servers within
# each workload. Each server gets a fresh sparse file of the same size on the
# same file system, and fio's nbd engine drives all three over unix sockets.
#
#   BENCH_SECONDS  seconds per workload and server (default 20)
#   BENCH_ROUNDS   rounds, each running every server once in a rotating
#                  order; each figure is the median over the rounds
#                  (default 3: single runs here vary by up to 2x)
#   BENCH_WARMUP   seconds of an unrecorded run of each workload against
#                  nbdkit before its rounds (default 20; 0: none)
#   BENCH_SIZE     size of the exported file (default 2G)
#   BENCH_DIR      scratch directory (default /var/tmp/ferry-bench)
#   FERRY          ferry binary (default: built into $BENCH_DIR)
#
# Prints a table (IOPS, p99 latency) and, last:
#   RESULT nbd randwrite4k=<r> flush4k=<r> write1m=<r>
# where r = ferry IOPS / max(qemu-nbd IOPS, nbdkit IOPS).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-20}
ROUNDS=${BENCH_ROUNDS:-3}
WARMUP=${BENCH_WARMUP:-20}
SIZE=${BENCH_SIZE:-2G}
DIR=${BENCH_DIR:-/var/tmp/ferry-bench}
for t in fio qemu-nbd nbdkit jq; do
	command -v "$t" >/dev/null || { echo "bench/nbd.sh: $t missing: run 'make deps'" >&2; exit 1; }
done
rm -rf "$DIR"; mkdir -p "$DIR"
FERRY=${FERRY:-$DIR/ferry}
[ -x "$FERRY" ] || go build -o "$FERRY" ./cmd/ferry
SOCK=$DIR/nbd.sock
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; true; }
trap cleanup EXIT

wait_sock() {
	for _ in $(seq 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
	echo "server did not create $SOCK" >&2; return 1
}

start() { # server
	rm -rf "$DIR/data" "$SOCK"; mkdir -p "$DIR/data"
	# Every server starts on an empty page cache: what ran before (a build,
	# the previous server) otherwise decides how fast pages come; nbdkit's
	# write1m ran at 701/s after a test run left 11 GB cached, 2,649/s
	# after dropping it (docs/benchmarks.md).
	sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
	case $1 in
	ferry)
		"$FERRY" serve --dir "$DIR/data/group" --socket "$SOCK" --create "bench=$SIZE" >"$DIR/ferry.log" 2>&1 &
		pid=$!; URI="nbd+unix:///bench?socket=$SOCK" ;;
	qemu-nbd)
		truncate -s "$SIZE" "$DIR/data/img"
		qemu-nbd -t -f raw -k "$SOCK" -e 4 "$DIR/data/img" >"$DIR/qemu-nbd.log" 2>&1 &
		pid=$!; URI="nbd+unix:///?socket=$SOCK" ;;
	nbdkit)
		truncate -s "$SIZE" "$DIR/data/img"
		nbdkit -f -U "$SOCK" file "$DIR/data/img" >"$DIR/nbdkit.log" 2>&1 &
		pid=$!; URI="nbd+unix:///?socket=$SOCK" ;;
	esac
	wait_sock
}

stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; sync; }

run_fio() { # workload [seconds] -> "iops p99_us"
	local args secs=${2:-$SECS}
	case $1 in
	randwrite4k) args="--rw=randwrite --bs=4k --iodepth=16" ;;
	flush4k) args="--rw=randwrite --bs=4k --iodepth=16 --fsync=32" ;;
	write1m) args="--rw=write --bs=1M --iodepth=8" ;;
	esac
	# shellcheck disable=SC2086
	fio --name="$1" --ioengine=nbd --uri="$URI" $args --size="$SIZE" \
		--time_based --runtime="$secs" --ramp_time=1 --output-format=json --output="$DIR/$1.json" >/dev/null
	jq -r '.jobs[0].write | "\(.iops) \((.clat_ns.percentile["99.000000"] // 0) / 1000)"' "$DIR/$1.json"
}

declare -A IOPS P99 RUNS
servers=(ferry qemu-nbd nbdkit)
for w in randwrite4k flush4k write1m; do
	# The first run of a workload that touches much memory after one that
	# touched little pays for it: on this VM the first write1m after
	# flush4k ran at 169-217 writes/s whichever server it was, the next
	# at 1,850-2,330 (docs/benchmarks.md, sixth day), and the rotation
	# below always puts ferry first. An unrecorded run first.
	if ((WARMUP > 0)); then
		start nbdkit
		read -r i p < <(run_fio "$w" "$WARMUP")
		stop
		printf '  %-12s %-9s warm-up %8.0f IOPS  (not counted)\n' "$w" nbdkit "$i" >&2
	fi
	for ((round = 0; round < ROUNDS; round++)); do
		for k in 0 1 2; do
			s=${servers[$(((k + round) % 3))]}
			start "$s"
			read -r i p < <(run_fio "$w")
			stop
			RUNS[$w,$s]+="$i $p"$'\n'
			printf '  %-12s %-9s round %d %10.0f IOPS  p99 %8.0f us\n' "$w" "$s" "$round" "$i" "$p" >&2
		done
	done
	for s in "${servers[@]}"; do # the median run by IOPS
		read -r i p < <(printf '%s' "${RUNS[$w,$s]}" | sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}')
		IOPS[$w,$s]=$i; P99[$w,$s]=$p
	done
done

echo
printf '%-12s' workload; for s in "${servers[@]}"; do printf ' %18s' "$s IOPS/p99us"; done; echo
r=()
for w in randwrite4k flush4k write1m; do
	printf '%-12s' "$w"
	for s in "${servers[@]}"; do printf ' %11.0f/%6.0f' "${IOPS[$w,$s]}" "${P99[$w,$s]}"; done
	echo
	r+=("$w=$(jq -n "${IOPS[$w,ferry]} / ([${IOPS[$w,qemu-nbd]}, ${IOPS[$w,nbdkit]}] | max) * 100 | round / 100")")
done
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), fs $(df -T "$DIR" | awk 'NR==2 {print $2}'), median of ${ROUNDS} runs of ${SECS}s"
echo "RESULT nbd ${r[*]}"
