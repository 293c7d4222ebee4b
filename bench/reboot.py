#!/usr/bin/env python3
"""Reboot benchmark: how long a compute node takes from boot to every VM disk back, and what
the first read after reassembly costs with the cache that survived against a cold one.

In UML nodes (lab): A exports the origin volume, B attaches N VMs (dm
snapshots), warms its cache, loses power (its UML process killed), boots with the same disks,
and runs `Node.reassemble()`. For N in --vms. Also, on B, the cost of carving a VM's COW through
vmthunder's on-device layout against LVM2 (lvcreate/lvremove of the same size), where lvm2 is
installed: the comparison behind the layout's design (README.md).

    python3 -m bench.reboot                      # N = 1, 8, 32; writes bench/results/reboot.json
                                                 # and appends its summary to history.jsonl beside it
    python3 -m bench.reboot --vms 1 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from bench import record  # provenance, history
from lab import Fleet, uml_available
from lab.guestpy import py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

log = logging.getLogger("bench.reboot")
IMAGE_ID = "img-reboot"
VOLUME = "rbbench"
STATE_DIR = "/var/lib/vmthunder"
SUBNET = "198.18.21.0/24"
COW_MIB = 32
IDLE_BEFORE_POWER_LOSS_S = 35


def host_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    except OSError:
        model = platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def node_ctor(name: str) -> str:
    return f"node = vmthunder.Node(host={name!r}, cache_device='/dev/ubdb', state_dir={STATE_DIR!r}, cow_size_mib={COW_MIB})\n"


def reread(a, b, dev: str) -> dict:
    """Read all of `dev` on B with O_DIRECT: seconds, and bytes the origin sent meanwhile."""
    tx0, t0 = a.tx_bytes(), time.monotonic()
    b.check(f"dd if={dev} of=/dev/null bs=1M iflag=direct 2>&1", timeout=600)
    return {"seconds": round(time.monotonic() - t0, 2), "origin_bytes": a.tx_bytes() - tx0}


def run_n(fleet, n: int, image_bytes: int) -> dict:
    a, b = fleet["a"], fleet["b"]
    conn = py(a, f"out(vmthunder.allow_initiator({VOLUME!r}, {b.initiator_iqn!r}, '{a.ip}:3260'))")
    t0 = time.monotonic()
    paths = py(
        b, node_ctor(b.name) + f"out([node.attach({IMAGE_ID!r}, [{conn!r}], f'vm{{i}}') for i in range({n})])", timeout=900
    )
    attach_s = time.monotonic() - t0
    origin = py(b, node_ctor(b.name) + "out(node.status())")["templates"][IMAGE_ID]["devices"]["origin"]
    cold = reread(a, b, origin)
    passes = [cold]
    while passes[-1]["origin_bytes"] > image_bytes // 50 and len(passes) < 6:
        passes.append(reread(a, b, origin))
    # bcache journals no cache-miss fills: the btree nodes holding them are written 30 s after
    # their first change, and a power loss before that loses those fills (cache, not data).
    b.check(f"sync; sleep {IDLE_BEFORE_POWER_LOSS_S}", timeout=IDLE_BEFORE_POWER_LOSS_S + 30)
    b.kill()
    t_boot = time.monotonic()
    b.restart(timeout=180)
    boot_s = time.monotonic() - t_boot
    b.check(f"mkdir -p {STATE_DIR} && mount /dev/ubdc {STATE_DIR}")
    r = py(
        b,
        node_ctor(b.name) + "import time\nt = time.monotonic()\nrep = node.reassemble()\n"
        "out({'seconds': time.monotonic() - t, 'report': rep})",
        timeout=900,
    )
    to_disks_s = time.monotonic() - t_boot
    back = sorted(r["report"]["disks"].values())
    assert back == sorted(paths), (back, paths, r["report"])
    warm = reread(a, b, origin)
    py(b, node_ctor(b.name) + f"[node.detach(f'vm{{i}}') for i in range({n})]", timeout=900)
    res = {
        "vms": n,
        "attach_s": round(attach_s, 2),
        "boot_s": round(boot_s, 2),
        "reassemble_s": round(r["seconds"], 2),
        "power_on_to_disks_s": round(to_disks_s, 2),
        "first_read_cold": cold,
        "warming_passes": len(passes),
        "idle_before_power_loss_s": IDLE_BEFORE_POWER_LOSS_S,
        "first_read_after_reassembly": warm,
    }
    log.info(
        "%d VM(s): reassembled in %.2f s (boot %.1f s, power-on to disks %.1f s); first read cold %s, after reassembly %s",
        n,
        r["seconds"],
        boot_s,
        to_disks_s,
        cold,
        warm,
    )
    return res


def carve_costs(fleet, rounds: int) -> dict:
    """Median seconds to carve and free a COW: vmthunder (attach + detach of a VM on a built
    template, all in one process) against LVM2 (lvcreate + lvremove of the same size)."""
    a, b = fleet["a"], fleet["b"]
    conn = py(a, f"out(vmthunder.allow_initiator({VOLUME!r}, {b.initiator_iqn!r}, '{a.ip}:3260'))")
    times = py(
        b,
        node_ctor(b.name)
        + f"""
import time
node.attach({IMAGE_ID!r}, [{conn!r}], 'base')
att, det = [], []
for i in range({rounds}):
    t = time.monotonic(); node.attach({IMAGE_ID!r}, [], f'c{{i}}'); att.append(time.monotonic() - t)
    t = time.monotonic(); node.detach(f'c{{i}}'); det.append(time.monotonic() - t)
node.detach('base')
out({{'attach': att, 'detach': det}})
""",
        timeout=900,
    )
    res = {
        "vmthunder_attach_s": round(statistics.median(times["attach"]), 4),
        "vmthunder_detach_s": round(statistics.median(times["detach"]), 4),
    }
    if shutil.which("lvcreate") is None:
        res["lvm2"] = "not installed on this host: not measured"
        return res
    cfg = "--config 'activation { udev_sync = 0 udev_rules = 0 } devices { obtain_device_list_from_udev = 0 }'"
    rc, out = b.run(f"pvcreate -q {cfg} /dev/ubdd && vgcreate -q {cfg} vmtbench /dev/ubdd 2>&1", timeout=120)
    if rc != 0:
        res["lvm2"] = f"vgcreate failed in UML without udev: {out.strip()[-300:]}"
        return res
    script = f"""
set -e
for i in $(seq {rounds}); do
  s=$(date +%s.%N); lvcreate -q {cfg} -Zn -L {COW_MIB}M -n cow$i vmtbench >/dev/null
  m=$(date +%s.%N); dd if=/dev/zero of=/dev/vmtbench/cow$i bs=1M count=1 oflag=direct 2>/dev/null
  z=$(date +%s.%N); lvremove -q -f {cfg} vmtbench/cow$i >/dev/null
  e=$(date +%s.%N); echo "$s $m $z $e"
done
"""
    rc, out = b.run(script, timeout=900, shell="/bin/bash")
    if rc != 0:
        res["lvm2"] = f"lvcreate failed in UML without udev: {out.strip()[-300:]}"
        return res
    rows = [list(map(float, line.split())) for line in out.splitlines() if len(line.split()) == 4]
    res["lvm2_lvcreate_s"] = round(statistics.median(r[1] - r[0] for r in rows), 4)
    res["lvm2_zero_head_s"] = round(statistics.median(r[2] - r[1] for r in rows), 4)
    res["lvm2_lvremove_s"] = round(statistics.median(r[3] - r[2] for r in rows), 4)
    res["lvm2_without_udev"] = "works with activation/udev_sync=0, udev_rules=0 (the harness sets DM_DISABLE_UDEV=1)"
    return res


def summary(doc: dict, command: str) -> dict:
    """The history line: per VM count the reassembly and the first reads, and the carve costs."""
    return {
        **record.run_fields(doc["provenance"]),
        "bench": "reboot",
        "scenario": "reboot",
        "command": command,
        "image_bytes": doc["image_bytes"],
        "runs": {
            str(r["vms"]): {
                "reassemble_s": r["reassemble_s"],
                "power_on_to_disks_s": r["power_on_to_disks_s"],
                "first_read_cold_s": r["first_read_cold"]["seconds"],
                "first_read_after_s": r["first_read_after_reassembly"]["seconds"],
                "first_read_after_origin_bytes": r["first_read_after_reassembly"]["origin_bytes"],
            }
            for r in doc["runs"]
        },
        "carve": {k: v for k, v in (doc.get("carve") or {}).items() if isinstance(v, (int, float))},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", default="1,8,32", help="VM counts to reboot with (comma-separated; default 1,8,32)")
    ap.add_argument("--image-mib", type=int, default=64, help="size of the origin image (default 64)")
    ap.add_argument("--carve-rounds", type=int, default=20, help="COW carve/free rounds for the LVM2 comparison")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "reboot.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ok, why = uml_available()
    if not ok:
        print(f"user-mode Linux cannot run here: {why}", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.vms.split(",")]
    image = args.image_mib << 20
    # The cache set takes half the device (the default); the COWs and heads share the rest.
    local = 2 * ((max(counts) + 4) * COW_MIB << 20) + 2 * image
    tmp = tempfile.mkdtemp(prefix="vmt-reboot-")
    try:
        origin = os.path.join(tmp, "origin.img")
        with open(origin, "wb") as f:
            for _ in range(args.image_mib):
                f.write(os.urandom(1 << 20))
        nodes = {
            "a": {"disks": {"ubdb": origin}},
            "b": {"disks": {"ubdb": local, "ubdc": 256 << 20, "ubdd": 1 << 30}, "mem": "512M"},
        }
        doc = {
            "benchmark": "reboot",
            "provenance": record.provenance(),
            "date": time.strftime("%Y-%m-%d"),
            "host_cpu": host_cpu(),
            "image_bytes": image,
            "cow_mib": COW_MIB,
            "runs": [],
        }
        with Fleet(nodes=nodes, name=f"rbb{os.getpid()}", subnet=SUBNET) as fleet:
            a, b = fleet["a"], fleet["b"]
            py(a, f"out(vmthunder.export_volume({VOLUME!r}, '/dev/ubdb', '{a.ip}:3260'))")
            b.check(f"mkfs.ext4 -q /dev/ubdc && mkdir -p {STATE_DIR} && mount /dev/ubdc {STATE_DIR}", timeout=60)
            for n in counts:
                doc["runs"].append(run_n(fleet, n, image))
            doc["carve"] = carve_costs(fleet, args.carve_rounds)
        record.write_result(args.out, doc)
        record.append_history(
            args.out, summary(doc, " ".join(["python3", "-m", "bench.reboot"] + (argv if argv is not None else sys.argv[1:])))
        )
        print(f"{'VMs':>4} {'reassemble':>11} {'boot->disks':>12} {'cold read':>16} {'read after':>16}")
        for r in doc["runs"]:
            c, w = r["first_read_cold"], r["first_read_after_reassembly"]
            print(
                f"{r['vms']:>4} {r['reassemble_s']:>10.2f}s {r['power_on_to_disks_s']:>11.1f}s "
                f"{c['seconds']:>6.2f}s {c['origin_bytes'] >> 20:>5} MiB {w['seconds']:>6.2f}s {w['origin_bytes'] >> 20:>5} MiB"
            )
        print("carve:", json.dumps(doc["carve"]))
        print(f"host: {doc['host_cpu']}; wrote {args.out}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
