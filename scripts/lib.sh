# Helpers shared by the demo scripts (sourced). Every wait is a poll with a
# deadline on the exact condition the next step needs; none is a fixed
# sleep or a single request. The scripts set FERRY before sourcing.
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
web() { curl -s -m 2 "http://$1/" 2>/dev/null; }
until_true() { # timeout-seconds what command... -> polls until the command succeeds
	local secs=$1 deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
	until "$@"; do
		[ "$(date +%s)" -lt "$deadline" ] || { echo "timed out after ${secs}s waiting for $what" >&2; return 1; }
		sleep 0.1
	done
}
wait_web() { # addr timeout -> prints the workload's state JSON once it answers
	local s deadline=$(( $(date +%s) + $2 ))
	while :; do
		s=$(web "$1") && [ -n "$s" ] && echo "$s" | jq -e .last_durable >/dev/null 2>&1 && { echo "$s"; return 0; }
		[ "$(date +%s)" -lt "$deadline" ] || { echo "no answer from $1 in $2 s" >&2; return 1; }
		sleep 0.1
	done
}
wait_records() { # addr min timeout -> prints the state JSON once more than min records are durable
	local s deadline=$(( $(date +%s) + $3 ))
	while :; do
		s=$(web "$1") && [ -n "$s" ] && [ "$(echo "$s" | jq -r '.last_durable // 0')" -gt "$2" ] && { echo "$s"; return 0; }
		[ "$(date +%s)" -lt "$deadline" ] || { echo "the workload at $1 did not pass $2 records in $3 s" >&2; return 1; }
		sleep 0.1
	done
}
took() { # failover job id -> seconds it took excluding guest boot (from its last step)
	"$FERRY" --output json job show "$1" | jq -r '.steps[-1].messages[] | select(test("failover took")) | capture("took (?<d>[0-9.]+)(?<u>m?s)") | if .u == "ms" then (.d|tonumber)/1000 else .d end'
}
last_job() { "$FERRY" --output json jobs | jq -r '.[0].id'; }
points_at_least() { # vm n
	[ "$("$FERRY" --output json points "$1" 2>/dev/null | jq 'length')" -ge "$2" ]
}
# up_start SECS FLAGS...: starts `ferry up --dir $UP FLAGS...` in the
# background (its pid in $upid, for the caller's cleanup), waits up to
# SECS for its token, prints what it printed, and exports the CLI's
# environment from it.
up_start() {
	local secs=$1; shift
	"$FERRY" up --dir "$UP" "$@" >"$UP/up.out" 2>&1 &
	upid=$!
	has_token() { grep -q '^token:' "$UP/up.out" 2>/dev/null; }
	until_true "$secs" "ferry up to print its token" has_token || { cat "$UP/up.out"; exit 1; }
	cat "$UP/up.out"
	export FERRY_VAULT FERRY_TOKEN FERRY_CA
	FERRY_VAULT=$(sed -n 's/^vault: //p' "$UP/up.out")
	FERRY_TOKEN=$(sed -n 's/^token: //p' "$UP/up.out")
	FERRY_CA=$UP/pki/ca.crt
}
