#!/usr/bin/env bash
# `make test`'s pytest part: the lab tests (tests/fleet: the seed lab, emulated VMs, molecule) in
# the foreground, and everything else (unit, operation specs, integration) beside them, niced,
# so it takes the CPU the emulated VMs leave idle (a VM-bound test keeps about 1.5 of 2 cores
# busy). The background run's output is printed whole after the lab tests; the exit status is
# non-zero if either run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
log=$(mktemp /tmp/dockyard-test-beside.XXXXXX)

# A session of its own, so an interrupted run stops the whole background job: pytest and the
# registries and clients its tests started (killing only pytest left them running).
setsid nice -n 15 "$BIN/pytest" -q -ra --durations=15 tests/unit tests/operations \
  tests/integration >"$log" 2>&1 &
beside=$!
trap 'kill -TERM -- -"$beside" 2>/dev/null; rm -f "$log"' EXIT

"$BIN/pytest" -q -ra --durations=30 tests/fleet
fleet=$?

wait "$beside"
other=$?
echo
echo "=== unit, operation specs and integration tests (run beside the lab tests) ==="
cat "$log"
echo
echo "lab tests: exit ${fleet}; unit, specs and integration: exit ${other}"
[ "$fleet" -eq 0 ] && [ "$other" -eq 0 ]
