#!/usr/bin/env bash
# make demo-ransomware: ransomware caught in the write stream, and files
# restored from the last clean point, at two sites on this machine
# (ferry up).
#
#   the VM 'fin' at east writes 96 ordinary documents (text, logs, a
#   ledger), protected to west -> it writes random data and gzip streams
#   into new files for 20 s (no alert may come of it) -> it encrypts its
#   documents in place with AES -> west raises the alert and names the
#   last clean point -> files restored from it (ferry files get) equal
#   the originals -> a drill at it boots with every document intact.
#
# Ends with a summary and a RESULT line; exits non-zero if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=$(realpath "${FERRY:-bin/ferry}")
G=$(realpath build/guest)
UP=$(realpath -m build/up-ransomware)
rm -rf "$UP"; mkdir -p "$UP"
EAST=127.0.0.1:18281 WEST=127.0.0.1:18282 DRILL=127.0.0.1:18283
DOCS=96
upid=""
cleanup() {
	[ -z "$upid" ] || { kill "$upid" 2>/dev/null && wait "$upid" 2>/dev/null; }
	true
}
trap cleanup EXIT
. scripts/lib.sh
gpost() { curl -sf -m 30 -X POST "http://$EAST$1" >/dev/null; }
office() { web "$1" | jq -r ".office.$2"; }
prot() { "$FERRY" --output json protections | jq -c '.[] | select(.vm == "fin")'; }
incident() { prot | jq -c '.ransomware // empty'; }
has_incident() { [ -n "$(incident)" ]; }
noise_done() { [ "$(office $EAST noise_done)" = true ]; }
enc_done() { [ "$(office $EAST encrypt_done)" = true ]; }
caught_up() {
	prot | jq -e '.link.pending_bytes == 0' >/dev/null
}

step "1. ferry up: a vault and two sites, east and west"
up_start 60
"$FERRY" site list

step "2. the VM 'fin' at east: a 256 MiB ext4 data disk, protected to west"
"$FERRY" vm define fin --site east --disk vda=256M --memory 256 --kernel "$G/vmlinuz" --initrd "$G/initrd.img" \
	--append "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100" \
	--forward "east=$EAST,west=$WEST,west/drill-west=$DRILL" --guest-port 80
truncate -s 256M "$UP/fs.img" && mkfs.ext4 -q -F -b 4096 "$UP/fs.img"
qemu-img convert -n -f raw -O raw "$UP/fs.img" "nbd+unix:///fin/vda?socket=$UP/east/nbd.sock"
"$FERRY" vm start fin
wait_web $EAST 90 | jq -c '{last_durable, office}'
"$FERRY" site network add west drill-west --kind isolated --subnet 10.99.0.0/24
"$FERRY" protect fin --to west --test-network drill-west --wait
"$FERRY" protections

step "3. the guest writes $DOCS documents (text reports, logs, a ledger: 24 MiB)"
gpost "/docs?n=$DOCS"
docs_at=$(now)
web $EAST | jq -c .office

step "4. normal work that looks like encryption: random data and gzip streams into new files, 20 s at 4 MB/s"
gpost "/noise?seconds=20&rate=4194304"
until_true 60 "the noise to end" noise_done
until_true 60 "west to catch up" caught_up
false_alerts=0
if has_incident; then false_alerts=1; echo "FALSE ALERT: $(incident)"; fi
echo "$(office $EAST noise_bytes) bytes of high-entropy data written into new files; alerts: $false_alerts"
"$FERRY" alerts

step "5. ransomware: the guest encrypts its documents in place (AES-256-CTR)"
enc_start=$(now)
gpost /encrypt
until_true 120 "the ransomware alert" has_incident
detect_s=$(printf %.1f "$(since "$enc_start")")
until_true 120 "the encryption to end" enc_done
echo "alert $detect_s s after the encryption began; $(office $EAST encrypted) documents encrypted"
"$FERRY" alerts
"$FERRY" ransomware show fin
inc=$(incident)
lc_seq=$(echo "$inc" | jq -r .last_clean.seq)
lc_t=$(date -d "$(echo "$inc" | jq -r .last_clean.time)" +%s.%N)
last_clean_ok=0
if [ "$(echo "$lc_t > $docs_at && $lc_t < $enc_start + 1 && $lc_t > $enc_start - 3" | bc)" = 1 ]; then last_clean_ok=1; fi
echo "last clean point $lc_seq: after the documents were written, within 3 s before the encryption: $last_clean_ok"

step "6. files from the last clean point (read at west through libguestfs; the VM is not booted)"
"$FERRY" files ls fin --point last-clean
"$FERRY" files ls fin /vda/docs --point last-clean | head -8
"$FERRY" files get fin /vda/docs --point last-clean --to "$UP/restored"
"$FERRY" files get fin /vda/docs/report-000.txt --point latest-processed --to "$UP/now"
restore_ok=1
go run ./cmd/ferry-guest docs "$UP/restored/docs" "$DOCS" || restore_ok=0
if go run ./cmd/ferry-guest docs "$UP/now" 1 >/dev/null 2>&1; then
	echo "report-000.txt at the newest point is intact: the encryption did not reach west?" >&2; restore_ok=0
else
	echo "report-000.txt at the newest point: encrypted (as expected)"
fi

step "7. a drill at the last clean point: the VM boots with its documents intact"
"$FERRY" test-failover fin --point last-clean --wait
drill=$(wait_web $DRILL 120)
echo "$drill" | jq -c .office
drill_ok=0
if [ "$(echo "$drill" | jq .office.docs_ok)" = "$DOCS" ] && [ "$(echo "$drill" | jq .office.docs_bad)" = 0 ]; then drill_ok=1; fi
"$FERRY" test-failover cleanup fin --notes "ransomware: last clean point checked" --wait
"$FERRY" ransomware dismiss fin
"$FERRY" alerts

step "summary"
rate=$(go test -run '^$' -bench '^BenchmarkClassify$' -benchtime 1s ./internal/entropy | awk '/MB\/s/ {for (i = 1; i < NF; i++) if ($(i+1) == "MB/s") print int($i)}')
printf '%-60s %s\n' "alert after the encryption began" "${detect_s}s"
printf '%-60s %s\n' "last clean point right before the encryption" "$last_clean_ok"
printf '%-60s %s\n' "alerts from 20 s of compressed/random writes" "$false_alerts"
printf '%-60s %s\n' "$DOCS documents restored from the last clean point intact" "$restore_ok"
printf '%-60s %s\n' "drill at the last clean point: documents intact" "$drill_ok"
printf '%-60s %s\n' "entropy classification, one core" "${rate} MB/s"
[ "$drill_ok" = 1 ] || restore_ok=0
echo "RESULT ransomware detect_s=$detect_s last_clean_ok=$last_clean_ok false_alerts=$false_alerts restore_ok=$restore_ok entropy_mbps_per_core=$rate"
[ "$last_clean_ok" = 1 ] && [ "$false_alerts" = 0 ] && [ "$restore_ok" = 1 ]
