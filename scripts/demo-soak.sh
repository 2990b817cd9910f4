#!/usr/bin/env bash
# scripts/demo-soak.sh: make demo RUNS times in a row (STRESS=1: beside
# stress-ng --cpu 2), stopping at the first failure; prints one RESULT
# line per run and a summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-10} stress=${STRESS:-0}
hog=""
if [ "$stress" = 1 ]; then
	command -v stress-ng >/dev/null || {
		SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
		$SUDO apt-get install -y -qq stress-ng >/dev/null
	}
	stress-ng --cpu 2 --timeout 0 >/dev/null 2>&1 &
	hog=$!
	trap 'kill $hog 2>/dev/null; wait $hog 2>/dev/null || true' EXIT
fi
passed=0
for i in $(seq "$runs"); do
	log=build/demo-soak-$i.log
	mkdir -p build
	if scripts/demo.sh >"$log" 2>&1; then
		passed=$((passed + 1))
		echo "run $i: $(grep '^RESULT demo' "$log")"
	else
		echo "run $i FAILED; log in $log:"
		tail -20 "$log"
		break
	fi
done
echo "RESULT demo-soak runs=$runs passed=$passed stress=$stress"
[ "$passed" = "$runs" ]
