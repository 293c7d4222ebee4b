"""Helpers for kernel tests that drive the vmthunder Python API inside UML nodes.

Every `py()` call is a new Python process on the node: state must come back from the kernel,
which is exactly what a restarted Nova compute does.
"""
import hashlib
import json
import os
import textwrap
import uuid

import pytest

from tests.kernel.harness import Fleet, uml_available

STATE_DIR = "/var/lib/vmthunder"
PRELUDE = """\
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
import vmthunder
def out(v):
    print("@@JSON " + json.dumps(v))
"""


class GuestError(AssertionError):
    """A snippet raised: carries the exception class name and message."""

    def __init__(self, node, exc_type, message, output):
        super().__init__(f"{node}: {exc_type}: {message}\n{output}")
        self.exc_type = exc_type
        self.message = message


def py(node, code, timeout=180):
    """Run Python `code` on `node`; returns what it passed to out(), raises GuestError with the
    vmthunder exception's class name if it raised."""
    body = PRELUDE + "try:\n" + textwrap.indent(textwrap.dedent(code), "    ") + """
except vmthunder.Error as e:
    print("@@ERR " + json.dumps([type(e).__name__, str(e)]))
    sys.exit(3)
"""
    name = f"snippet-{uuid.uuid4().hex[:10]}.py"
    path = node.write_file(name, body.encode())
    rc, output = node.run(f"python3 {path}", timeout=timeout)
    result = None
    for line in output.splitlines():
        if line.startswith("@@ERR "):
            t, m = json.loads(line[6:])
            raise GuestError(node.name, t, m, output)
        if line.startswith("@@JSON "):
            result = json.loads(line[7:])
    if rc != 0:
        raise AssertionError(f"{node.name}: snippet failed rc={rc}\n{output}")
    return result


def node_ctor(node, **kw):
    args = {"host": node.name, "cache_device": "/dev/ubdb", "state_dir": STATE_DIR, "cow_size_mib": 32}
    args.update(kw)
    return f"node = vmthunder.Node(**{args!r})\n"


def leftovers(node):
    """Every kernel object vmthunder could leave on a node."""
    script = r"""
echo "dm: $(dmsetup ls 2>/dev/null | awk '/^vmthunder/{print $1}' | tr '\n' ' ')"
echo "targets: $(ls /sys/kernel/config/target/iscsi 2>/dev/null | grep '^iqn' | tr '\n' ' ')"
echo "backstores: $(ls /sys/kernel/config/target/core/iblock_0 2>/dev/null | grep -v -e '^hba_' | tr '\n' ' ')"
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
    assert left == {"dm": [], "targets": [], "backstores": [], "sessions": []}, f"{node.name} not clean: {left}"


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
