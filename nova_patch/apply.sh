#!/usr/bin/env bash
# Apply (or with --revert, remove) the vmthunder patch to the Nova 34.0.0 that a Python
# interpreter imports.
#
#   nova_patch/apply.sh [--revert] [--check] [--python PYTHON]
#
#   --revert   take the patch out again (Nova as shipped)
#   --check    only say whether the patch applies / is applied; change nothing
#   --python   the interpreter that runs nova-compute (default: $PYTHON or python3)
#
# Exit status: 0 done (or nothing to do: already applied / not applied), 1 it cannot be done
# (Nova missing, wrong version, conflicts), 2 bad usage. Restart nova-compute afterwards.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
patch_file=$here/vmthunder-nova-34.0.0.patch
want_version=34.0.0
python=${PYTHON:-python3}
action=apply

usage() { sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
die() { echo "apply.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --revert) action=revert ;;
        --check) action=check ;;
        --python) [ $# -ge 2 ] || { usage >&2; exit 2; }; python=$2; shift ;;
        --python=*) python=${1#--python=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "apply.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

command -v patch >/dev/null || die "patch(1) is missing (Debian: apt-get install patch)"
[ -f "$patch_file" ] || die "$patch_file is missing"
command -v "$python" >/dev/null || die "no Python interpreter '$python' (use --python)"

# Where the installed nova package lives (its parent: the patch's paths start with nova/).
site=$("$python" - 2>/dev/null <<'EOF'
import os
import nova
print(os.path.dirname(os.path.dirname(os.path.abspath(nova.__file__))))
EOF
) || die "'$python' cannot import nova: install Nova $want_version first (or use --python)"
version=$("$python" -c 'from importlib.metadata import version; print(version("nova"))' \
    2>/dev/null) || version=unknown
[ "$version" = "$want_version" ] || die "Nova in $site is version $version; this patch is \
for Nova $want_version only. Nothing was changed."

# GNU patch: -p1 (paths a/nova/...), -f/-t never ask, -N skip already-applied hunks.
run_patch() { patch -p1 -d "$site" -t --no-backup-if-mismatch "$@" < "$patch_file"; }
if run_patch --dry-run -s -f -N >/dev/null 2>&1; then
    state=unapplied
elif run_patch --dry-run -s -f -R >/dev/null 2>&1; then
    state=applied
else
    state=conflict
fi

case $state/$action in
    unapplied/check) echo "The vmthunder patch applies cleanly to Nova $version in $site (not applied)." ;;
    applied/check) echo "The vmthunder patch is applied to Nova $version in $site." ;;
    applied/apply) echo "The vmthunder patch is already applied to Nova $version in $site: nothing to do." ;;
    unapplied/revert) echo "The vmthunder patch is not applied to Nova $version in $site: nothing to do." ;;
    unapplied/apply)
        run_patch -s -f -N || die "patch failed in $site (see above)"
        echo "Applied the vmthunder patch to Nova $version in $site."
        echo "Configure [vmthunder] in nova.conf (see nova_patch/README.md), then restart nova-compute." ;;
    applied/revert)
        run_patch -s -f -R || die "reverting failed in $site (see above)"
        echo "Reverted the vmthunder patch: Nova $version in $site is as shipped. Restart nova-compute." ;;
    conflict/*)
        echo "apply.sh: the vmthunder patch neither applies to nor is applied in Nova $version" \
             "in $site: its files were changed by something else. Nothing was changed." >&2
        echo "Dry run of the patch:" >&2
        run_patch --dry-run -f -N >&2 || true
        exit 1 ;;
esac
