"""Helpers for kernel tests that drive the vmthunder Python API inside UML nodes.

Every `py()` call is a new Python process on the node: state must come back from the kernel,
which is exactly what a restarted Nova compute does.
"""

import hashlib
import json
import os
import time

import pytest

from lab import uml_available
from lab.guestpy import GuestError, py  # noqa: F401  (re-exported for the tests)

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
    left["backstores"] = [
        b for b in left.get("backstores", []) if not any(b == f"volume_{k.split(':')[-1]}" for k in keep_targets)
    ]
    assert left == {"dm": [], "targets": [], "backstores": [], "local_disks": [], "sessions": []}, (
        f"{node.name} not clean: {left}"
    )


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


def wait_json(node, path, timeout, cond=lambda v: True):
    """The JSON a guest keeps writing at `path`, once it parses and `cond` holds (bounded)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        rc, out = node.run(f"cat {path} 2>/dev/null", timeout=30)
        if rc == 0 and out.strip():
            try:
                last = json.loads(out)
            except ValueError:
                pass
            else:
                if cond(last):
                    return last
        time.sleep(1)
    raise AssertionError(f"{node.name}: {path} not as expected within {timeout}s: {last}")


def start_etcd(node, timeout=60):
    """A real etcd on `node` (the registry of relay-tree tests); returns its tooz URL."""
    node.spawn(
        f"etcd --name {node.name} --data-dir /tmp/etcd --listen-client-urls http://{node.ip}:2379 "
        f"--advertise-client-urls http://{node.ip}:2379 --listen-peer-urls http://127.0.0.1:2380 "
        f"> /tmp/etcd.log 2>&1"
    )
    health = f"python3 -c \"import urllib.request; urllib.request.urlopen('http://{node.ip}:2379/health', timeout=2)\""
    deadline = time.monotonic() + timeout
    while node.run(health, timeout=20)[0] != 0:
        assert time.monotonic() < deadline, "etcd did not come up"
        time.sleep(1)
    return f"etcd3+http://{node.ip}:2379"
