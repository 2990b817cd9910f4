#!/usr/bin/env bash
# bench/replication.sh: replication between two ferry agents over mutual
# TLS on loopback, driven by fio (nbd engine) on the source export.
#
#   1. full speed (1M sequential writes, QD8): sustained churn replicated,
#      measured as bytes the recovery site made durable per second;
#   2. fio --rate=50m: RPO sampled every 100 ms from the source agent's API;
#   3. view open time over 1 GiB and over 8 GiB of journal at the recovery
#      site (the time of the API call that opens and exports the view).
#
#   BENCH_SECONDS  seconds for phases 1 and 2 (default 30)
#   BENCH_DIR      scratch directory (default /var/tmp/ferry-bench-repl)
#   FERRY          ferry binary (default: built into $BENCH_DIR)
#
# Last line: RESULT replication churn_mbps=.. rpo_p99_ms=.. rpo_max_ms=.. view_open_ms=..
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-30}
DIR=${BENCH_DIR:-/var/tmp/ferry-bench-repl}
for t in fio jq curl; do
	command -v "$t" >/dev/null || { echo "bench/replication.sh: $t missing: run 'make deps'" >&2; exit 1; }
done
rm -rf "$DIR"; mkdir -p "$DIR"
FERRY=${FERRY:-$DIR/ferry}
[ -x "$FERRY" ] || go build -o "$FERRY" ./cmd/ferry
PKI=$DIR/pki
"$FERRY" ca init --pki "$PKI" >/dev/null
for n in site/siteA site/siteB operator/operator; do "$FERRY" ca issue --pki "$PKI" --role "${n%/*}" "${n#*/}" >/dev/null; done
PA=127.0.0.1:17411 PB=127.0.0.1:17412
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$FERRY" agent run --dir "$DIR/a" --name siteA --listen $PA --pki "$PKI" >"$DIR/a.log" 2>&1 & pids+=($!)
"$FERRY" agent run --dir "$DIR/b" --name siteB --listen $PB --pki "$PKI" >"$DIR/b.log" 2>&1 & pids+=($!)
api() { # agent-addr method path [json]
	curl -sS --fail-with-body --cacert "$PKI/ca.crt" --cert "$PKI/operator.crt" --key "$PKI/operator.key" \
		-X "$2" ${4:+-H 'Content-Type: application/json' -d "$4"} "https://$1$3"
}
for _ in $(seq 100); do api $PA GET /v1/status >/dev/null 2>&1 && api $PB GET /v1/status >/dev/null 2>&1 && break; sleep 0.1; done
api $PA POST /v1/groups '{"name":"vm1","disks":[{"name":"vda","size":4294967296}]}' >/dev/null
api $PB PUT /v1/replicas/vm1/source "{\"source\":\"siteA\"}" >/dev/null
api $PA POST /v1/groups/vm1/replication "{\"peer_addr\":\"$PB\",\"peer_name\":\"siteB\"}" >/dev/null
URI="nbd+unix:///vm1/vda?socket=$DIR/a/nbd.sock"
status() { api $PA GET /v1/status | jq -c '.groups[0].replication'; }
for _ in $(seq 600); do [ "$(status | jq -r .state)" = streaming ] && break; sleep 0.1; done
rbytes() { api $PB GET /v1/status | jq '[.replicas[].journal_bytes] | add // 0'; }
drain() {
	for _ in $(seq 1200); do
		s=$(api $PA GET /v1/status)
		[ "$(jq '.groups[0].replication.acked_seq == .groups[0].last_seq' <<<"$s")" = true ] && return 0
		sleep 0.1
	done
	echo "replication did not drain" >&2; return 1
}

echo "== phase 1: full speed, ${SECS}s" >&2
b0=$(rbytes); t0=$(date +%s.%N)
fio --name=full --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size=2G \
	--time_based --runtime="$SECS" --output-format=json --output="$DIR/full.json" >/dev/null
t1=$(date +%s.%N); b1=$(rbytes)
drain; t2=$(date +%s.%N); b2=$(rbytes)
fio_mbps=$(jq '.jobs[0].write.bw_bytes / 1e6' "$DIR/full.json")
# Replicated churn: what the recovery site made durable while fio ran,
# and (to be fair to a lagging link) including the drain after it.
churn=$(echo "($b2 - $b0) / ($t2 - $t0) / 1000000" | bc -l)
printf '   fio wrote %.1f MB/s; recovery site received %.1f MB/s during the run, %.1f MB/s including a %.2fs drain\n' \
	"$fio_mbps" "$(echo "($b1 - $b0) / ($t1 - $t0) / 1000000" | bc -l)" "$churn" "$(echo "$t2 - $t1" | bc -l)" >&2

# Phase 1 leaves gigabytes of dirty pages when the source journals them
# without fsync (soft checkpoints, docs/architecture.md); both sites share
# this machine's disk, and their write-back would otherwise land on the
# recovery site's commits in phase 2. Two machines do not share a disk.
sync
echo "== phase 2: fio --rate=50m, RPO sampled every 100 ms, ${SECS}s" >&2
fio --name=rate --ioengine=nbd --uri="$URI" --rw=randwrite --bs=64k --iodepth=4 --size=2G --rate=50m \
	--time_based --runtime="$SECS" --output-format=json --output="$DIR/rate.json" >/dev/null &
fpid=$!
: >"$DIR/rpo.txt"
sleep 1
# One curl per sample, parsed afterwards: the sampler itself must not be
# what limits the rate (about 10 samples a second).
while kill -0 $fpid 2>/dev/null; do
	api $PA GET /v1/status >>"$DIR/status.jsonl" 2>/dev/null && echo >>"$DIR/status.jsonl" || true
	sleep 0.1
done
wait $fpid
jq -c 'select(.groups != null) | .groups[0].replication.rpo_seconds * 1000' "$DIR/status.jsonl" >"$DIR/rpo.txt"
n=$(wc -l <"$DIR/rpo.txt")
rpo_p99=$(sort -n "$DIR/rpo.txt" | awk -v n="$n" 'NR==int(n*0.99+0.999) {print; exit}')
rpo_max=$(sort -n "$DIR/rpo.txt" | tail -1)
printf '   %d samples, RPO p99 %.1f ms, max %.1f ms, fio %.1f MB/s\n' "$n" "$rpo_p99" "$rpo_max" "$(jq '.jobs[0].write.bw_bytes/1e6' "$DIR/rate.json")" >&2
drain

open_view() { # -> milliseconds for the API call opening a view at the newest point
	local t0 t1 id
	t0=$(date +%s%N)
	id=$(api $PB POST /v1/replicas/vm1/views '{"disk":"vda"}' | jq -r .id)
	t1=$(date +%s%N)
	api $PB DELETE "/v1/views/$id" >/dev/null
	echo "scale=1; ($t1 - $t0) / 1000000" | bc
}
fill_to() { # GiB of journal at the recovery site
	local want=$(($1 << 30)) have
	have=$(rbytes)
	if [ "$have" -lt "$want" ]; then
		fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size=4G \
			--io_size=$((want - have)) --output-format=json --output="$DIR/fill.json" >/dev/null
		drain
	fi
	sleep 0.5 # a point after the last write
}
echo "== phase 3: view open time" >&2
fill_to 1
v1=$(open_view); v1b=$(open_view)
fill_to 8
v8=$(open_view); v8b=$(open_view)
printf '   journal %.1f GiB: %s / %s ms; journal %.1f GiB: %s / %s ms\n' 1 "$v1" "$v1b" "$(echo "$(rbytes) / 2^30" | bc -l)" "$v8" "$v8b" >&2
view_ms=$(printf '%s\n%s\n' "$v8" "$v8b" | sort -n | tail -1)

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), TLS 1.3 on loopback, ${SECS}s phases"
printf 'RESULT replication churn_mbps=%.0f rpo_p99_ms=%.0f rpo_max_ms=%.0f view_open_ms=%.1f\n' "$churn" "$rpo_p99" "$rpo_max" "$view_ms"
