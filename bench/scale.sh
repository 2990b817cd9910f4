#!/usr/bin/env bash
# bench/scale.sh: the DR lifecycle at three disk sizes, to show what grows
# with the disk and what does not. For each size (sparse, half filled with
# data, an ext4 file system the test guest's workload writes records to):
#
#   initial sync   the protect job's initial replication (from asking the
#                  source to replicate until the recovery site holds every
#                  entry, durably) and, in the same run, nbdcopy reading the
#                  same export into a file: ratio nbdcopy_s / ferry_s
#                  (1.0: as fast as nbdcopy)
#   failover       the planned failover job's own time, excluding the
#                  source's shutdown and the guest's boot
#   commit         the commit job end to end, while the VM's HTTP is polled
#                  every 100 ms: the longest run of unanswered polls
#   reprotect      the job's time and the bytes it sent
#
#   SIZES       GiB, default "1 4 16"
#   BENCH_DIR   scratch directory (default /var/tmp/ferry-bench-scale)
#   FERRY       ferry binary (default: built into $BENCH_DIR)
#
# Last line: RESULT scale sync_vs_nbdcopy=<worst> commit_s=<largest>
#            commit_downtime_s=<largest> failover_s=<largest>
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-1 4 16}
DIR=${BENCH_DIR:-/var/tmp/ferry-bench-scale}
for t in nbdcopy qemu-img mkfs.ext4 jq curl bc; do
	command -v "$t" >/dev/null || { echo "bench/scale.sh: $t missing: run 'make deps'" >&2; exit 1; }
done
G=$(realpath build/guest)
[ -f "$G/vmlinuz" ] || { echo "bench/scale.sh: no test guest: run 'make guest'" >&2; exit 1; }
rm -rf "$DIR"; mkdir -p "$DIR"
FERRY=${FERRY:-$DIR/ferry}
[ -x "$FERRY" ] || go build -o "$FERRY" ./cmd/ferry
WEB_EAST=127.0.0.1:18181 WEB_WEST=127.0.0.1:18182
upid=""
cleanup() { [ -z "$upid" ] || { kill "$upid" 2>/dev/null; wait "$upid" 2>/dev/null; }; true; }
trap cleanup EXIT
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
web() { curl -s -m 2 "http://$1/" 2>/dev/null; }
until_true() { # timeout-seconds what command...
	local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
	until "$@"; do
		[ "$(date +%s)" -lt "$deadline" ] || { echo "timed out waiting for $what" >&2; return 1; }
		sleep 0.1
	done
}
answers() { web "$1" | jq -e .last_durable >/dev/null 2>&1; }
last_job() { "$FERRY" --output json jobs | jq -r '.[0].id'; }
job_messages() { "$FERRY" --output json job show "$(last_job)" | jq -r '.steps[].messages[]?'; }
secs_of() { # "took 1.2s" / "took 15ms" in the job's messages -> seconds
	job_messages | sed -n "s/.*$1 took \([0-9.]*\)\(m\?s\).*/\1 \2/p" | tail -1 |
		awk '{ print ($2 == "ms") ? $1 / 1000 : $1 }'
}

worst_sync="" max_commit=0 max_down=0 max_fo=0
printf '%-6s %10s %10s %8s %10s %10s %12s %12s %14s\n' size_gib sync_s nbdcopy_s ratio failover_s commit_s downtime_s reprotect_s reprotect_mb >"$DIR/table"
for gib in $SIZES; do
	echo "== ${gib} GiB" >&2
	UP=$DIR/up$gib
	mkdir -p "$UP"
	"$FERRY" up --dir "$UP" >"$UP/up.out" 2>&1 &
	upid=$!
	until_true 60 "ferry up" grep -q '^token:' "$UP/up.out"
	export FERRY_VAULT FERRY_TOKEN FERRY_CA
	FERRY_VAULT=$(sed -n 's/^vault: //p' "$UP/up.out")
	FERRY_TOKEN=$(sed -n 's/^token: //p' "$UP/up.out")
	FERRY_CA=$UP/pki/ca.crt
	"$FERRY" vm define web --site east --disk "vda=${gib}G" --memory 256 --kernel "$G/vmlinuz" --initrd "$G/initrd.img" \
		--append "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100" \
		--forward "east=$WEB_EAST,west=$WEB_WEST" --guest-port 80 >/dev/null
	# Half the disk is one file of data (a random 64 MiB block repeated:
	# nothing in ferry or nbdcopy dedupes), in an ext4 file system.
	mkdir -p "$UP/fill"
	head -c 64M /dev/urandom >"$UP/block"
	for _ in $(seq $((gib * 1024 / 2 / 64))); do cat "$UP/block"; done >"$UP/fill/data"
	rm "$UP/block"
	truncate -s "${gib}G" "$UP/fs.img"
	mkfs.ext4 -q -F -d "$UP/fill" "$UP/fs.img"
	rm -rf "$UP/fill"
	qemu-img convert -n -f raw -O raw -t none "$UP/fs.img" "nbd+unix:///web/vda?socket=$UP/east/nbd.sock"
	rm "$UP/fs.img"
	"$FERRY" vm start web >/dev/null
	until_true 120 "the VM at east" answers $WEB_EAST

	"$FERRY" site network add west prod-west --kind production --subnet 10.20.0.0/24 >/dev/null
	# Both copies start from the same state: nothing dirty, nothing cached
	# (the fill above leaves a gigabyte or more of write-back that would
	# otherwise land on the first copy only).
	sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
	"$FERRY" protect web --to west --network nic0=prod-west --wait >/dev/null
	# The job's own measure, from asking the source to replicate to the
	# recovery site holding everything (not the job's set-up around it).
	sync_s=$(printf %.2f "$(secs_of "initial replication")")
	sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
	t=$(now)
	nbdcopy "nbd+unix:///web/vda?socket=$UP/east/nbd.sock" "$UP/copy.img"
	nbdcopy_s=$(printf %.2f "$(since "$t")")
	rm -f "$UP/copy.img"
	ratio=$(printf %.2f "$(echo "$nbdcopy_s / $sync_s" | bc -l)")

	until_true 60 "a recovery point" sh -c "[ \"\$('$FERRY' --output json points web 2>/dev/null | jq length)\" -gt 0 ]"
	"$FERRY" failover web --point latest --wait >/dev/null
	fo_s=$(secs_of failover)
	until_true 120 "the VM at west" answers $WEB_WEST

	# Commit, polled every 100 ms; the longest run of missed polls is the
	# downtime (0: every poll answered).
	: >"$UP/polls"
	( while [ ! -e "$UP/polls.stop" ]; do if answers $WEB_WEST; then echo ok; else echo miss; fi >>"$UP/polls"; sleep 0.1; done ) &
	poller=$!
	t=$(now)
	"$FERRY" commit web --wait >/dev/null
	commit_s=$(printf %.2f "$(since "$t")")
	touch "$UP/polls.stop"; wait $poller
	down=$(awk '$1 == "miss" { run++; if (run > max) max = run; next } { run = 0 } END { printf "%.1f", max * 0.1 }' "$UP/polls")

	t=$(now)
	"$FERRY" reprotect web --wait >/dev/null
	rp_s=$(printf %.2f "$(since "$t")")
	sent=$(job_messages | sed -n 's/.*sent \([0-9]*\) bytes for.*/\1/p' | tail -1)
	rp_mb=$(printf %.1f "$(echo "${sent:-0} / 1000000" | bc -l)")

	printf '%-6s %10s %10s %8s %10s %10s %12s %12s %14s\n' "$gib" "$sync_s" "$nbdcopy_s" "$ratio" "$fo_s" "$commit_s" "$down" "$rp_s" "$rp_mb" >>"$DIR/table"
	cat "$DIR/table" >&2
	if [ -z "$worst_sync" ] || [ "$(echo "$ratio < $worst_sync" | bc)" = 1 ]; then worst_sync=$ratio; fi
	[ "$(echo "$commit_s > $max_commit" | bc)" = 1 ] && max_commit=$commit_s
	[ "$(echo "$down > $max_down" | bc)" = 1 ] && max_down=$down
	[ "$(echo "${fo_s:-0} > $max_fo" | bc)" = 1 ] && max_fo=$fo_s
	kill "$upid"; wait "$upid" 2>/dev/null || true; upid=""
	rm -rf "$UP"
done
cat "$DIR/table"
echo "RESULT scale sync_vs_nbdcopy=$worst_sync commit_s=$max_commit commit_downtime_s=$max_down failover_s=$max_fo"
