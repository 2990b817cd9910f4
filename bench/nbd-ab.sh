#!/usr/bin/env bash
# bench/nbd-ab.sh: A/B runs of ferry's NBD write path, for experiments.
# Two ferry commands (a build, or a wrapper script that sets an
# environment variable first) and optionally nbdkit serve a fresh 2 GiB
# file in turn, one fio job each, alternating within every round; the
# medians say which is faster. bench/nbd.sh is the benchmark of record;
# this is the quick, alternating comparison its tuning log quotes.
#
#   bench/nbd-ab.sh ROUNDS WORKLOAD FERRY_A FERRY_B [nbdkit]
#
#   WORKLOAD      randwrite4k, flush4k or write1m (as in bench/nbd.sh)
#   BENCH_SECONDS seconds per run (default 10)
#   BENCH_DIR     scratch directory (default /var/tmp/ferry-ab)
#
# Prints every run's writes/s and, last:
#   RESULT nbd-ab <workload> a=<median> b=<median> [nbdkit=<median>]
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,16p' "$0" >&2; exit 2; }
ROUNDS=$1 W=$2 A=$3 B=$4 K=${5:-}
SECS=${BENCH_SECONDS:-10}
DIR=${BENCH_DIR:-/var/tmp/ferry-ab}
SOCK=$DIR/nbd.sock
case $W in
randwrite4k) ARGS="--rw=randwrite --bs=4k --iodepth=16" ;;
flush4k) ARGS="--rw=randwrite --bs=4k --iodepth=16 --fsync=32" ;;
write1m) ARGS="--rw=write --bs=1M --iodepth=8" ;;
*) echo "bench/nbd-ab.sh: unknown workload $W" >&2; exit 2 ;;
esac
for t in fio nbdkit jq; do
	command -v "$t" >/dev/null || { echo "bench/nbd-ab.sh: $t missing: run 'make deps'" >&2; exit 1; }
done
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$DIR"; true; }
trap cleanup EXIT

one() { # server (a ferry command, or "nbdkit") -> writes/s
	rm -rf "$DIR"; mkdir -p "$DIR/data"
	sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true # as bench/nbd.sh
	if [ "$1" = nbdkit ]; then
		truncate -s 2G "$DIR/data/img"
		nbdkit -f -U "$SOCK" file "$DIR/data/img" >"$DIR/server.log" 2>&1 &
		pid=$!; uri="nbd+unix:///?socket=$SOCK"
	else
		"$1" serve --dir "$DIR/data/group" --socket "$SOCK" --create bench=2G >"$DIR/server.log" 2>&1 &
		pid=$!; uri="nbd+unix:///bench?socket=$SOCK"
	fi
	for _ in $(seq 200); do [ -S "$SOCK" ] && break; sleep 0.05; done
	[ -S "$SOCK" ] || { echo "server $1 did not listen: $(cat "$DIR/server.log")" >&2; exit 1; }
	# shellcheck disable=SC2086
	fio --name="$W" --ioengine=nbd --uri="$uri" $ARGS --size=2G --time_based --runtime="$SECS" \
		--ramp_time=1 --output-format=json --output="$DIR/fio.json" >/dev/null
	jq -r '.jobs[0].write.iops | floor' "$DIR/fio.json"
	kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; sync
}

med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ra=() rb=() rk=()
for ((i = 1; i <= ROUNDS; i++)); do
	ra+=("$(one "$A")"); rb+=("$(one "$B")")
	[ -n "$K" ] && rk+=("$(one nbdkit)")
	echo "round $i: a=${ra[-1]} b=${rb[-1]}${K:+ nbdkit=${rk[-1]:-}}" >&2
done
echo "RESULT nbd-ab $W a=$(med "${ra[@]}") b=$(med "${rb[@]}")${K:+ nbdkit=$(med "${rk[@]}")}"
