#!/usr/bin/env bash
# bench/wan.sh: replication over an emulated WAN. The source and recovery
# agents run in two network namespaces joined by a user-space link
# (bench/wanlink: TUN devices, delay and loss per packet, since this
# kernel has no netem) whose rate tc tbf shapes on both ends.
#
# Cases:
#   100mbit-40ms        100 Mbit/s, 40 ms RTT
#   100mbit-40ms-loss1  the same with 1 % packet loss each way
#   1gbit-cap50         1 Gbit/s, 2 ms RTT, a 50 Mbit/s cap on the site pair
#
# Per case:
#   copy     initial copy of a 1 GiB disk holding the mixed data set (an
#            ext4 file system with Go sources and Python: text; programs
#            from /usr/bin: binary; 100 MiB of random bytes), timed until
#            streaming, with its compression ratio;
#   full     fio writing random bytes at twice the link (or cap) rate,
#            then the drain: payload throughput, wire throughput, link
#            utilization (payload / link rate);
#   rpo      the mixed data set written at half the link (or cap) rate,
#            the RPO sampled every 100 ms: p50, p99, compression ratio;
#   cap      adherence: the most the source sent in any 10 s window
#            (its TUN device's counters, so IP and TCP headers included),
#            over the cap (capped case only).
#
#   BENCH_SECONDS  seconds of the full and rpo phases (default 20)
#   BENCH_CASES    cases to run (default: all three)
#   BENCH_DIR      scratch directory (default /var/tmp/ferry-bench-wan)
#   FERRY          ferry binary (default: built into $BENCH_DIR)
#
# Last line:
#   RESULT wan cap_adherence=.. compression_ratio=.. rpo_p99_ms_40ms_rtt=.. link_utilization=..
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECONDS:-20}
CASES=${BENCH_CASES:-100mbit-40ms 100mbit-40ms-loss1 1gbit-cap50}
DIR=${BENCH_DIR:-/var/tmp/ferry-bench-wan}
[ "$(id -u)" = 0 ] || { echo "bench/wan.sh: needs root (network namespaces, TUN devices)" >&2; exit 1; }
for t in fio jq curl nbdcopy mke2fs pv tc; do
	command -v "$t" >/dev/null || { echo "bench/wan.sh: $t missing: run 'make deps'" >&2; exit 1; }
done
rm -rf "$DIR"; mkdir -p "$DIR"
FERRY=${FERRY:-$DIR/ferry}
[ -x "$FERRY" ] || go build -o "$FERRY" ./cmd/ferry
go build -o "$DIR/wanlink" ./bench/wanlink
PKI=$DIR/pki
"$FERRY" ca init --pki "$PKI" >/dev/null
for n in site/siteA site/siteB operator/operator; do "$FERRY" ca issue --pki "$PKI" --role "${n%/*}" "${n#*/}" >/dev/null; done
NE=ferry-wan-e NW=ferry-wan-w
AE=10.77.0.1 AW=10.77.0.2
PA=17411 PB=17412
pids=()
stop_all() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	pids=()
	ip netns del $NE 2>/dev/null || true
	ip netns del $NW 2>/dev/null || true
}
trap stop_all EXIT

# The mixed data set, once: a 1 GiB ext4 image.
echo "== building the mixed data set" >&2
src=$DIR/mixsrc
mkdir -p "$src/bin"
cp -r "$(go env GOROOT)/src" "$src/go"
cp -r /usr/lib/python3 "$src/python3"
find /usr/bin -maxdepth 1 -type f -size +100k | head -400 | xargs -I{} cp {} "$src/bin/"
head -c 100M /dev/urandom >"$src/random.bin"
mke2fs -q -t ext4 -d "$src" "$DIR/mixed.img" 1G
rm -rf "$src"
used=$(du -sm --apparent-size "$DIR/mixed.img" | cut -f1)
echo "   1 GiB image, $(du -sm "$DIR/mixed.img" | cut -f1) MiB allocated" >&2

api() { # site method path [json]
	local ns addr port
	case $1 in siteA) ns=$NE addr=$AE port=$PA ;; siteB) ns=$NW addr=$AW port=$PB ;; esac
	ip netns exec "$ns" curl -sS --fail-with-body --cacert "$PKI/ca.crt" --cert "$PKI/operator.crt" --key "$PKI/operator.key" \
		--resolve "$1:$port:$addr" -X "$2" ${4:+-H 'Content-Type: application/json' -d "$4"} "https://$1:$port$3"
}
status() { api siteA GET /v1/status | jq -c '.groups[0].replication'; }
txbytes() { ip netns exec $NE cat /sys/class/net/wanE/statistics/tx_bytes; }
drain() {
	for _ in $(seq 3000); do
		[ "$(api siteA GET /v1/status | jq '.groups[0].replication.acked_seq == .groups[0].last_seq')" = true ] && return 0
		sleep 0.1
	done
	echo "replication did not drain" >&2; return 1
}
# The most bytes sent in any 10 s window of a file of "time bytes" lines
# taken every second, as a rate in bits per second.
max_window() {
	awk '{t[NR]=$1; b[NR]=$2} END {m=0; for (i=1;i<=NR;i++) for (j=i+1;j<=NR;j++) if (t[j]-t[i] >= 10) {r=(b[j]-b[i])*8/(t[j]-t[i]); if (r>m) m=r; break}; printf "%.0f\n", m}' "$1"
}

calc() { awk "BEGIN {printf \"%.6f\", $1}"; }
declare -A R
for c in $CASES; do
	case $c in
	100mbit-40ms) rate=100mbit bps=100000000 delay=20ms loss=0 cap=0 ;;
	100mbit-40ms-loss1) rate=100mbit bps=100000000 delay=20ms loss=0.01 cap=0 ;;
	1gbit-cap50) rate=1gbit bps=1000000000 delay=1ms loss=0 cap=50000000 ;;
	*) echo "unknown case $c" >&2; exit 1 ;;
	esac
	echo "== case $c: link $rate, one-way delay $delay, loss $loss, cap $cap bit/s" >&2
	ip netns add $NE; ip netns add $NW
	"$DIR/wanlink" -a wanE -b wanW -delay "$delay" -loss "$loss" >"$DIR/wanlink.out" 2>"$DIR/wanlink-$c.log" & pids+=($!)
	for _ in $(seq 100); do grep -q ready "$DIR/wanlink.out" 2>/dev/null && break; sleep 0.05; done
	ip link set wanE netns $NE; ip link set wanW netns $NW
	for x in "$NE wanE $AE" "$NW wanW $AW"; do
		set -- $x
		ip -n "$1" link set lo up
		ip -n "$1" addr add "$3/24" dev "$2"
		ip -n "$1" link set "$2" up
		# tbf: the link's rate; a queue of 50 ms, as a WAN router has
		tc -n "$1" qdisc add dev "$2" root tbf rate "$rate" burst 64kb latency 50ms
	done
	rm -rf "$DIR/a" "$DIR/b"
	ip netns exec $NE "$FERRY" agent run --dir "$DIR/a" --name siteA --listen $AE:$PA --pki "$PKI" >"$DIR/a-$c.log" 2>&1 & pids+=($!)
	ip netns exec $NW "$FERRY" agent run --dir "$DIR/b" --name siteB --listen $AW:$PB --pki "$PKI" >"$DIR/b-$c.log" 2>&1 & pids+=($!)
	for _ in $(seq 100); do api siteA GET /v1/status >/dev/null 2>&1 && api siteB GET /v1/status >/dev/null 2>&1 && break; sleep 0.1; done
	if [ "$cap" != 0 ]; then
		api siteA PUT /v1/bandwidth "{\"peers\":{\"siteB\":{\"bits_per_second\":$cap}}}" >/dev/null
	fi
	api siteA POST /v1/groups '{"name":"vm1","disks":[{"name":"vda","size":1073741824}]}' >/dev/null
	URI="nbd+unix:///vm1/vda?socket=$DIR/a/nbd.sock"
	nbdcopy "$DIR/mixed.img" "$URI"
	api siteB PUT /v1/replicas/vm1/source '{"source":"siteA"}' >/dev/null
	: >"$DIR/tx-$c.txt"
	( while :; do echo "$(date +%s.%N) $(txbytes)" >>"$DIR/tx-$c.txt"; sleep 1; done ) & sampler=$!
	t0=$(date +%s.%N)
	api siteA POST /v1/groups/vm1/replication "{\"peer_addr\":\"$AW:$PB\",\"peer_name\":\"siteB\"}" >/dev/null
	for _ in $(seq 6000); do [ "$(status | jq -r .state)" = streaming ] && break; sleep 0.1; done
	drain
	t1=$(date +%s.%N)
	s=$(status)
	copy_s=$(calc "$t1 - $t0")
	copy_ratio=$(jq '.payload_bytes / .wire_bytes' <<<"$s")
	printf '   copy: %.1f s, %.0f MB payload, %.0f MB wire, ratio %.2f\n' "$copy_s" \
		"$(jq '.payload_bytes/1e6' <<<"$s")" "$(jq '.wire_bytes/1e6' <<<"$s")" "$copy_ratio" >&2

	# full speed, random bytes: written at twice what the link carries,
	# then drained, so the link is saturated throughout
	limit=$([ "$cap" != 0 ] && echo "$cap" || echo "$bps")
	p0=$(jq .payload_bytes <<<"$s"); w0=$(jq .wire_bytes <<<"$s"); t0=$(date +%s.%N)
	fio --name=full --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=4 --size=1G --refill_buffers --rate=$((limit / 4)) \
		--time_based --runtime="$SECS" --output-format=json --output="$DIR/full.json" >/dev/null
	drain
	t1=$(date +%s.%N); s=$(status)
	p1=$(jq .payload_bytes <<<"$s"); w1=$(jq .wire_bytes <<<"$s")
	payload_bps=$(calc "($p1 - $p0) * 8 / ($t1 - $t0)")
	wire_bps=$(calc "($w1 - $w0) * 8 / ($t1 - $t0)")
	util=$(calc "$payload_bps / $limit")
	printf '   full: payload %.1f Mbit/s, wire %.1f Mbit/s, utilization %.2f of %s\n' \
		"$(calc "$payload_bps/1e6")" "$(calc "$wire_bps/1e6")" "$util" "$limit" >&2

	# rpo at half the rate, the mixed data set
	churn=$((limit / 16)) # bytes/s: half the rate
	p0=$p1; w0=$w1
	: >"$DIR/status.jsonl"
	( pv -q -L "$churn" "$DIR/mixed.img" | nbdcopy -- - "$URI" ) & wpid=$!
	sleep 1
	end=$(($(date +%s) + SECS))
	while [ "$(date +%s)" -lt "$end" ]; do
		api siteA GET /v1/status >>"$DIR/status.jsonl" 2>/dev/null && echo >>"$DIR/status.jsonl" || true
		sleep 0.1
	done
	pkill -P $wpid pv 2>/dev/null || true
	kill $wpid 2>/dev/null || true
	wait $wpid 2>/dev/null || true
	drain
	s=$(status)
	p1=$(jq .payload_bytes <<<"$s"); w1=$(jq .wire_bytes <<<"$s")
	ratio=$(calc "($p1 - $p0) / ($w1 - $w0)")
	jq -c 'select(.groups != null) | .groups[0].replication.rpo_seconds * 1000' "$DIR/status.jsonl" | sort -n >"$DIR/rpo-$c.txt"
	n=$(wc -l <"$DIR/rpo-$c.txt")
	p50=$(awk -v n="$n" 'NR==int(n*0.5+0.999) {print; exit}' "$DIR/rpo-$c.txt")
	p99=$(awk -v n="$n" 'NR==int(n*0.99+0.999) {print; exit}' "$DIR/rpo-$c.txt")
	printf '   rpo: churn %.1f Mbit/s of the mixed set, %d samples, p50 %.0f ms, p99 %.0f ms, compression %.2f\n' \
		"$(calc "$churn*8/1e6")" "$n" "$p50" "$p99" "$ratio" >&2

	kill $sampler 2>/dev/null || true
	adherence=0
	if [ "$cap" != 0 ]; then
		mw=$(max_window "$DIR/tx-$c.txt")
		adherence=$(calc "$mw / $cap")
		printf '   cap: most in a 10 s window %.1f Mbit/s on the wire, %.3f of the cap\n' "$(calc "$mw/1e6")" "$adherence" >&2
	fi
	R[$c]="$copy_s $copy_ratio $payload_bps $wire_bps $util $p50 $p99 $ratio $adherence"
	stop_all
done

echo
printf '%-20s %8s %7s %10s %10s %6s %8s %8s %6s %6s\n' case copy_s c_ratio payload_Mb wire_Mb util rpo_p50 rpo_p99 ratio cap
for c in $CASES; do
	read -r cs cr pb wb u p50 p99 r a <<<"${R[$c]}"
	printf '%-20s %8.1f %7.2f %10.1f %10.1f %6.2f %8.0f %8.0f %6.2f %6.3f\n' "$c" "$cs" "$cr" "$(calc "$pb/1e6")" "$(calc "$wb/1e6")" "$u" "$p50" "$p99" "$r" "$a"
done
get() { # case field-index (0 for a case not run)
	[ -n "${R[$1]:-}" ] || { echo 0; return; }
	awk -v i="$2" '{print $i}' <<<"${R[$1]}"
}
echo "machine: $(nproc) cores, $(uname -r), ${SECS}s phases; link by bench/wanlink (TUN) + tc tbf"
printf 'RESULT wan cap_adherence=%.3f compression_ratio=%.2f rpo_p99_ms_40ms_rtt=%.0f link_utilization=%.2f\n' \
	"$(get 1gbit-cap50 9)" "$(get 100mbit-40ms 8)" "$(get 100mbit-40ms 7)" "$(get 100mbit-40ms 5)"
