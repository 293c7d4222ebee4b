"""The Nova patch stays small: Nova keeps only what must live inside it (the driver class, the
compute manager's start and departure hooks, the qcow2 file case of the local volume driver,
registering vmthunder's options); everything else is vmthunder.nova and vmthunder.conf."""

import os
import re

PATCH = os.path.join(os.path.dirname(__file__), "..", "..", "nova_patch", "vmthunder-nova-34.0.0.patch")
MAX_CHANGED_LINES = 90


def changed_lines(text):
    """{path: added + removed lines, blank ones included} of a unified diff (``diff -ruN``)."""
    out, path = {}, None
    for line in text.splitlines():
        m = re.match(r"diff -ruN a/(\S+) b/\S+$", line)
        if m:
            path = m.group(1)
            out[path] = 0
        elif path and not line.startswith(("+++ ", "--- ")) and line[:1] in "+-":
            out[path] += 1
    return out


def test_the_counter_counts_added_and_removed_lines_but_not_headers():
    diff = "diff -ruN a/nova/x.py b/nova/x.py\n--- a/nova/x.py\t1\n+++ b/nova/x.py\t2\n@@ -1,2 +1,3 @@\n ctx\n-old\n+new\n+\n"
    assert changed_lines(diff) == {"nova/x.py": 3}


def test_the_nova_patch_changes_at_most_90_non_test_lines():
    with open(PATCH) as f:
        counts = changed_lines(f.read())
    code = {p: n for p, n in counts.items() if not p.startswith("nova/tests/")}
    assert set(code) == {
        "nova/compute/manager.py",
        "nova/conf/__init__.py",
        "nova/virt/block_device.py",
        "nova/virt/libvirt/volume/volume.py",
    }, code
    total = sum(code.values())
    print(f"Nova patch: {total} changed non-test lines {code}")
    assert total <= MAX_CHANGED_LINES, code
    # its own tests come with it
    assert any(p.startswith("nova/tests/") and n > 0 for p, n in counts.items())
