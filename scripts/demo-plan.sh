#!/usr/bin/env bash
# make demo-plan: a recovery plan of three VMs (a database, then an
# application and a web server) at two sites on this machine (ferry up).
# The application and web servers are one multi-VM consistency group,
# "front": app tells web every record it makes durable, and web writes a
# record naming it, so a recovery point that is not consistent across the
# two would show web naming a record of app's future.
#
#   protect db and front -> plan: db, then front, a script after db
#   (the "load balancer" switch) and a manual check before the front ->
#   plan drill + cleanup -> plan failover east -> west (planned: nothing
#   lost) -> commit -> reprotect -> plan failback -> commit -> reprotect.
#
# Ends with a summary and a RESULT line; exits non-zero if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY=$(realpath "${FERRY:-bin/ferry}")
G=$(realpath build/guest)
UP=$(realpath -m build/up-plan)
rm -rf "$UP"; mkdir -p "$UP"
VMS="db app web"
declare -A EAST=([db]=127.0.0.1:18181 [app]=127.0.0.1:18182 [web]=127.0.0.1:18183)
# app and web publish the same host ports at both sites: only one copy
# runs at a time (a planned failover shuts the source down first), and
# app reaches web through its port from either site.
declare -A WEST=([db]=127.0.0.1:18191 [app]=127.0.0.1:18182 [web]=127.0.0.1:18183)
upid=""
cleanup() {
	[ -z "$upid" ] || { kill "$upid" 2>/dev/null && wait "$upid" 2>/dev/null; }
	true
}
trap cleanup EXIT
. scripts/lib.sh
job_state() { "$FERRY" --output json job show "$1" | jq -r .state; }
# run_plan ACTION [flags]: runs a plan action, confirms its manual actions
# as they come, and prints the job id.
run_plan() {
	local action=$1 id; shift
	id=$("$FERRY" --output json plan "$action" shop "$@" | jq -r .id)
	while :; do
		"$FERRY" job show "$id" --wait >&2 || return 1
		[ "$(job_state "$id")" = waiting ] || break
		echo "-- the plan waits for an operator: confirming (ferry job resume $id)" >&2
		"$FERRY" --output json job resume "$id" >/dev/null
	done
	echo "$id"
}
# plan_seconds JOB: the plan job's time excluding manual actions and the
# waits for guests to boot.
plan_seconds() {
	local total=0 name start end
	while IFS=$'\t' read -r name start end; do
		case "$name" in *": wait until up"*|*"manual action"*) continue ;; esac
		total=$(echo "$total + $(date -d "$end" +%s.%N) - $(date -d "$start" +%s.%N)" | bc)
	done < <("$FERRY" --output json job show "$1" | jq -r '.steps[] | select(.state == "succeeded") | [.name, .start, .end] | @tsv')
	printf %.2f "$total"
}
started() { web "$1" | jq -r .started; }

step "1. ferry up: a vault and two sites, east and west"
up_start 60
"$FERRY" site list

step "2. at east: db, and the consistency group front (app and web), each VM with an ext4 data disk and a workload"
"$FERRY" vm define db --site east --disk vda=64M --memory 256 --kernel "$G/vmlinuz" --initrd "$G/initrd.img" \
	--append "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100" \
	--forward "east=${EAST[db]},west=${WEST[db]}" --guest-port 80
member() { # name extra-append
	jq -n --arg n "$1" --arg k "$G/vmlinuz" --arg i "$G/initrd.img" --arg a "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda $2" \
		--arg e "${EAST[$1]}" --arg w "${WEST[$1]}" \
		'{name: $n, memory_mib: 256, disks: [{name: "vda", size: 67108864}], kernel: $k, initrd: $i, append: $a,
		  forwards: {east: $e, west: $w}, guest_port: 80, qga: true}'
}
jq -n --argjson app "$(member app "ferry.rate=100 ferry.tell=10.0.2.2:${EAST[web]##*:}")" --argjson web "$(member web ferry.follow=1)" \
	'{members: [$app, $web]}' >"$UP/front.json"
"$FERRY" group create front --site east --file "$UP/front.json"
truncate -s 64M "$UP/fs.img" && mkfs.ext4 -q -F "$UP/fs.img"
for d in db/vda front/app-vda front/web-vda; do
	qemu-img convert -n -f raw -O raw "$UP/fs.img" "nbd+unix:///$d?socket=$UP/east/nbd.sock"
done
"$FERRY" vm start db
"$FERRY" vm start front
for vm in $VMS; do wait_web "${EAST[$vm]}" 90 | jq -c "{vm: \"$vm\", last_durable}"; done

step "3. protect db and the group front to west"
for p in db front; do "$FERRY" protect "$p" --to west --wait >/dev/null; done
"$FERRY" protections

step "4. the plan: db, then the group front; a script after db, a manual check before the front"
cat >"$UP/vault/scripts/lb.sh" <<EOF
#!/bin/sh
# The plan's script: here it only records its context, as a real one
# would switch a load balancer or a DNS name.
echo "\$(date +%T) \$FERRY_ACTION \$FERRY_PHASE \$FERRY_GROUP: \$FERRY_VMS" >> "$UP/lb.log"
echo "load balancer now points at the \$FERRY_GROUP group's site"
EOF
chmod 755 "$UP/vault/scripts/lb.sh"
cat >"$UP/shop.json" <<'EOF'
{"groups": [
  {"name": "database", "vms": ["db"], "wait": {"for": "guest-agent", "timeout": 180000000000},
   "post": [{"name": "switch the load balancer", "script": "lb.sh"}]},
  {"name": "front", "vms": ["front"], "wait": {"for": "guest-agent", "timeout": 180000000000},
   "pre": [{"name": "check", "manual": "Check that the database accepts connections"}]}
]}
EOF
"$FERRY" plan create shop --file "$UP/shop.json"

step "5. plan drill, then cleanup"
until_true 60 "recovery points of db" points_at_least db 3
until_true 60 "recovery points of front" points_at_least front 3
run_plan test-failover >/dev/null
"$FERRY" protections
run_plan cleanup --notes "plan drill ok" >/dev/null

step "6. plan failover east -> west (planned: each source shuts down first)"
declare -A pre
for vm in $VMS; do
	s=$(wait_web "${EAST[$vm]}" 60 | jq .last_durable)
	pre[$vm]=$(wait_records "${EAST[$vm]}" $((s + 10)) 60 | jq .last_durable)
done
fo=$(run_plan failover)
failover_s=$(plan_seconds "$fo")
lost=0
for vm in $VMS; do
	after=$(wait_web "${WEST[$vm]}" 90 | jq .resumed_after)
	l=$(( pre[$vm] > after ? pre[$vm] - after : 0 ))
	echo "$vm: durable at east before the failover: ${pre[$vm]}; at west after: $after; lost: $l"
	lost=$(( l > lost ? l : lost ))
done
# Cross-VM consistency at the failover point: every record web holds
# names a record app holds (app tells web its records in order, so the
# records past app's are counted by how far web's highest names).
cross() { # site-ports-array-name
	local -n ports=$1
	local a w
	a=$(wait_web "${ports[app]}" 90 | jq .resumed_after)
	w=$(wait_web "${ports[web]}" 90 | jq .resumed_peer)
	echo "app resumed after record $a; web's records name app's records up to $w" >&2
	echo $(( w > a ? w - a : 0 ))
}
violations=$(cross WEST)
db_t=$(started "${WEST[db]}") app_t=$(started "${WEST[app]}") web_t=$(started "${WEST[web]}")
boot_order_ok=0
if [ "$app_t" -gt "$db_t" ] && [ "$web_t" -gt "$db_t" ]; then boot_order_ok=1; fi
echo "workloads started at west (guest clocks): db $db_t, app $app_t, web $web_t -> boot order ok: $boot_order_ok"

step "7. commit, reprotect west -> east"
run_plan commit >/dev/null
run_plan reprotect >/dev/null
"$FERRY" protections

step "8. plan failback west -> east, commit, reprotect east -> west"
fb=$(run_plan failover)
failback_s=$(plan_seconds "$fb")
for vm in $VMS; do wait_web "${EAST[$vm]}" 90 | jq -c "{vm: \"$vm\", resumed_after}"; done
violations=$(( violations + $(cross EAST) ))
run_plan commit >/dev/null
run_plan reprotect >/dev/null
"$FERRY" protections
"$FERRY" plan show shop

step "summary"
printf '%-52s %s\n' "plan failover east -> west (excl. boots, manual)" "${failover_s}s"
printf '%-52s %s\n' "plan failback west -> east (excl. boots, manual)" "${failback_s}s"
printf '%-52s %s\n' "records lost in the planned failover (worst VM)" "$lost"
printf '%-52s %s\n' "boot order db < app, web (guest clocks)" "$boot_order_ok"
printf '%-52s %s\n' "script runs" "$(wc -l <"$UP/lb.log")"
printf '%-52s %s\n' "records of web naming app's future (failover+failback)" "$violations"
echo "RESULT plan vms=3 boot_order_ok=$boot_order_ok cross_vm_violations=$violations failover_s=$failover_s planned_lost_records=$lost"
