#!/usr/bin/env bash
# make demo: what ferry can do so far (the foundation: a write-capturing
# disk service). It serves a disk over NBD on a unix socket, boots a real
# QEMU guest on it that writes and flushes, shows the journal that recorded
# every write, kills the server with SIGKILL mid-stream and shows that every
# flushed write survives. Replication and the DR lifecycle come next.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=${FERRY:-bin/ferry}
work=$(mktemp -d /tmp/ferry-demo.XXXX)
sock=$work/nbd.sock
pid=""
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; true' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
serve() {
	rm -f "$sock"
	"$FERRY" serve --dir "$work/group" --socket "$sock" "$@" >>"$work/serve.log" 2>&1 &
	pid=$!
	for _ in $(seq 100); do [ -S "$sock" ] && nbdinfo --size "nbd+unix:///vda?socket=$sock" >/dev/null 2>&1 && return; sleep 0.1; done
	echo "ferry serve did not come up; see $work/serve.log" >&2; exit 1
}

step "1. ferry serves disk 'vda' (256 MiB) over NBD on $sock (mode 0600)"
serve --create vda=256M
ls -l "$sock"
nbdinfo "nbd+unix:///vda?socket=$sock" | grep -E 'export-size|can_(flush|fua|trim|zero|multi_conn)'

step "2. a QEMU guest (TCG) boots with vda over NBD, writes 8 MiB, flushes, powers off"
accel=tcg
start=$(date +%s.%N)
qemu-system-x86_64 -accel $accel -m 256 -nographic -no-reboot \
	-kernel build/guest/vmlinuz -initrd build/guest/initrd.img \
	-append "console=ttyS0 quiet panic=-1 ferry.job=write-pattern ferry.token=demo" \
	-drive "file=nbd+unix:///vda?socket=$sock,format=raw,if=virtio,cache=none" \
	-serial "file:$work/console.log" -monitor none -display none
printf 'guest ran for %.1fs; its console said:\n' "$(echo "$(date +%s.%N) - $start" | bc)"
grep -a -o 'ferry-guest:.*' "$work/console.log" | sed 's/^/  /'

step "3. the journal recorded every write, in order"
kill -TERM $pid; wait $pid || true; pid=""
"$FERRY" journal dump --dir "$work/group/journal" --limit 8
"$FERRY" journal verify --dir "$work/group/journal"

step "4. write and flush with qemu-io, then kill -9 the server"
serve
qemu-io -f raw -c "write -P 0x5a 64M 4M" -c flush "nbd+unix:///vda?socket=$sock" | grep wrote
kill -KILL $pid; wait $pid 2>/dev/null || true; pid=""
echo "server killed with SIGKILL"

step "5. restart: the journal is recovered and replayed; the data is there"
serve
qemu-io -f raw -c "read -P 0x5a 64M 4M" "nbd+unix:///vda?socket=$sock" | grep -E 'read|fail'
grep -E 'replayed|recovered' "$work/serve.log" | tail -2 | sed 's/^/  log: /' || true
kill -TERM $pid; wait $pid || true; pid=""
head -c 22 "$work/group/images/vda.img"; echo " <- sector 0 of the image, as the guest wrote it"

step "done: files in $work (bench: make bench)"
