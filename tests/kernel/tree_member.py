"""Stand-in for nova-compute on a UML node in relay-tree tests: holds the registry membership
(tooz heartbeats live as long as this process), attaches one VM through the tree, runs the
tree upkeep, optionally reads the VM's device continuously, and reports JSON files.

    python3 tree_member.py --registry URL --host r1 --image IMG --origin FILE --vm vm-r1 \
        --export-ip 198.18.x.y --workdir /vmt-share/member [--fanout 2]
    python3 tree_member.py --reader-only DEV --read-expect FILE --workdir DIR ...
    python3 tree_member.py --start-up ...   # after a reboot: reassemble, rejoin, upkeep (no attach)

Stops when <workdir>/stop exists (bounded by --max-seconds).
"""

import argparse
import hashlib
import json
import logging
import mmap
import os
import sys
import time

import vmthunder
from vmthunder.registry import Registry
from vmthunder.tree import Tree

CHUNK = 64 << 10


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def reader(dev, expect, workdir, deadline, stop_file):
    """Read the device round after round with O_DIRECT; count errors, mismatches, worst stall."""
    buf = mmap.mmap(-1, CHUNK)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    errors = mismatches = reads = 0
    worst = 0.0
    rounds = 0
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        for i, want in enumerate(expect):
            t0 = time.monotonic()
            try:
                n = os.preadv(fd, [buf], i * CHUNK)
                if n != CHUNK or hashlib.md5(buf[:n]).hexdigest() != want:
                    mismatches += 1
            except OSError as e:
                errors += 1
                logging.error("read error at %d: %s", i * CHUNK, e)
            worst = max(worst, time.monotonic() - t0)
            reads += 1
            if os.path.exists(stop_file) or time.monotonic() > deadline:
                break
        rounds += 1
        write_json(
            os.path.join(workdir, "reader.json"),
            {"reads": reads, "errors": errors, "mismatches": mismatches, "worst_stall_s": worst, "rounds": rounds},
        )
    os.close(fd)
    return {"reads": reads, "errors": errors, "mismatches": mismatches, "worst_stall_s": worst, "rounds": rounds, "done": True}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry")
    ap.add_argument("--host")
    ap.add_argument("--image")
    ap.add_argument("--origin", help="JSON file with the origin's connection dict")
    ap.add_argument("--vm")
    ap.add_argument("--export-ip")
    ap.add_argument("--domain")
    ap.add_argument("--fanout", type=int, default=2)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--read-expect", help="JSON list of md5 per 64 KiB chunk: read continuously")
    ap.add_argument("--max-seconds", type=float, default=300)
    ap.add_argument("--reader-only", metavar="DEV", help="only read DEV continuously (needs --read-expect)")
    ap.add_argument(
        "--wait-grant-from", metavar="HOST", help="publish our host record, then join only once HOST's record grants us (bounded)"
    )
    ap.add_argument(
        "--start-up",
        action="store_true",
        help="what nova-compute does when it starts: reassemble the node's VM disks and rejoin the tree",
    )
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, filename=os.path.join(a.workdir, "log"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    deadline = time.monotonic() + a.max_seconds
    stop_file = os.path.join(a.workdir, "stop")
    if a.reader_only:
        write_json(
            os.path.join(a.workdir, "reader.json"),
            reader(a.reader_only, json.load(open(a.read_expect)), a.workdir, deadline, stop_file),
        )
        return 0
    initiator = open("/etc/iscsi/initiatorname.iscsi").read().split("=", 1)[1].strip()
    node = vmthunder.Node(
        host=a.host,
        cache_device="/dev/ubdb",
        state_dir="/var/lib/vmthunder",
        export_ip=a.export_ip,
        engine="bcache",
        cow_size_mib=32,
        path_timeout_s=4,
    )
    reg = Registry(a.registry, a.host, lease_s=6.0)
    reg.start()
    tree = Tree(node, reg, initiator=initiator, export_ip=a.export_ip, failure_domain=a.domain, fanout=a.fanout)
    if a.start_up:
        report = node.reassemble()
        write_json(
            os.path.join(a.workdir, "attached.json"),
            {"path": report["disks"].get(a.vm), "report": report, "rejoined": tree.rejoin(), "status": node.status()},
        )
        return watch(node, tree, a, reg, stop_file, deadline)
    origin = json.load(open(a.origin))
    if a.wait_grant_from:
        # A relay grants a host once its upkeep has seen that host's record; a newcomer that
        # joins first does not count it as a parent (by design). The test wants it to.
        tree._registry_ok("wait for a grant")
        until = time.monotonic() + 60
        while time.monotonic() < until and not any(
            r["host"] == a.wait_grant_from and a.host in (r.get("grants") or {}) for r in reg.peers(a.image)
        ):
            time.sleep(0.5)
    try:
        path = tree.attach(a.image, origin, a.vm)
        write_json(os.path.join(a.workdir, "attached.json"), {"path": path, "status": node.status()})
    except vmthunder.Error as e:
        write_json(os.path.join(a.workdir, "attached.json"), {"error": f"{type(e).__name__}: {e}"})
        raise
    return watch(node, tree, a, reg, stop_file, deadline)


def watch(node, tree, a, reg, stop_file, deadline):
    """Upkeep on a thread until told to stop, the status written every half second."""
    tree.start_watch(interval_s=1.0)
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        write_json(os.path.join(a.workdir, "status.json"), node.status())
        time.sleep(0.5)
    tree.stop_watch()
    if os.path.exists(os.path.join(a.workdir, "detach")):
        tree.detach(a.vm)
    write_json(os.path.join(a.workdir, "status.json"), node.status())
    reg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
