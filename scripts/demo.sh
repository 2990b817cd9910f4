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
. scripts/lib.sh
site_reachable() { [ "$("$FERRY" --output json site list | jq -r ".[] | select(.name==\"$1\") | .reachable")" = "$2" ]; }
fenced() { [ "$("$FERRY" --output json protections | jq -r '.[0].fenced')" = true ]; }

step "1. ferry up: a vault and two sites, east and west"
up_start 60
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
until_true 60 "a few recovery points at west" points_at_least web 3
"$FERRY" test-failover web --point latest-processed --wait
"$FERRY" protections
"$FERRY" test-failover cleanup web --notes "drill: VM booted at west" --wait

step "5. disaster: the east site dies (SIGKILL); unplanned failover to west"
start_records=$(wait_web $WEB_EAST 60 | jq .last_durable)
before=$(wait_records $WEB_EAST $((start_records + 20)) 60 | jq .last_durable)
kill -9 "$(cat "$UP/east.pid")"
killed=$(now)
until_true 30 "the vault to see east unreachable" site_reachable east false
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
# The record's time is the guest's clock, which can run a little ahead of
# the host's under TCG: a negative difference means no loss, shown as 0.
if [ "$(echo "$unplanned_rpo < 0" | bc -l)" = 1 ]; then unplanned_rpo=0; fi
printf 'the VM at west holds records up to %s (east had %s durable when last asked); RPO %.2fs\n' \
	"$(echo "$state" | jq .resumed_after)" "$before" "$unplanned_rpo"
failover_s=$(took "$unplanned_job")

step "6. commit (the VM keeps running); east comes back: fenced, its VM stays down"
# The VM's HTTP is polled every 100 ms for as long as the commit runs: a
# commit that stopped the VM would miss polls.
wait_web $WEB_WEST 90 >/dev/null
missed_file=$(mktemp)
( missed=0; while [ ! -e "$missed_file.stop" ]; do web $WEB_WEST >/dev/null || missed=$((missed + 1)); sleep 0.1; done; echo $missed >"$missed_file" ) &
poller=$!
commit_start=$(now)
"$FERRY" commit web --wait
commit_s=$(printf %.2f "$(since "$commit_start")")
touch "$missed_file.stop"; wait $poller
commit_missed=$(cat "$missed_file"); rm -f "$missed_file" "$missed_file.stop"
"$FERRY" --output json job show "$(last_job)" | jq -r '.steps[0].messages[]'
echo "commit: ${commit_s}s from the command to the job's end; polls of the VM unanswered during it: $commit_missed"
[ "$commit_missed" = 0 ] || { echo "the VM stopped answering during the commit" >&2; exit 1; }
eastcmd=$(cat "$UP/east.cmd")
$eastcmd >>"$UP/east.log" 2>&1 &
eastpid=$!
until_true 60 "the vault to fence east" fenced
"$FERRY" protections

step "7. reprotect west -> east: reuse east's disks, send only what differs"
"$FERRY" reprotect web --dry-run
"$FERRY" reprotect web --wait
"$FERRY" --output json job show "$(last_job)" | jq -r '.steps[2].messages[]'
r1=$("$FERRY" --output json job show "$(last_job)" | jq -r '.steps[-1].messages[-1]')
echo "$r1"

step "8. failback with shutdown (planned): nothing lost"
pre_start=$(wait_web $WEB_WEST 120 | jq .last_durable)
pre=$(wait_records $WEB_WEST $((pre_start + 20)) 120 | jq .last_durable)
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
printf '%-44s %s\n' "commit (CLI, job end to end)" "${commit_s}s, VM unanswered polls: $commit_missed"
printf '%-44s %s\n' "planned failback job (excl. shutdown, boot)" "${planned_job_s}s"
printf '%-44s %s\n' "records lost in the planned failback" "$lost"
printf '%-44s %s\n' "reprotect west->east" "$r1"
printf '%-44s %s\n' "reprotect east->west" "$r2"
echo "RESULT demo unplanned_rpo_s=$(printf %.2f "$unplanned_rpo") planned_lost_records=$lost failover_s=$failover_s vm_answering_s=$(printf %.1f "$vm_answering") reprotect_sent_ratio=$worst commit_s=$commit_s commit_missed_polls=$commit_missed"
