#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test suite: the style checks (rustfmt, ruff), Rust unit
# tests, Python unit tests, kernel tests in user-mode Linux nodes, and Nova's own unit tests with
# the patch applied.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
fail=0
echo "== style (cargo fmt --check, ruff check, ruff format --check)"
cargo fmt --check >/dev/null || { echo "cargo fmt --check: run cargo fmt"; fail=1; }
python3 -m ruff check --quiet . || fail=1
python3 -m ruff format --check --quiet . || fail=1
echo "== cargo test"
cargo test --lib --quiet || fail=1
echo "== pytest (unit + kernel)"
python3 -m pytest -ra tests/ || fail=1
if [ -x nova_patch/run-nova-tests.sh ]; then
    echo "== Nova 34 unit tests with the vmthunder patch"
    bash nova_patch/run-nova-tests.sh || fail=1
fi
exit $fail
