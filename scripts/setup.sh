#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) to build vmthunder and run its tests and fleet:
# the kernel test bed's packages (user-mode Linux, open-iscsi, ...), the Python test tools,
# and the vmthunder wheel itself, installed into this Python.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[setup] $*"; }

# libdevmapper-dev + libclang-dev: the devicemapper crate's -sys build (pkg-config, bindgen);
# gcc: the fleet's VM stand-in (bench/replay.c).
# e2fsprogs: a persistent state dir in the reboot tests; openssl: the CA of the etcd TLS tests.
pkgs=(user-mode-linux open-iscsi dmsetup kmod iproute2 busybox-static qemu-utils etcd-server bcache-tools
      libdevmapper-dev libclang-dev pkg-config gcc e2fsprogs openssl)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# open-iscsi's postinst may start iscsid on the host; the host kernel has no iSCSI, it is idle.

PY=${PYTHON:-python3}
need_py=()
for m in maturin pytest tooz etcd3gw matplotlib; do $PY -c "import $m" 2>/dev/null || need_py+=("$m"); done
# ruff pinned: its formatter's output is the style CI checks.
RUFF=0.17.6
[ "$($PY -m ruff --version 2>/dev/null)" = "ruff $RUFF" ] || need_py+=("ruff==$RUFF")
if ((${#need_py[@]})); then
    log "pip install ${need_py[*]}"
    $PY -m pip install -q "${need_py[@]}"
fi

# rustfmt: the style check of scripts/test-all.sh (rustup's default profile has it).
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt || log "no rustfmt: the style check will fail"

log "building the vmthunder wheel (release)"
rm -rf target/wheels
$PY -m maturin build --release -q >/dev/null
$PY -m pip install -q --force-reinstall --no-deps target/wheels/vmthunder-*.whl
log "installed: $($PY -c 'import vmthunder; print(vmthunder.__version__, vmthunder.__file__)')"
