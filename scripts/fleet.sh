#!/usr/bin/env bash
# Set up (scripts/setup.sh), then boot a local fleet of VMs through the relay tree and the two
# baselines (direct reads from the origin, full copy before boot) in user-mode Linux nodes:
# a table on stdout, progress on stderr, bench/results/fleet-8n-100mbit.json (named by the run's
# parameters; its timeline PNG beside it) and a summary line in bench/results/history.jsonl.
# Arguments go to bench/fleet.py (python3 bench/fleet.py --help), e.g.
#   bash scripts/fleet.sh --nodes 4 --vms 8 --modes tree,direct
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 bench/fleet.py "$@"
