"""Helpers for kernel tests that drive the vmthunder Python API inside UML nodes.

Every `py()` call is a new Python process on the node: state must come back from the kernel,
which is exactly what a restarted Nova compute does.
"""
import hashlib
import os

import pytest

from tests.kernel.harness import uml_available

from tests.kernel.harness.guestpy import GuestError, py  # noqa: F401  (re-exported for the tests)

STATE_DIR = "/var/lib/vmthunder"


def node_ctor(node, **kw):
    args = {"host": node.name, "cache_device": "/dev/ubdb", "state_dir": STATE_DIR, "cow_size_mib": 32}
    args.update(kw)
    return f"node = vmthunder.Node(**{args!r})\n"


def leftovers(node):
    """Every kernel object vmthunder could leave on a node."""
    script = r"""
echo "dm: $(dmsetup ls 2>/dev/null | awk '/^vmthunder/{print $1}' | tr '\n' ' ')"
echo "targets: $(ls /sys/kernel/config/target/iscsi 2>/dev/null | grep '^iqn' | tr '\n' ' ')"
echo "backstores: $(ls /sys/kernel/config/target/core/iblock_0 /sys/kernel/config/target/core/fileio_0 2>/dev/null | grep -v -e '^hba_' -e ':$' -e '^$' | tr '\n' ' ')"
echo "local_disks: $(ls /sys/kernel/config/target/loopback 2>/dev/null | grep '^naa' | tr '\n' ' ')"
echo "sessions: $(ls /sys/class/iscsi_session 2>/dev/null | tr '\n' ' ')"
"""
    out = node.check(script, timeout=30)
    res = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            res[k.strip()] = v.split()
    return res


def assert_clean(node, keep_targets=()):
    left = leftovers(node)
    left["targets"] = [t for t in left.get("targets", []) if t not in keep_targets]
    left["backstores"] = [b for b in left.get("backstores", []) if not any(b == f"volume_{k.split(':')[-1]}" for k in keep_targets)]
    assert left == {"dm": [], "targets": [], "backstores": [], "local_disks": [], "sessions": []}, f"{node.name} not clean: {left}"


def md5_of(node, path, size):
    out = node.check(f"head -c {size} {path} | md5sum", timeout=120)
    return out.split()[0]


def file_md5(path, size):
    h = hashlib.md5()
    with open(path, "rb") as f:
        left = size
        while left:
            b = f.read(min(left, 1 << 20))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def require_uml():
    ok, why = uml_available()
    if not ok:
        pytest.skip(f"user-mode Linux cannot run here: {why}")


def random_disk(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
