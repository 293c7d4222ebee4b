#!/usr/bin/env python3
"""Cache engines in a relay tree: how many times each block crosses each tree edge.

Topology, in user-mode Linux nodes (lab), each node on a shaped link:

    o (origin: exports a random-data image volume over iSCSI)
    └── r1 ──┬── r2 ── r3        a chain o -> r1 -> r2 -> r3
             └── r1b             plus a fan-out of 2 under r1

Every relay attaches the image through vmthunder (`Node.attach`, parent only as source), so it
caches it on its local device with the engine under test and re-exports its cache to its
children. Every relay also runs one "VM" reader on its dm snapshot. All readers start at the
same instant (a wall-clock start time; the caches are cold: the first wave) and read the same
working set with O_DIRECT, in the same order: a recorded boot read pattern
(bench/traces/debian12-boot.json, `--trace`) or mixed 4-128 KiB reads over distinct extents
of the image (deterministic seed).

Per tree edge parent -> child it measures the data bytes the child read from its parent (the
child's iSCSI disk, block-layer counters: exactly what crossed the edge, without TCP/iSCSI
headers) and the child's NIC rx bytes (headers included), each divided by the working-set
bytes W; the origin's NIC tx bytes; and the fleet's completion time (start -> last reader
done). Each engine runs in a fresh fleet: every engine starts cold.

Goal: every edge <= 1.1 x W and the origin sends <= fan-out (2) x W. The default
engine is the one that meets the goals with the best completion time.

Results: bench/results/cache-engines.json (named by the run's parameters: cache-engines-prefetch,
cache-engines-readahead0, ...; --out to choose) with its provenance, a summary line in
history.jsonl beside it, a markdown table on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import zlib

from bench import host_memory, record  # record: result names, provenance, history
from lab import Fleet, HarnessError, uml_available
from lab._util import parse_size
from lab.guestpy import PRELUDE as PY_PRELUDE
from lab.guestpy import py as guest_py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

DEFAULT_TRACE = os.path.join(HERE, "traces", "debian12-boot.json")
DEFAULT_ENGINES = ["bcache", "bcache-direct", "dm-cache-64k", "dm-cache-256k"]
SUBNET = "198.18.20.0/24"
IMAGE_ID = "img-bench"
VOLUME = "vol"
STATE_DIR = "/var/lib/vmthunder"
COW_MIB = 32
PAGE = 4096
FANOUT = 2
EDGE_GOAL = 1.1
# parent of each relay; node order = address order (o is .1)
TREE = {"r1": "o", "r2": "r1", "r3": "r2", "r1b": "r1"}
NODES = ["o", "r1", "r2", "r3", "r1b"]

log = logging.getLogger("bench.cache_engines")


# ----------------------------------------------------------------------------- working set
def parse_engine(key: str):
    """'bcache' -> ('bcache', None, True); 'dm-cache-64k-direct' -> ('dm-cache', 64, False).
    '-direct': the node does not coalesce misses (Node(coalesce=False): children read through
    iblock, VMs the cache device directly) — the layout before miss coalescing."""
    base, coalesce = (key[: -len("-direct")], False) if key.endswith("-direct") else (key, True)
    if base == "bcache":
        return "bcache", None, coalesce
    m = re.fullmatch(r"dm-cache-(\d+)k", base)
    if m and int(m.group(1)) >= 32 and int(m.group(1)) % 32 == 0:
        return "dm-cache", int(m.group(1)), coalesce
    raise argparse.ArgumentTypeError(
        f"bad engine {key!r}: 'bcache' or 'dm-cache-<N>k' (N a multiple of 32), optionally with '-direct' (no miss coalescing)"
    )


def synthetic_working_set(image_bytes: int, ws_bytes: int, seed: int):
    """Disjoint extents (4 KiB aligned, 4..128 KiB, log-uniform sizes) at random places of the
    image, in random order, until their union is ws_bytes. Returns [(offset, length)]."""
    rng = random.Random(seed)
    pages = image_bytes // PAGE
    want = ws_bytes // PAGE
    if want > pages // 2:
        raise SystemExit(f"working set {ws_bytes} is too large for image {image_bytes} (at most half)")
    used = bytearray(pages)
    out, have = [], 0
    while have < want:
        n = min(rng.choice([1, 2, 4, 8, 16, 32]), want - have)
        p = rng.randrange(0, pages - n + 1)
        if any(used[p : p + n]):
            continue
        used[p : p + n] = b"\1" * n
        out.append((p * PAGE, n * PAGE))
        have += n
    return out


def trace_working_set(path: str):
    """The reads of a recorded boot, in order, each widened to 4 KiB alignment (bcache devices
    have 4 KiB logical blocks, so O_DIRECT needs it). Returns (image_bytes, [(off, len)])."""
    with open(path) as f:
        tr = json.load(f)
    image = int(tr["image_bytes"])
    reads = []
    for rec in tr["reads"]:
        _t, off, ln = rec[0], int(rec[1]), int(rec[2])
        if ln <= 0:
            continue
        a = off // PAGE * PAGE
        b = min(-(-(off + ln) // PAGE) * PAGE, image)
        reads.append((a, b - a))
    return image, reads


def union_bytes(extents) -> int:
    total, end = 0, -1
    for a, n in sorted(extents):
        b = a + n
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def expected_digest(image_path: str, extents) -> str:
    """crc32 of every read in order, folded: what every reader must report."""
    acc = 0
    with open(image_path, "rb") as f:
        for off, n in extents:
            f.seek(off)
            data = f.read(n)
            data += b"\0" * (n - len(data))
            acc = zlib.crc32(zlib.crc32(data).to_bytes(4, "little"), acc)
    return f"{acc:08x}"


def make_origin_image(path: str, image_bytes: int, extents, full_random: bool) -> None:
    """Random data: everywhere (small images) or in every MiB the working set touches (sparse)."""
    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(image_bytes)
        if full_random:
            chunks = range(0, -(-image_bytes // mib))
        else:
            s = set()
            for off, n in extents:
                s.update(range(off // mib, (off + n - 1) // mib + 1))
            chunks = sorted(s)
        for c in chunks:
            f.seek(c * mib)
            f.write(os.urandom(min(mib, image_bytes - c * mib)))


# ----------------------------------------------------------------------------- guest side

READER = r"""
import json, mmap, os, sys, threading, time, zlib
dev, ws_path, start_at, depth = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
with open(ws_path) as f:
    ws = json.load(f)
fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
maxlen = max(n for _, n in ws)
crcs = [0] * len(ws)
errors = []
nxt = [0]
lock = threading.Lock()
def worker():
    buf = mmap.mmap(-1, maxlen)          # page aligned, as O_DIRECT wants
    mv = memoryview(buf)
    while True:
        with lock:
            i = nxt[0]
            nxt[0] += 1
        if i >= len(ws) or errors:
            return
        off, n = ws[i]
        try:
            got = os.preadv(fd, [mv[:n]], off)
            if got != n:
                raise OSError(f"short read {got}/{n} at {off}")
            crcs[i] = zlib.crc32(mv[:n])
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
            return
threads = [threading.Thread(target=worker) for _ in range(depth)]
late = time.time() - start_at
if late < 0:
    time.sleep(-late)
t0 = time.time()
for t in threads:
    t.start()
for t in threads:
    t.join()
t1 = time.time()
acc = 0
for c in crcs:
    acc = zlib.crc32(c.to_bytes(4, "little"), acc)
print("@@JSON " + json.dumps({"start": t0, "end": t1, "late_s": late, "reads": len(ws),
                               "digest": f"{acc:08x}", "errors": errors}))
"""

COUNTERS = r"""
for d in /sys/block/sd*; do
    # iSCSI disks only (.../sessionN/...): not the node's local tcm_loop disk
    readlink -f "$d" | grep -q '/session[0-9]' && [ -e "$d/stat" ] && echo "disk $(basename $d) $(cat $d/stat)"
done
echo "nic $(cat /sys/class/net/vec0/statistics/rx_bytes) $(cat /sys/class/net/vec0/statistics/tx_bytes)"
python3 -c 'import time; print("clock", time.time())'
"""


class SetupError(RuntimeError):
    """The fleet or the tree could not be set up (nothing measured yet): worth a retry."""


def py(node, code: str, timeout: float = 240):
    return guest_py(node, code, timeout=timeout)


def on_all(fleet, names, fn):
    """fn(node) on several nodes at once; {name: result}; the first error is raised."""
    res, errs = {}, []

    def one(n):
        try:
            res[n] = fn(fleet[n])
        except Exception as e:
            errs.append(e)

    ts = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        raise errs[0]
    return res


def clock_skew(c) -> float:
    g = c["clock"]
    return 0.0 if c["host_before"] <= g <= c["host_after"] else min(g - c["host_before"], g - c["host_after"], key=abs)


def counters(node):
    """iSCSI disk bytes read (sum over the iSCSI sd*), NIC rx/tx bytes, guest clock."""
    h0 = time.time()
    out = node.check(COUNTERS, timeout=60)
    h1 = time.time()
    c = {"disk_read_bytes": 0, "rx": 0, "tx": 0, "clock": None, "host_before": h0, "host_after": h1}
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "disk":
            c["disk_read_bytes"] += int(f[4]) * 512  # field 3 of stat: sectors read
        elif f and f[0] == "nic":
            c["rx"], c["tx"] = int(f[1]), int(f[2])
        elif f and f[0] == "clock":
            c["clock"] = float(f[1])
    return c


# ----------------------------------------------------------------------------- one engine
def node_ctor(node, engine, block_kib, cache_mib, export: bool, coalesce: bool, readahead_kib) -> str:
    args = {
        "host": node.name,
        "cache_device": "/dev/ubdb",
        "state_dir": STATE_DIR,
        "cow_size_mib": COW_MIB,
        "engine": engine,
        "cache_size_mib": cache_mib,
        "coalesce": coalesce,
    }
    if readahead_kib is not None:
        args["readahead_kib"] = readahead_kib
    if block_kib:
        args["cache_block_kib"] = block_kib
    if export:
        args["export_ip"] = node.ip
    return f"node = vmthunder.Node(**{args!r})\n"


def run_engine(key, args, image_path, image_bytes, extents, ws_bytes, digest):
    engine, block_kib, coalesce = parse_engine(key)
    mib = 1 << 20
    # Cache sizes: nothing is ever evicted. dm-cache: twice what the working set touches at
    # 1 MiB granularity (any cache block up to 1 MiB), at most the image. bcache (4 KiB blocks):
    # the node's cache set, twice the working set, at least 128 MiB (bcache wants >= 1024 buckets).
    if engine == "bcache":
        cache_mib = max(128, 2 * -(-ws_bytes // mib))
    else:
        touched = len({c for off, n in extents for c in range(off // mib, (off + n - 1) // mib + 1)})
        cache_mib = min(-(-image_bytes // mib), max(64, 2 * touched))
    local_mib = cache_mib + COW_MIB + 64 + 16  # + dm-cache metadata, bcache heads, alignment
    nodes = {"o": {"disks": {"ubdb": image_path}}}
    for n in NODES[1:]:
        nodes[n] = {"disks": {"ubdb": local_mib * mib}}
    name = f"ce{os.getpid()}{re.sub(r'[^a-z0-9]', '', key)}"[:20]
    t_engine = time.monotonic()
    log.info("[%s] booting 5 nodes (fleet %s, rate %s)", key, name, args.rate)
    state = {"phase": "setup"}
    try:
        return _run_engine(
            key, args, extents, ws_bytes, digest, engine, block_kib, coalesce, cache_mib, nodes, name, t_engine, state
        )
    except Exception as e:
        if state["phase"] == "setup":
            raise SetupError(f"{type(e).__name__}: {e}") from e
        raise


def _run_engine(key, args, extents, ws_bytes, digest, engine, block_kib, coalesce, cache_mib, nodes, name, t_engine, state):
    mib = 1 << 20

    def ctor(node, export: bool) -> str:
        return node_ctor(node, engine, block_kib, cache_mib, export, coalesce, args.readahead_kib)

    with Fleet(nodes=nodes, name=name, subnet=SUBNET, rate=args.rate, mem=args.mem, halt_timeout=5.0) as fleet:
        o = fleet["o"]
        portal = f"{o.ip}:3260"
        py(o, f"out(vmthunder.export_volume({VOLUME!r}, '/dev/ubdb', {portal!r}))")
        conn = {"r1": py(o, f"out(vmthunder.allow_initiator({VOLUME!r}, {fleet['r1'].initiator_iqn!r}, {portal!r}))")}
        vm = {}
        children = {p: [c for c, pp in TREE.items() if pp == p] for p in NODES}

        def attach(n):
            node = fleet[n]
            kids = children[n]
            code = ctor(node, export=bool(kids))
            code += f"path = node.attach({IMAGE_ID!r}, [{conn[n]!r}], 'vm-{n}')\n"
            code += "exp = {}\n"
            for k in kids:
                code += f"exp[{k!r}] = node.export_info({IMAGE_ID!r}, {fleet[k].initiator_iqn!r})\n"
            code += "out({'path': path, 'exports': exp})\n"
            t = time.monotonic()
            res = py(node, code)
            vm[n] = res["path"]
            conn.update(res["exports"])
            log.info("[%s] %s attached (%.1fs): %s", key, n, time.monotonic() - t, res["path"])

        # Top-down: a child attaches once its parent's template (and export) exists.
        attach("r1")
        errs = []

        def attach_safe(n):
            try:
                attach(n)
                if n == "r2":
                    attach("r3")
            except Exception as e:  # reported below, in the main thread
                errs.append(e)

        ts = [threading.Thread(target=attach_safe, args=(n,)) for n in ("r2", "r1b")]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errs:
            raise errs[0]

        ws_json = json.dumps([[a, n] for a, n in extents]).encode()
        for n in vm:
            fleet[n].write_file("ws.json", ws_json)
            fleet[n].write_file("reader.py", READER.encode())

        before = on_all(fleet, NODES, counters)
        # The start barrier is a wall-clock time: the guests' clocks must agree with the host's.
        # (0 when the guest's clock reading fell between the host's before and after the call.)
        skew = {n: round(clock_skew(c), 3) for n, c in before.items()}
        log.info("[%s] guest clock - host clock (s): %s", key, skew)
        if any(abs(v) > 0.5 for v in skew.values()):
            log.warning(
                "[%s] guest clocks differ from the host's: the common start is off by up to %.1fs",
                key,
                max(abs(v) for v in skew.values()),
            )
        state["phase"] = "run"
        start_at = time.time() + args.start_delay
        procs = {
            n: fleet[n].spawn(f"python3 /vmt-share/reader.py {vm[n]} /vmt-share/ws.json {start_at:.6f} {args.depth}")
            for n in vm
            if n in args.readers
        }
        prefetchers = {}
        if args.prefetch:
            # the boot-profile prefetch (as Tree.attach starts it): from the end, beside the VM
            for n in vm:
                code = (
                    ctor(fleet[n], export=False)
                    + f"import json, time\ntime.sleep(max(0.0, {start_at:.6f} - time.time()))\n"
                    + f"out(node.prefetch({IMAGE_ID!r}, json.load(open('/vmt-share/ws.json')), reverse=True))\n"
                )
                fleet[n].write_file("prefetch.py", (PY_PRELUDE + code).encode())
                prefetchers[n] = fleet[n].spawn("python3 /vmt-share/prefetch.py")
        log.info(
            "[%s] %d readers start together in %.1fs, each reads %d extents (%.1f MiB)",
            key,
            len(procs),
            start_at - time.time(),
            len(extents),
            sum(n for _, n in extents) / mib,
        )
        results, failed = {}, []
        deadline = time.monotonic() + args.start_delay + args.timeout
        for n, p in procs.items():
            try:
                rc, out = p.wait(max(1.0, deadline - time.monotonic()))
            except HarnessError as e:
                failed.append(f"{n}: {e}")
                continue
            r = None
            for line in out.splitlines():
                if line.startswith("@@JSON "):
                    r = json.loads(line[7:])
            if rc != 0 or r is None or r["errors"]:
                failed.append(f"{n}: rc={rc} {out[-2000:]}")
                continue
            results[n] = r
            log.info("[%s] reader %s done in %.1fs (started %.2fs late)", key, n, r["end"] - start_at, max(0.0, r["late_s"]))
        prefetch_reports = {}
        for n, p in prefetchers.items():
            rc, out = p.wait(max(1.0, deadline - time.monotonic()))
            rep = next((json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("@@JSON ")), None)
            if rc != 0 or rep is None:
                failed.append(f"{n} prefetch: rc={rc} {out[-2000:]}")
            prefetch_reports[n] = rep
        if failed:
            raise RuntimeError(f"[{key}] readers failed:\n" + "\n".join(failed))
        after = on_all(fleet, NODES, counters)

        def cache_status(node):
            try:
                st = py(node, ctor(node, export=False) + "out(node.status())")
                return (st.get("templates", {}).get(IMAGE_ID) or {}).get("cache_status")
            except Exception as e:  # informative only
                return f"status failed: {e}"

        status = on_all(fleet, list(vm), cache_status)

    d = {n: {k: after[n][k] - before[n][k] for k in ("disk_read_bytes", "rx", "tx")} for n in NODES}
    edges = []
    for child, parent in TREE.items():
        b = d[child]["disk_read_bytes"]
        edges.append(
            {
                "parent": parent,
                "child": child,
                "bytes": b,
                "ratio": round(b / ws_bytes, 4),
                "nic_rx_bytes": d[child]["rx"],
                "nic_ratio": round(d[child]["rx"] / ws_bytes, 4),
            }
        )
    reader_times = {n: round(r["end"] - start_at, 3) for n, r in results.items()}
    data_ok = {n: r["digest"] == digest for n, r in results.items()}
    res = {
        "engine": engine,
        "cache_block_kib": block_kib,
        "completion_s": round(max(r["end"] for r in results.values()) - start_at, 3),
        "origin_bytes": d["o"]["tx"],
        "origin_ratio": round(d["o"]["tx"] / ws_bytes, 4),
        "edges": edges,
        "max_edge_ratio": max(e["ratio"] for e in edges),
        "reader_times_s": reader_times,
        "reader_late_s": {n: round(max(0.0, r["late_s"]), 3) for n, r in results.items()},
        "data_ok": data_ok,
        "nodes": {
            n: {"nic_rx_bytes": d[n]["rx"], "nic_tx_bytes": d[n]["tx"], "parent_read_bytes": d[n]["disk_read_bytes"]}
            for n in NODES
        },
        "clock_skew_s": skew,
        "cache_status": status,
        "prefetch": prefetch_reports,
        "wall_s": round(time.monotonic() - t_engine, 1),
    }
    res["meets_goals"] = bool(
        all(e["ratio"] <= EDGE_GOAL for e in edges) and res["origin_bytes"] <= FANOUT * ws_bytes and all(data_ok.values())
    )
    if not all(data_ok.values()):
        log.error("[%s] DATA MISMATCH on %s", key, [n for n, ok in data_ok.items() if not ok])
    log.info(
        "[%s] completion %.1fs, origin %.2f x W, max edge %.2f x W, goals %s (%.0fs in all)",
        key,
        res["completion_s"],
        res["origin_ratio"],
        res["max_edge_ratio"],
        "MET" if res["meets_goals"] else "not met",
        res["wall_s"],
    )
    return res


# ----------------------------------------------------------------------------- report
def choose_default(engines: dict):
    ok = [k for k, r in engines.items() if r.get("meets_goals")]
    if ok:
        return min(ok, key=lambda k: engines[k]["completion_s"]), True
    done = [k for k, r in engines.items() if "completion_s" in r]
    if not done:
        return None, False
    return min(done, key=lambda k: (engines[k]["max_edge_ratio"], engines[k]["completion_s"])), False


def table(doc) -> str:
    w = doc["working_set_bytes"]
    lines = [
        f"Working set W = {w / 2**20:.1f} MiB ({doc['working_set']}), image {doc['image_bytes'] / 2**20:.0f} MiB, "
        f"links {doc['rate'] or 'unshaped'}, reader depth {doc['depth']}"
        f"{'' if set(doc['readers']) == set(TREE) else ', readers only on ' + ','.join(doc['readers'])}; edge = data bytes the child read from "
        f"its parent / W (NIC rx / W in brackets); goal: every edge <= {EDGE_GOAL}, origin <= {FANOUT} x W.",
        "",
        "| engine | completion (s) | origin tx / W | o→r1 | r1→r2 | r2→r3 | r1→r1b | max edge | goals |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in doc["engines"].items():
        if "error" in r:
            lines.append(f"| {k} | failed: {r['error'].splitlines()[0][:80]} | | | | | | | |")
            continue
        e = {(x["parent"], x["child"]): x for x in r["edges"]}
        cell = [f"{e[(p, c)]['ratio']:.2f} ({e[(p, c)]['nic_ratio']:.2f})" for c, p in TREE.items()]
        mark = " **(default)**" if k == doc["default"] else ""
        lines.append(
            f"| {k}{mark} | {r['completion_s']:.1f} | {r['origin_ratio']:.2f} | "
            + " | ".join(cell)
            + f" | {r['max_edge_ratio']:.2f} | {'met' if r['meets_goals'] else 'not met'} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python3 -m bench.cache_engines",
        description=__doc__.split("\n\n")[0] + ".\n\nA chain o -> r1 -> r2 -> r3 plus r1 -> r1b in UML nodes; "
        "all readers start together on cold caches. Writes per engine, per tree edge, bytes sent / working-set "
        "bytes and the fleet's completion time. Needs root and user-mode Linux (lab).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Engines: 'bcache' or 'dm-cache-<N>k' (dm-cache, smq, N KiB cache blocks). Each engine runs in a "
        "fresh fleet. Example: python3 -m bench.cache_engines --engines bcache,dm-cache-64k --rate 100mbit",
    )
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help="comma-separated engine keys (default: %(default)s)")
    ap.add_argument("--working-set-mib", type=int, default=64, help="synthetic working set (default: %(default)s MiB)")
    ap.add_argument("--image-mib", type=int, default=256, help="synthetic image size (default: %(default)s MiB)")
    ap.add_argument("--seed", type=int, default=3, help="seed of the synthetic working set (default: %(default)s)")
    ap.add_argument(
        "--trace",
        nargs="?",
        const=DEFAULT_TRACE,
        default=None,
        metavar="PATH",
        help="use a recorded boot read trace as the working set (default path: "
        "bench/traces/debian12-boot.json); without this flag the trace is used if that file exists "
        "(--no-trace: never)",
    )
    ap.add_argument("--no-trace", action="store_true", help="use the synthetic working set even if a trace exists")
    ap.add_argument(
        "--rate", default="200mbit", help="link limit of every node, each direction ('none': unshaped; default: %(default)s)"
    )
    ap.add_argument(
        "--readers",
        default=",".join(TREE),
        help="the relays whose VM reads the working set "
        "(default: all: %(default)s); every relay attaches a VM either way (for experiments: "
        "e.g. 'r3' alone shows what one stream costs each edge)",
    )
    ap.add_argument(
        "--prefetch",
        action="store_true",
        help="every relay also prefetches the working set (the boot "
        "profile) from its end backwards, from the common start, as Tree.attach does",
    )
    ap.add_argument(
        "--readahead-kib",
        type=int,
        default=None,
        help="readahead of a coalescing template (Node(readahead_kib=...); default: the library's)",
    )
    ap.add_argument("--depth", type=int, default=1, help="concurrent reads per reader (default: %(default)s)")
    ap.add_argument("--mem", default="384M", help="guest RAM per node (default: %(default)s)")
    ap.add_argument(
        "--start-delay",
        type=float,
        default=8.0,
        help="seconds from spawning the readers to their common start time (default: %(default)s)",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="per engine, for the readers (default: %(default)s s)")
    ap.add_argument(
        "--retries",
        type=int,
        default=1,
        help="set-up failures (before any reader starts) are retried this many times in a fresh fleet (default: %(default)s)",
    )
    ap.add_argument(
        "--out",
        help="JSON results (default: bench/results/cache-engines[-prefetch][-readaheadN]..."
        ".json, named by the options that differ from the defaults)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="synthetic 32 MiB working set over a 128 MiB image, no "
        "trace unless --trace is given (faster; below the 64 MiB the goal is judged on, for trying things out)",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny run for tests: bcache only, 8 MiB working set over a 32 MiB image, no trace"
    )
    host_memory.add_option(ap)
    args = ap.parse_args(argv)
    args.host_memory = host_memory.choice(args.host_memory, args.smoke)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("vmthunder.harness").setLevel(logging.WARNING)

    if args.smoke:
        args.engines, args.working_set_mib, args.image_mib, args.no_trace = "bcache", 8, 32, True
        args.start_delay = min(args.start_delay, 6.0)
    elif args.quick:
        args.working_set_mib, args.image_mib = 32, 128
        args.no_trace = args.no_trace or args.trace is None
    args.readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    if not args.readers or set(args.readers) - set(TREE):
        ap.error(f"--readers: a comma-separated subset of {','.join(TREE)}")
    if args.rate.lower() in ("none", "0", ""):
        args.rate = None
    keys = [k.strip() for k in args.engines.split(",") if k.strip()]
    for k in keys:
        try:
            parse_engine(k)
        except argparse.ArgumentTypeError as e:
            ap.error(str(e))
    if os.geteuid() != 0:
        ap.error("must run as root (UML nodes, network namespaces)")
    ok, why = uml_available()
    if not ok:
        print(f"user-mode Linux cannot run here: {why}", file=sys.stderr)
        return 2

    trace = args.trace or (None if args.no_trace or not os.path.exists(DEFAULT_TRACE) else DEFAULT_TRACE)
    if args.no_trace:
        trace = None
    scenario = record.cache_engines_name(
        args.prefetch, args.readahead_kib, args.rate, bool(trace), args.smoke, args.readers, list(TREE)
    )
    args.out = args.out or os.path.join(record.RESULTS, scenario + ".json")
    tmp = tempfile.mkdtemp(prefix="vmt-bench-ce-")
    stack = contextlib.ExitStack()
    try:
        image_path = os.path.join(tmp, "origin.img")
        if trace:
            image_bytes, extents = trace_working_set(trace)
            source = f"boot trace {os.path.relpath(trace, REPO)} ({len(extents)} reads)"
        else:
            image_bytes = args.image_mib << 20
            extents = synthetic_working_set(image_bytes, args.working_set_mib << 20, args.seed)
            source = f"synthetic: {len(extents)} reads of 4-128 KiB, disjoint, random order, seed {args.seed}"
        ws_bytes = union_bytes(extents)
        log.info("working set: %s, W = %.1f MiB, image %.0f MiB", source, ws_bytes / 2**20, image_bytes / 2**20)
        make_origin_image(image_path, image_bytes, extents, full_random=image_bytes <= (1 << 30))
        digest = expected_digest(image_path, extents)
        kept = host_memory.enter(stack, args.host_memory, host_memory.want_for(len(TREE) + 1, parse_size(args.mem), image_bytes))
        prov = record.provenance()
        if trace:
            prov["trace_sha1"] = record.file_sha1(trace)
        doc = {
            "provenance": prov,
            "host_memory": kept,
            "default": None,
            "working_set_bytes": ws_bytes,
            "engines": {},
            "goals_met_by_default": False,
            "working_set": source,
            "image_bytes": image_bytes,
            "reads": len(extents),
            "read_bytes": sum(n for _, n in extents),
            "rate": args.rate,
            "depth": args.depth,
            "readers": args.readers,
            "topology": {c: p for c, p in TREE.items()},
            "goal": {"edge_ratio_max": EDGE_GOAL, "origin_bytes_max": FANOUT * ws_bytes},
            "command": " ".join(["python3", "-m", "bench.cache_engines"] + (argv if argv is not None else sys.argv[1:])),
            "bytes_note": "edges[].bytes: data the child read from its parent (block-layer counters of its "
            "iSCSI disk); nic_rx_bytes: the child's NIC rx (TCP/iSCSI headers included); origin_bytes: "
            "the origin's NIC tx",
        }
        t_all = time.monotonic()
        for k in keys:
            setup_errors = []
            for attempt in range(1 + args.retries):
                try:
                    doc["engines"][k] = run_engine(k, args, image_path, image_bytes, extents, ws_bytes, digest)
                    break
                except SetupError as e:
                    setup_errors.append(str(e).splitlines()[0][:1000])
                    left = args.retries - attempt
                    log.error(
                        "[%s] set-up failed%s: %s", k, f", again in a fresh fleet ({left} left)" if left else "", str(e)[:3000]
                    )
                    doc["engines"][k] = {"error": f"SetupError: {e}"}
                except Exception as e:
                    log.exception("[%s] failed", k)
                    doc["engines"][k] = {"error": f"{type(e).__name__}: {e}"}
                    break
            if setup_errors:
                doc["engines"][k]["setup_failures"] = setup_errors
        doc["default"], doc["goals_met_by_default"] = choose_default(doc["engines"])
        doc["total_s"] = round(time.monotonic() - t_all, 1)
        record.write_result(args.out, doc)
        record.append_history(args.out, record.cache_engines_summary(doc, os.path.splitext(os.path.basename(args.out))[0]))
        log.info(
            "wrote %s (%.0fs); default engine: %s (goals %s)",
            args.out,
            doc["total_s"],
            doc["default"],
            "met" if doc["goals_met_by_default"] else "NOT met by any engine",
        )
        print(table(doc))
        return 0 if all("error" not in r for r in doc["engines"].values()) else 1
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
