#!/usr/bin/env bash
# Set up (scripts/setup.sh), then boot a local fleet of VMs through the relay tree and against
# direct reads from the origin in user-mode Linux nodes, with the full copy before boot as its
# link bound (about 3-4 minutes after set-up; --full-copy measure measures it: ~30 min more):
# progress on stderr, then the table and the timeline PNG's path on stdout;
# bench/results/fleet-8n-100mbit.json (named by the run's parameters; its timeline PNG beside it)
# and a summary line in bench/results/history.jsonl.
# Arguments go to bench/fleet.py (python3 -m bench.fleet --help), e.g.
#   bash scripts/fleet.sh --nodes 4 --vms 8 --full-copy measure
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m bench.fleet "$@"
