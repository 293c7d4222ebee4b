#!/usr/bin/env bash
# Run Nova 34.0.0's own unit tests for the code the vmthunder patch touches, with the patch
# applied, plus the patch's new tests. The last line is "nova: N passed, N failed, N skipped";
# the exit status is non-zero when a test failed or the set-up did.
#
#   nova_patch/run-nova-tests.sh [--full] [--concurrency N] [--setup-only]
#
#   --setup-only     build the venv and apply the patch, run no tests
#   --full           add nova.tests.unit.compute.test_compute (511 tests, ~10 more minutes)
#   --concurrency N  parallel test workers (default: number of CPUs, at most 4)
#
# Environment: PYTHON (CPython >= 3.11; default python3.11, else python3),
#   NOVA_TEST_VENV (default ~/.cache/vmthunder/nova-34.0.0-venv; reused between runs).
# Needs the PyPI registry the first time (Debian packages python3-venv and patch too, which it
# installs with apt-get when run as root).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
patch_file=$here/vmthunder-nova-34.0.0.patch
constraints=$here/test-constraints.txt
venv=${NOVA_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/vmthunder/nova-34.0.0-venv}
full=0
setup_only=0
jobs=$(nproc 2>/dev/null || echo 2)
[ "$jobs" -le 4 ] || jobs=4

while [ $# -gt 0 ]; do
    case $1 in
        --full) full=1 ;;
        --setup-only) setup_only=1 ;;
        --concurrency) jobs=$2; shift ;;
        -h|--help) sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "run-nova-tests.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "== $*"; }
fail_setup() { echo "run-nova-tests.sh: $*" >&2; echo "nova: 0 passed, 1 failed"; exit 1; }

# -- Tools: python >= 3.11 with venv, GNU patch ------------------------------------------------
apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "apt-get install $*"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } \
            >/dev/null 2>&1 || true
    fi
}
python=${PYTHON:-}
if [ -z "$python" ]; then
    for p in python3.11 python3.12 python3.13 python3; do
        if command -v "$p" >/dev/null; then python=$p; break; fi
    done
fi
[ -n "$python" ] || fail_setup "no python3 found"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    fail_setup "$python is older than 3.11 (Nova 34 needs >= 3.11)"
command -v patch >/dev/null || apt_install patch
command -v patch >/dev/null || fail_setup "patch(1) is missing (apt-get install patch)"

# -- The venv: nova==34.0.0 and its test requirements, pinned by test-constraints.txt ----------
# Test-only packages (from Nova's test-requirements.txt) that test discovery imports.
test_reqs=(stestr fixtures oslotest testtools ddt testscenarios requests-mock wsgi-intercept
           oslo.vmware osprofiler gabbi)
stamp="$("$python" -VV | head -1) ${test_reqs[*]} $(sha256sum "$constraints" | cut -c1-16)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.vmthunder-stamp" 2>/dev/null)" != "$stamp" ]; then
    log "creating $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        apt_install python3-venv
        "$python" -m venv "$venv" || fail_setup "cannot create a venv (apt-get install python3-venv)"
    fi
    pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    log "pip install nova==34.0.0 + test requirements (pinned)"
    if ! "${pip[@]}" -c "$constraints" nova==34.0.0 "${test_reqs[@]}"; then
        log "pinned install failed; installing with only the necessary pins"
        # SQLAlchemy 2.1 deprecates noload(), which Nova 34 uses: its tests turn that into errors.
        "${pip[@]}" nova==34.0.0 "${test_reqs[@]}" 'SQLAlchemy>=2.0,<2.1' ||
            fail_setup "pip install failed"
    fi
    echo "$stamp" > "$venv/.vmthunder-stamp"
fi
vpy=$venv/bin/python
site=$("$vpy" -c 'import os, nova; print(os.path.dirname(os.path.dirname(nova.__file__)))') ||
    fail_setup "nova is not importable in $venv"

# -- Nova as shipped, then the patch -----------------------------------------------------------
applied=$venv/vmthunder-applied.patch
if ! cmp -s "$applied" "$patch_file"; then
    if [ -f "$applied" ]; then
        log "taking out the previously applied version of the patch"
        if ! patch -p1 -d "$site" -s -f -R --no-backup-if-mismatch < "$applied" >/dev/null; then
            log "could not; reinstalling nova==34.0.0"
            # Files the old patch added are not in nova's RECORD: remove them by hand.
            awk '/^\+\+\+ b\// { sub(/^\+\+\+ b\//, ""); sub(/\t.*/, ""); print }' "$applied" |
                while read -r f; do
                    grep -q "^$f," "$site"/nova-34.0.0.dist-info/RECORD || rm -f "$site/$f"
                done
            "$vpy" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
                nova==34.0.0 || fail_setup "cannot reinstall nova"
        fi
    fi
    rm -f "$applied"
    "$here/apply.sh" --python "$vpy" || fail_setup "the patch does not apply"
    cp "$patch_file" "$applied"
fi
state=$("$here/apply.sh" --check --python "$vpy") || fail_setup "$state"
case $state in *"is applied"*) ;; *) fail_setup "the patch is not applied: $state" ;; esac
[ "$setup_only" = 0 ] || { log "patched Nova ready in $venv"; exit 0; }

# -- Tests -------------------------------------------------------------------------------------
# One stestr run per test directory (discovery imports every module under it).
compute_mods='test_compute_mgr|test_compute_mgr_vmthunder|test_shelve'
[ "$full" = 0 ] || compute_mods="$compute_mods|test_compute"
groups=(
    "virt|nova\.tests\.unit\.virt\.(test_block_device|test_block_device_vmthunder|test_virt_drivers|libvirt\.test_blockinfo|libvirt\.volume\.[a-z_]+)\."
    "compute|nova\.tests\.unit\.compute\.($compute_mods)\."
    "conf|nova\.tests\.unit\.conf\."
)
export OS_STDOUT_CAPTURE=1 OS_STDERR_CAPTURE=1 OS_LOG_CAPTURE=1 OS_TEST_TIMEOUT=300 \
    PYTHONDONTWRITEBYTECODE=1 LC_ALL=C.UTF-8
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
count() { sed -n "s/^ - $1: *\([0-9]*\).*/\1/p" "$2" | tail -1; }
total_passed=0 total_failed=0 total_skipped=0 status=0
for g in "${groups[@]}"; do
    dir=${g%%|*} filter=${g#*|}
    out=$work/$dir.log
    log "nova.tests.unit.$dir: $filter"
    start=$SECONDS
    (cd "$work" && nice -n 10 "$venv/bin/stestr" --test-path "$site/nova/tests/unit/$dir" \
        --top-dir "$site" run --concurrency "$jobs" "$filter") > "$out" 2>&1
    rc=$?
    passed=$(count Passed "$out") failed=$(count Failed "$out") skipped=$(count Skipped "$out")
    passed=${passed:-0} failed=${failed:-0} skipped=${skipped:-0}
    if [ "$rc" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi   # import error, runner crash
    echo "   $passed passed, $failed failed, $skipped skipped in $((SECONDS - start)) s"
    if [ "$rc" != 0 ]; then
        status=1
        grep -E '\.\.\. FAILED|^(FAIL|ERROR):' "$out" | head -50
        echo "---- last lines of the $dir run:"; tail -60 "$out"
    fi
    total_passed=$((total_passed + passed)) total_failed=$((total_failed + failed))
    total_skipped=$((total_skipped + skipped))
    rm -rf "$work/.stestr"
done
# The helpers in python/vmthunder/nova.py (with a fake vmthunder package).
log "python/vmthunder/nova.py: nova_patch/tests"
out=$work/helpers.log
"$vpy" - "$here/tests" > "$out" 2>&1 <<'EOF'
import sys, unittest
result = unittest.TextTestRunner(stream=sys.stdout).run(
    unittest.defaultTestLoader.discover(sys.argv[1]))
bad = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
print("COUNTS", result.testsRun - bad - len(result.skipped), bad, len(result.skipped))
sys.exit(1 if bad or not result.testsRun else 0)
EOF
rc=$?
read -r _ passed failed skipped < <(grep '^COUNTS ' "$out" || echo "COUNTS 0 0 0")
if [ "$rc" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi
echo "   $passed passed, $failed failed, $skipped skipped"
[ "$rc" = 0 ] || { status=1; tail -40 "$out"; }
total_passed=$((total_passed + passed)) total_failed=$((total_failed + failed))
total_skipped=$((total_skipped + skipped))

echo "nova: $total_passed passed, $total_failed failed, $total_skipped skipped"
exit $status
