#!/usr/bin/env bash
# The failover/failback tutorial on a libvirt domain an operator already
# runs: define it with virsh on a qcow2 image, start it, import it into
# ferry live while its workload writes (its HTTP polled every 100 ms),
# then protect, drill, planned failover, commit, reprotect, failback,
# commit, reprotect back: every VM start and stop goes through libvirt.
#
# Both sites run on this machine's one libvirt daemon (started if none
# runs), so a failover redefines the same domain onto the other site's
# disks; on two hosts each site has its own. Ends with a RESULT line;
# exits non-zero if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=$(realpath "${FERRY:-bin/ferry}")
# libvirt runs QEMU as libvirt-qemu: everything it opens lives where that
# user may pass (/var/tmp), not under a private home or checkout.
UP=${DEMO_DIR:-/var/tmp/ferry-demo-libvirt}
URI=qemu:///system
DOM=web
WEB_EAST=127.0.0.1:18181 WEB_WEST=127.0.0.1:18182
upid=""
cleanup() {
	virsh -c $URI destroy $DOM >/dev/null 2>&1 || true
	virsh -c $URI destroy $DOM-drill >/dev/null 2>&1 || true
	virsh -c $URI undefine $DOM >/dev/null 2>&1 || true
	[ -n "$upid" ] && kill "$upid" 2>/dev/null && wait "$upid" 2>/dev/null
	true
}
trap cleanup EXIT
. scripts/lib.sh

step "0. libvirt (started without systemd if none runs)"
if ! virsh -c $URI version >/dev/null 2>&1; then
	pgrep -x virtlogd >/dev/null || virtlogd -d
	pgrep -x libvirtd >/dev/null || libvirtd -d
	until_true 20 "libvirtd" virsh -c $URI version >/dev/null
fi
virsh -c $URI version | sed -n 1,3p
virsh -c $URI destroy $DOM >/dev/null 2>&1 || true
virsh -c $URI undefine $DOM >/dev/null 2>&1 || true
rm -rf "$UP"; mkdir -p "$UP/images"; chmod 711 "$UP"; chmod 755 "$UP/images"
cp build/guest/vmlinuz build/guest/initrd.img "$UP/images/"

step "1. the operator's VM: domain '$DOM' on a qcow2 image, defined and started with virsh"
truncate -s 256M "$UP/fs.raw" && mkfs.ext4 -q -F "$UP/fs.raw"
qemu-img convert -f raw -O qcow2 "$UP/fs.raw" "$UP/images/$DOM.qcow2" && rm "$UP/fs.raw"
cat >"$UP/$DOM.xml" <<XML
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$DOM</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$UP/images/vmlinuz</kernel><initrd>$UP/images/initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100 ferry.qga=1</cmdline></os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$UP/images/$DOM.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <interface type='user'><mac address='52:54:00:fe:00:01'/><model type='virtio'/></interface>
    <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='pty'/>
  </devices>
  <qemu:commandline><qemu:arg value='-netdev'/><qemu:arg value='user,id=op0,hostfwd=tcp:$WEB_EAST-:80'/>
    <qemu:arg value='-device'/><qemu:arg value='virtio-net-pci,netdev=op0,bus=pcie.0,addr=0x11'/></qemu:commandline>
</domain>
XML
virsh -c $URI define "$UP/$DOM.xml"
virsh -c $URI start $DOM
wait_web $WEB_EAST 120 | jq -c .

step "2. ferry up: a vault and two sites, both running VMs through libvirt"
mkdir -p "$UP/up" && chmod 711 "$UP/up" # libvirt-qemu passes through to the sites' NBD sockets
"$FERRY" up --dir "$UP/up" --vault-listen 127.0.0.1:17500 --east-listen 127.0.0.1:17511 --west-listen 127.0.0.1:17512 \
	--agent-flag=--runtime=libvirt --agent-flag=--libvirt-uri=$URI --agent-flag=--nbd-group=libvirt-qemu >"$UP/up.out" 2>&1 &
upid=$!
has_token() { grep -q '^token:' "$UP/up.out" 2>/dev/null; }
until_true 60 "ferry up to print its token" has_token || { cat "$UP/up.out"; exit 1; }
export FERRY_VAULT FERRY_TOKEN FERRY_CA
FERRY_VAULT=$(sed -n 's/^vault: //p' "$UP/up.out")
FERRY_TOKEN=$(sed -n 's/^token: //p' "$UP/up.out")
FERRY_CA=$UP/up/pki/ca.crt
"$FERRY" site list

step "3. live import into ferry at east while the workload writes (HTTP polled every 100 ms)"
gapfile=$(mktemp)
( longest=0; last=$(now); while [ ! -e "$gapfile.stop" ]; do
	if web $WEB_EAST >/dev/null; then t=$(now); g=$(echo "$t - $last" | bc); [ "$(echo "$g > $longest" | bc)" = 1 ] && longest=$g; last=$t; fi
	sleep 0.1; done; echo "$longest" >"$gapfile" ) &
poller=$!
before=$(wait_web $WEB_EAST 30 | jq .last_durable)
imp_start=$(now)
"$FERRY" vm import --libvirt $DOM --site east --forward "east=$WEB_EAST,west=$WEB_WEST" --guest-port 80
import_s=$(printf %.2f "$(since "$imp_start")")
wait_records $WEB_EAST $((before + 20)) 60 >/dev/null
touch "$gapfile.stop"; wait $poller
import_gap=$(printf %.2f "$(cat "$gapfile")"); rm -f "$gapfile" "$gapfile.stop"
virsh -c $URI domblklist $DOM
echo "live import: ${import_s}s; longest gap of the guest's HTTP: ${import_gap}s"
"$FERRY" vm list

step "4. protect east -> west"
"$FERRY" site network add west prod-west --kind production --subnet 10.20.0.0/24
"$FERRY" site network add west drill-west --kind isolated --subnet 10.99.0.0/24
"$FERRY" protect $DOM --to west --network nic0=prod-west --test-network drill-west --wait

step "5. DR drill at west: $DOM-drill, a transient domain on an isolated network"
until_true 60 "a few recovery points at west" points_at_least $DOM 3
"$FERRY" test-failover $DOM --point latest-processed --wait
virsh -c $URI list --name | grep -x "$DOM-drill"
"$FERRY" test-failover cleanup $DOM --notes "libvirt drill" --wait

step "6. planned failover to west (shutdown through libvirt): nothing lost"
pre_start=$(wait_web $WEB_EAST 60 | jq .last_durable)
pre=$(wait_records $WEB_EAST $((pre_start + 20)) 60 | jq .last_durable)
"$FERRY" failover $DOM --point latest --wait # shuts the source down first (planned)
fo_job=$(last_job)
state=$(wait_web $WEB_WEST 120)
echo "$state" | jq -c .
after=$(echo "$state" | jq .resumed_after)
lost=$(( pre > after ? pre - after : 0 ))
failover_s=$(took "$fo_job")
echo "records durable at east before the failover: $pre; at west after: $after; lost: $lost"

step "7. commit; reprotect west -> east (only what differs)"
"$FERRY" commit $DOM --wait
"$FERRY" reprotect $DOM --wait
r1=$("$FERRY" --output json job show "$(last_job)" | jq -r '.steps[-1].messages[-1]')
echo "$r1"

step "8. failback to east; commit; reprotect east -> west"
wait_records $WEB_WEST $(( $(wait_web $WEB_WEST 60 | jq .last_durable) + 10 )) 60 >/dev/null
"$FERRY" failback $DOM --point latest --wait
wait_web $WEB_EAST 120 | jq -c .
"$FERRY" commit $DOM --wait
"$FERRY" reprotect $DOM --wait
r2=$("$FERRY" --output json job show "$(last_job)" | jq -r '.steps[-1].messages[-1]')
echo "$r2"
"$FERRY" protections

ratio() { echo "$1" | sed -n 's/.*(\(.*\))/\1/p'; }
worst=$(printf '%s\n%s\n' "$(ratio "$r1")" "$(ratio "$r2")" | sort -g | tail -1)
step "summary"
printf '%-44s %s\n' "live import (CLI, end to end)" "${import_s}s"
printf '%-44s %s\n' "longest gap of the guest's HTTP meanwhile" "${import_gap}s"
printf '%-44s %s\n' "planned failover job (excl. shutdown, boot)" "${failover_s}s"
printf '%-44s %s\n' "records lost in the planned failover" "$lost"
printf '%-44s %s\n' "reprotect west->east" "$r1"
printf '%-44s %s\n' "reprotect east->west" "$r2"
echo "RESULT libvirt import_s=$import_s import_gap_s=$import_gap failover_s=$failover_s planned_lost_records=$lost reprotect_sent_ratio=$worst"
