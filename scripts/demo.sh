#!/usr/bin/env bash
# make demo: the Azure Site Recovery failover/failback tutorial, with ferry,
# on real VMs at two sites on this machine (ferry up: a vault, east, west).
#
#   enable replication -> DR drill + cleanup -> east dies: unplanned
#   failover to west -> commit -> east back (fenced) -> reprotect west->east
#   -> failback with shutdown (planned, nothing lost) -> commit -> reprotect
#   east->west.
#
# Ends with a summary table and a RESULT line; exits non-zero if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=$(realpath "${FERRY:-bin/ferry}")
G=$(realpath build/guest)
UP=$(realpath -m build/up)
rm -rf "$UP"; mkdir -p "$UP"
WEB_EAST=127.0.0.1:18081 WEB_WEST=127.0.0.1:18082
upid="" eastpid=""
cleanup() {
	for p in $eastpid $upid; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
	true
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
web() { curl -s -m 2 "http://$1/" 2>/dev/null; }
wait_web() { # addr timeout -> prints the state JSON once it answers
	for _ in $(seq $(($2 * 10))); do s=$(web "$1") && [ -n "$s" ] && { echo "$s"; return 0; }; sleep 0.1; done
	echo "no answer from $1" >&2; return 1
}
took() { # failover job id -> seconds it took excluding guest boot (from its last step)
	"$FERRY" --output json job show "$1" | jq -r '.steps[-1].messages[] | select(test("failover took")) | capture("took (?<d>[0-9.]+)(?<u>m?s)") | if .u == "ms" then (.d|tonumber)/1000 else .d end'
}
last_job() { "$FERRY" --output json jobs | jq -r '.[0].id'; }

step "1. ferry up: a vault and two sites, east and west"
"$FERRY" up --dir "$UP" >"$UP/up.out" 2>&1 &
upid=$!
for _ in $(seq 300); do grep -q '^token:' "$UP/up.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^token:' "$UP/up.out" || { cat "$UP/up.out"; exit 1; }
cat "$UP/up.out"
export FERRY_VAULT FERRY_TOKEN FERRY_CA
FERRY_VAULT=$(sed -n 's/^vault: //p' "$UP/up.out")
FERRY_TOKEN=$(sed -n 's/^token: //p' "$UP/up.out")
FERRY_CA=$UP/pki/ca.crt
"$FERRY" site list
reader=$("$FERRY" token create --role reader --name demo-portal | head -1)
echo "web portal: $FERRY_VAULT (sign in with the operator token above, or with the reader token $reader)"

step "2. the test guest's VM 'web' at east: ext4 data disk, a workload writing records"
"$FERRY" vm define web --site east --disk vda=64M --memory 256 --kernel "$G/vmlinuz" --initrd "$G/initrd.img" \
	--append "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100" \
	--forward "east=$WEB_EAST,west=$WEB_WEST" --guest-port 80
truncate -s 64M "$UP/fs.img" && mkfs.ext4 -q -F "$UP/fs.img"
qemu-img convert -n -f raw -O raw "$UP/fs.img" "nbd+unix:///web/vda?socket=$UP/east/nbd.sock"
"$FERRY" vm start web
wait_web $WEB_EAST 60 | jq -c .

step "3. west declares its networks; enable replication east -> west, the VM's NIC mapped to them"
"$FERRY" site network add west prod-west --kind production --subnet 10.20.0.0/24
"$FERRY" site network add west drill-west --kind isolated --subnet 10.99.0.0/24
"$FERRY" protect web --to west --network nic0=prod-west --test-network drill-west --wait
"$FERRY" protections

step "4. DR drill: test failover at west (isolated network), then cleanup"
sleep 2 # a few recovery points
"$FERRY" test-failover web --point latest-processed --wait
"$FERRY" protections
"$FERRY" test-failover cleanup web --notes "drill: VM booted at west" --wait

step "5. disaster: the east site dies (SIGKILL); unplanned failover to west"
sleep 2
before=$(web $WEB_EAST | jq .last_durable)
kill -9 "$(cat "$UP/east.pid")"
killed=$(now)
for _ in $(seq 100); do [ "$("$FERRY" --output json site list | jq -r '.[] | select(.name=="east") | .reachable')" = false ] && break; sleep 0.1; done
echo "east unreachable after $(printf %.1f "$(since "$killed")")s"
fo_start=$(now)
"$FERRY" failover web --point latest --wait
unplanned_job=$(last_job)
state=$(wait_web $WEB_WEST 90)
vm_answering=$(since "$fo_start")
echo "$state" | jq -c .
echo "the VM at west has address $(echo "$state" | jq -r .addr) on prod-west (10.20.0.0/24)"
resumed_time=$(echo "$state" | jq .resumed_time)
unplanned_rpo=$(echo "$killed - $resumed_time / 1000000000" | bc -l)
printf 'the VM at west holds records up to %s (east had %s durable when last asked); RPO %.2fs\n' \
	"$(echo "$state" | jq .resumed_after)" "$before" "$unplanned_rpo"
failover_s=$(took "$unplanned_job")

step "6. commit; east comes back: fenced, its VM stays down"
"$FERRY" commit web --wait
eastcmd=$(cat "$UP/east.cmd")
$eastcmd >>"$UP/east.log" 2>&1 &
eastpid=$!
for _ in $(seq 200); do [ "$("$FERRY" --output json protections | jq -r '.[0].fenced')" = true ] && break; sleep 0.1; done
"$FERRY" protections

step "7. reprotect west -> east: reuse east's disks, send only what differs"
"$FERRY" reprotect web --dry-run
"$FERRY" reprotect web --wait
"$FERRY" --output json job show "$(last_job)" | jq -r '.steps[2].messages[]'
r1=$("$FERRY" --output json job show "$(last_job)" | jq -r '.steps[-1].messages[-1]')
echo "$r1"

step "8. failback with shutdown (planned): nothing lost"
sleep 2
pre=$(web $WEB_WEST | jq .last_durable)
fb_start=$(now)
"$FERRY" failback web --point latest --wait
state=$(wait_web $WEB_EAST 90)
echo "$state" | jq -c .
after=$(echo "$state" | jq .resumed_after)
lost=$(( pre > after ? pre - after : 0 ))
echo "records durable at west before the failback: $pre; at east after: $after; lost: $lost"
planned_job_s=$(took "$(last_job)")

step "9. commit; reprotect east -> west: full circle"
"$FERRY" commit web --wait
"$FERRY" reprotect web --wait
r2=$("$FERRY" --output json job show "$(last_job)" | jq -r '.steps[-1].messages[-1]')
echo "$r2"
"$FERRY" protections

ratio() { echo "$1" | sed -n 's/.*(\(.*\))/\1/p'; }
worst=$(printf '%s\n%s\n' "$(ratio "$r1")" "$(ratio "$r2")" | sort -g | tail -1)
step "summary"
printf '%-44s %s\n' "unplanned failover RPO (east killed)" "$(printf %.2f "$unplanned_rpo")s"
printf '%-44s %s\n' "unplanned failover job (excl. guest boot)" "${failover_s}s"
printf '%-44s %s\n' "VM answering at west after failover began" "$(printf %.1f "$vm_answering")s"
printf '%-44s %s\n' "planned failback job (incl. source shutdown)" "${planned_job_s}s"
printf '%-44s %s\n' "records lost in the planned failback" "$lost"
printf '%-44s %s\n' "reprotect west->east" "$r1"
printf '%-44s %s\n' "reprotect east->west" "$r2"
echo "RESULT demo unplanned_rpo_s=$(printf %.2f "$unplanned_rpo") planned_lost_records=$lost failover_s=$failover_s vm_answering_s=$(printf %.1f "$vm_answering") reprotect_sent_ratio=$worst"
