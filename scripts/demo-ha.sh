#!/usr/bin/env bash
# make demo-ha: the control plane survives the site it stands on.
#
#   ferry up --ha (three etcd members: east, west, a witness; a vault at
#   east and at west) -> protect the test VM east -> west -> SIGKILL
#   everything of east (agent, vault, etcd member) -> west's vault takes
#   over -> unplanned failover through it -> the VM's records checked.
#
# Ends with a RESULT line; exits non-zero if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=$(realpath "${FERRY:-bin/ferry}")
G=$(realpath build/guest)
UP=$(realpath -m build/up-ha)
rm -rf "$UP"; mkdir -p "$UP"
WEB_EAST=127.0.0.1:18281 WEB_WEST=127.0.0.1:18282
upid=""
cleanup() {
	[ -z "$upid" ] || { kill "$upid" 2>/dev/null && wait "$upid" 2>/dev/null; }
	true
}
trap cleanup EXIT
. scripts/lib.sh
site_reachable() { [ "$("$FERRY" --output json site list | jq -r ".[] | select(.name==\"$1\") | .reachable")" = "$2" ]; }
takes_changes() { "$FERRY" --output json token create --role reader --name "probe-$RANDOM" >/dev/null 2>&1; }

step "1. ferry up --ha: etcd at east, west and a witness; a vault at east and at west"
up_start 90 --ha --vault-listen 127.0.0.1:17600 --west-vault-listen 127.0.0.1:17601 \
	--east-listen 127.0.0.1:17611 --west-listen 127.0.0.1:17612 --etcd-port 22479
"$FERRY" site list

step "2. the test guest's VM at east, protected to west"
"$FERRY" vm define web --site east --disk vda=64M --memory 256 --kernel "$G/vmlinuz" --initrd "$G/initrd.img" \
	--append "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100" \
	--forward "east=$WEB_EAST,west=$WEB_WEST" --guest-port 80
truncate -s 64M "$UP/fs.img" && mkfs.ext4 -q -F "$UP/fs.img"
qemu-img convert -n -f raw -O raw "$UP/fs.img" "nbd+unix:///web/vda?socket=$UP/east/nbd.sock"
"$FERRY" vm start web
wait_web $WEB_EAST 90 | jq -c .
"$FERRY" protect web --to west --wait >/dev/null
"$FERRY" protections

step "3. east burns: its agent, its vault and its etcd member, SIGKILL"
start_records=$(wait_web $WEB_EAST 60 | jq .last_durable)
before=$(wait_records $WEB_EAST $((start_records + 20)) 60 | jq .last_durable)
for p in east vault etcd-east; do kill -9 "$(cat "$UP/$p.pid")"; done
killed=$(now)
until_true 60 "a vault to take changes again" takes_changes
takeover=$(printf %.2f "$(since "$killed")")
echo "west's vault leads and takes changes ${takeover}s after the kill"
until_true 60 "the new leader to see east unreachable" site_reachable east false
"$FERRY" site list

step "4. unplanned failover to west, through west's vault"
failover_ok=0
if "$FERRY" failover web --point latest --wait; then
	state=$(wait_web $WEB_WEST 120)
	echo "$state" | jq -c .
	after=$(echo "$state" | jq .resumed_after)
	errors=$(echo "$state" | jq .checksum_errors)
	[ "$errors" = 0 ] && failover_ok=1
else
	after=0
fi
lost=$(( before > after ? before - after : 0 ))
echo "records durable at east 0.2 s or more before the kill: $before; the VM at west resumed after: $after; lost beyond the RPO: $lost"
"$FERRY" protections

step "summary"
echo "RESULT ha takeover_s=$takeover failover_ok=$failover_ok lost_records=$lost"
[ "$failover_ok" = 1 ] && [ "$lost" = 0 ]
