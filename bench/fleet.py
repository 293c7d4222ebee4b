#!/usr/bin/env python3
"""Boot a fleet of VMs from one image volume: the vmthunder relay tree against plain boot from
volume ("direct") and a full copy before boot ("full_copy", Nova's image cache), on the same
shaped links, in user-mode Linux nodes (lab).

Topology: one origin node "o" (the storage server: exports a random-data image volume over
iSCSI) and N compute nodes cn1..cnN on one bridge, the tree's registry (etcd) on the host side
of the bridge as a controller would run it (natively, not in UML), every
link shaped with tc to --rate in each direction. The default is the lab's faithful rate for the
fleet's size: a rate at which the chain's run leaves the host well below ~70 % busy, so that
links, not the two host cores, bound it (bench/README.md, "Goals, and the lab's faithful rate"):
100 Mbit/s up to 2 nodes, 50 up to 4, 15 up to 8, 10 up to 16. Faster rates measure this host's
CPU (an 8-node chain at 100 Mbit/s keeps two cores 96 % busy). M VMs (default one per node; more go
round-robin) each replay a boot read trace on their device.

Modes (each in a fresh fleet of the same shape and links: cold caches, no session or page
cache left by another mode):
  tree       each compute node runs a member process (a stand-in for nova-compute: registry
             membership, vmthunder.tree.Tree upkeep) that attaches its VMs with Tree.attach
             (engine bcache: cache on read; re-export to children; a dm snapshot per VM); the
             tree forms through the registry (etcd on the controller) with fan-out --fanout.
             `tree-fK` runs the tree again with fan-out K in the same fleet (a new image id).
             Each node that builds a template prefetches the trace as its boot profile
             (Tree.attach(profile=...)); `tree-nopf`, `tree-fK-nopf`: without the prefetch.
  direct     every node logs in to the origin volume and every VM reads the raw iSCSI disk
             with O_DIRECT: plain boot from volume, no cache, no reuse.
  full_copy  every node first copies the whole image from the origin to a local disk (1 MiB
             O_DIRECT reads, as Nova's image cache downloads the image), then its VMs replay
             the trace on the local copy; a VM's time = copy + local replay.

The trace: --trace PATH (default bench/traces/debian12-boot.json when it exists) is a recorded
boot: {"image_bytes", "reads": [[t_seconds, offset, length], ...]}; --trace synthetic is a
deterministic stand-in (mixed 4-128 KiB reads, mostly sequential runs over scattered "files",
a few re-reads: --synthetic-ws-mib over --synthetic-image-mib). Reads are widened to 4 KiB
alignment (O_DIRECT on bcache needs it). The working set W is the union of the reads.

Start (--start): "attach" (default), as Nova would: at the launch instant every node starts
attaching (tree: Tree.attach through the registry; direct: iSCSI login; full_copy: login and
copy) and each VM boots as soon as its disk is ready; a VM's time runs from the launch, joins
included. "sync": everything is attached first, then all VMs start reading at the same instant
(the data path alone; with identical traces in lockstep, the worst case for concurrent misses).

Replay: reads in trace order with O_DIRECT, at most --depth in flight (default 8: one VM alone
then gets close to its link; at depth 1 a VM is bound by per-request latency, not by links).
Think time is ignored by default (--no-think): the recorded boot ran under an emulator (TCG,
234 s), whose CPU time between reads would dominate every mode and hide the data path being
compared; --think honours each read's recorded time offset as a lower bound.

Measured per mode: each VM's time to finish its reads (from the common start), the fleet's
completion (the last VM), bytes the origin's link sent (NIC counters, headers included) and the
data bytes each child read from each parent (block-layer counters of its iSCSI disks, per
session: the tree's edges), each divided by W; the tree (parents of every node, join times);
CPU: the fleet's core-seconds, the host's busy share, and each node's core-seconds and busiest
2 s (a UML node has one CPU: a node at ~1.0 core is saturated whatever the host has left).
Bounds: link_bound_s = W / rate (every node must receive W through its link); with fan-out k a
tree relay uploads k x W, so the tree itself cannot finish before k x W / rate (tree_bound_s).

The full copy moves the whole image to every node (8 x 2 GiB over the origin's link: ~23 min at
100 Mbit/s, 2.5 h at 15),
so by default it is not run: its link bound, image bytes x nodes / rate, is printed as a bound
(what the copy cannot beat); --full-copy measure runs it.

Output: progress on stderr, then a table and the PNG's path on stdout, <out>/<scenario>.json
named by the run's parameters (fleet-8n-15mbit.json; --name to choose) with its provenance, and
<out>/<scenario>-timeline.png (VMs over time and bytes per link per mode; bench/plot.py redraws
it from the JSON); with --scaling 2,4,8 one fleet per size, <out>/fleet-scaling-15mbit.json and
a markdown table. Each run appends its summary to <out>/history.jsonl. Needs root and
user-mode Linux.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench import fleet_guest, host_memory, record  # fleet_guest: the replay's command line
from bench.fleet_report import goals, plot, scaling_table, table
from bench.trace import expected_digest, load_trace, make_origin_image, synthetic_trace, trace_bin, union_bytes
from lab import Fleet, HarnessError, uml_available
from lab._util import parse_rate, parse_size
from lab.guestpy import py  # a vmthunder snippet run on a node; its errors come back as GuestError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

DEFAULT_OUT = os.path.join(HERE, "results")
DEFAULT_TRACE = os.path.join(HERE, "traces", "debian12-boot.json")
GUEST_SCRIPT = os.path.join(HERE, "fleet_guest.py")
REPLAY_C = os.path.join(HERE, "replay.c")
SUBNET = "198.18.30.0/24"
VOLUME = "fleet"
STATE_DIR = "/var/lib/vmthunder"
COW_MIB = 32
PAGE = 4096
MIB = 1 << 20
ALL_MODES = ("tree", "direct", "full_copy")
# tree, tree-fK (fan-out K), tree-nopf / tree-fK-nopf (no boot-profile prefetch)
# The lab's faithful rate by fleet size (up to so many compute nodes, rate): a rate at which the
# chain's run kept this 2-core host well below ~70 % busy, so that links bound it (bench/README.md,
# 2026-12-05: 2 nodes at 100 Mbit/s, 4 at 50, 8 at 15 and 16 at 10 Mbit/s left 41-55 %; 8 nodes at
# 25 Mbit/s 56 %, 16 at 15 Mbit/s 68 %).
FAITHFUL_RATES = ((2, "100mbit"), (4, "50mbit"), (8, "15mbit"), (16, "10mbit"))
TREE_MODE = re.compile(r"tree(?:-f(\d+))?(-nopf)?")

log = logging.getLogger("bench.fleet")


def build_replay():
    """bench/replay.c compiled with the host's cc (the guests run the host's userland), or None
    (then the guests run fleet_guest.py's replay, which costs their nodes more CPU)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "replay")
        p = subprocess.run(["cc", "-O2", "-o", out, REPLAY_C], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        if p.returncode != 0:
            log.warning("cannot build %s (%s): the Python replay stands in for the VMs", REPLAY_C, p.stdout.decode()[-500:])
            return None
        with open(out, "rb") as fh:
            return fh.read()


class BenchError(RuntimeError):
    pass


def guest(node, args: str, timeout: float = 120) -> str:
    return node.check(f"python3 /vmt-share/fleet_guest.py {args}", timeout=timeout)


def parallel(fn, items):
    """fn(item) for every item on threads; returns {item: result}; re-raises the first error."""
    res, errs = {}, []

    def run(i):
        try:
            res[i] = fn(i)
        except BaseException as e:  # re-raised below, in the caller's thread
            errs.append((i, e))

    ts = [threading.Thread(target=run, args=(i,)) for i in items]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        i, e = errs[0]
        raise BenchError(f"{i}: {type(e).__name__}: {e}") from e
    return res


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def node_ticks(fleet) -> dict:
    """CPU ticks (user + system) of each node's UML process group, by node name. A UML node runs
    one CPU (its kernel and its guest processes take turns), so a node near 1.0 core is saturated
    whatever the host has left."""
    names = {n.pid: name for name, n in fleet.nodes.items() if n.pid}
    ticks = dict.fromkeys(names.values(), 0)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                st = fh.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2 :].split()
        if len(fields) > 12 and int(fields[2]) in names:
            ticks[names[int(fields[2])]] += int(fields[11]) + int(fields[12])
    return ticks


def cpu_snapshot(fleet) -> dict:
    """CPU ticks of every process of the fleet's UML process groups, the host's busy/total
    ticks (/proc/stat) and load average: to tell link-bound from CPU-bound runs."""
    fleet_ticks = sum(node_ticks(fleet).values())
    with open("/proc/stat") as fh:
        cpu = [int(x) for x in fh.readline().split()[1:]]
    idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0)
    with open("/proc/loadavg") as fh:
        load = float(fh.read().split()[0])
    steal = cpu[7] if len(cpu) > 7 else 0  # this host is a VM: time its hypervisor ran others
    return {"fleet": fleet_ticks, "busy": sum(cpu) - idle, "steal": steal, "total": sum(cpu), "load": load, "t": time.time()}


def cpu_summary(a, b) -> dict:
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    wall = max(1e-3, b["t"] - a["t"])
    total = max(1, b["total"] - a["total"])
    return {
        "fleet_cpu_s": round((b["fleet"] - a["fleet"]) / hz, 1),
        "fleet_cores": round((b["fleet"] - a["fleet"]) / hz / wall, 2),
        "host_busy": round((b["busy"] - a["busy"]) / total, 3),
        "host_steal": round((b.get("steal", 0) - a.get("steal", 0)) / total, 3),
        "host_cores": ncpu,
        "loadavg_1m": [a["load"], b["load"]],
    }


def node_load(samples, window_s: float = 2.0) -> dict:
    """From [t, {node: ticks}] samples: each node's CPU seconds over the run and its busiest
    window (cores, averaged over >= window_s): which node, if any, ran out of its one CPU."""
    if len(samples) < 2:
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    first, last = samples[0][1], samples[-1][1]
    peak = dict.fromkeys(last, 0.0)
    j = 0
    for i, (t0, a) in enumerate(samples):
        j = max(j, i + 1)
        while j < len(samples) and samples[j][0] - t0 < window_s:
            j += 1
        if j == len(samples):
            break
        t1, b = samples[j]
        for n in peak:
            peak[n] = max(peak[n], (b.get(n, 0) - a.get(n, 0)) / hz / (t1 - t0))
    return {
        "node_cpu_s": {n: round((last[n] - first.get(n, 0)) / hz, 1) for n in last},
        "node_peak_cores": {n: round(v, 2) for n, v in peak.items()},
        "node_peak_window_s": window_s,
        "node_samples": [[t, {n: round((v - first.get(n, 0)) / hz, 2) for n, v in s.items()}] for t, s in samples],
    }


def cpu_until(node_samples, t: float) -> float:
    """The fleet's CPU seconds from the first sample to the last one taken at or before t (from
    node_load's node_samples): what the joins cost, for t = the last attach."""
    got = [sum(s.values()) for ts, s in node_samples if ts <= t]
    return round(got[-1], 1) if got else 0.0


def tap_counters(fleet) -> dict:
    """Host view of every node's link: {node: [guest_tx, guest_rx]} in one host command."""
    names = list(fleet.nodes)
    files = " ".join(
        f"/sys/class/net/tap{fleet[n].index}/statistics/rx_bytes /sys/class/net/tap{fleet[n].index}/statistics/tx_bytes"
        for n in names
    )
    p = subprocess.run(
        ["ip", "netns", "exec", fleet.netns, "sh", "-c", f"cat {files}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        timeout=20,
    )
    v = [int(x) for x in p.stdout.split()]
    if len(v) != 2 * len(names):
        raise BenchError(f"tap counters: {p.stdout!r}")
    return {n: [v[2 * i], v[2 * i + 1]] for i, n in enumerate(names)}


# ============================================================================= one fleet
class FleetRun:
    def __init__(self, args, trace, image_path, ws_bytes, digest, n, m):
        self.a = args
        self.trace = trace
        self.replay_bin = None  # guest path of the C replay once the fleet is set up
        self.image_path = image_path
        self.image_bytes = trace["image_bytes"]
        self.W = ws_bytes
        self.digest = digest
        self.n = n
        self.m = m
        self.rate_bps = parse_rate(args.rate)
        self.cns = [f"cn{i + 1}" for i in range(n)]
        self.vms = {f"vm{j + 1:02d}": self.cns[j % n] for j in range(m)}
        self.vms_of = {c: [v for v, h in self.vms.items() if h == c] for c in self.cns}
        self.modes = args.modes

    # ------------------------------------------------------------------ sizing
    def local_device_bytes(self) -> int:
        """A compute node's local device: the bcache cache set (the working set twice over, at
        least 128 MiB) and a COW slice per VM."""
        self.cache_mib = max(128, -(-2 * self.W // MIB))
        vpn = max(len(v) for v in self.vms_of.values())
        return (self.cache_mib + COW_MIB * vpn + 64 + 16) * MIB

    def ram_local_disk(self, mode) -> bool:
        """The mode's local device is a brd RAM disk in each compute node (/dev/ram0), not ubdb."""
        return mode.startswith("tree") and self.a.local_disk == "ram"

    def local_disks(self, mode) -> dict:
        """Per compute node's UML disks: ubdb, the local device when it is not a RAM disk in the
        node (--local-disk); ubdc, the copy target of full_copy."""
        disks = {}
        if not self.ram_local_disk(mode):
            disks["ubdb"] = self.local_device_bytes()
        if mode == "full_copy":
            disks["ubdc"] = self.image_bytes
        return disks

    def fanout_of(self, mode: str) -> int:
        m = TREE_MODE.fullmatch(mode)
        return int(m.group(1)) if m.group(1) else self.a.fanout

    def prefetch_of(self, mode: str) -> bool:
        return TREE_MODE.fullmatch(mode).group(2) is None

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        """Every mode in a fresh fleet of the same shape and links: cold caches, no iSCSI
        session, cache set or page cache left by another mode."""
        a = self.a
        t0 = time.monotonic()
        doc = {
            "nodes": self.n,
            "vms": self.m,
            "rate_bps": self.rate_bps,
            "fanout": a.fanout,
            "working_set_bytes": self.W,
            "image_bytes": self.image_bytes,
            "link_bound_s": round(self.W * 8 / self.rate_bps, 3),
            "tree_bound_s": round(a.fanout * self.W * 8 / self.rate_bps, 3),
            "direct_bound_s": round(self.m * self.W * 8 / self.rate_bps, 3),
            "full_copy_bound_s": round(self.n * self.image_bytes * 8 / self.rate_bps, 3),
            "modes": {},
        }
        for i, mode in enumerate(self.modes):
            t = time.monotonic()
            nodes = {"o": {"disks": {"ubdb": self.image_path}, "mem": a.origin_mem}}
            for c in self.cns:
                nodes[c] = {"disks": self.local_disks(mode)}
            name = f"fl{os.getpid()}n{self.n}m{i}"[:20]
            log.info(
                "[%s] booting %d nodes (origin + %d compute, fleet %s, links %s, %s per node)",
                mode,
                self.n + 1,
                self.n,
                name,
                a.rate,
                a.mem,
            )
            try:
                with Fleet(nodes=nodes, name=name, subnet=SUBNET, rate=a.rate, mem=a.mem, boot_timeout=180) as fleet:
                    self.fleet = fleet
                    boot_s = round(time.monotonic() - t, 1)
                    self.ip_to_node = {fleet[x].ip: x for x in fleet.nodes}
                    self.prepare(mode)
                    if mode.startswith("tree"):
                        res = self.run_tree(mode, self.fanout_of(mode), self.prefetch_of(mode))
                    else:
                        res = self.run_baseline(mode)
                    res["boot_s"] = boot_s
            except Exception as e:
                log.exception("[%s] failed", mode)
                res = {"error": f"{type(e).__name__}: {e}"[:4000]}
            res["wall_s"] = round(time.monotonic() - t, 1)
            doc["modes"][mode] = res
            if "completion_s" in res:
                log.info(
                    "[%s] fleet completion %.1fs (%.2f x link bound), origin sent %.2f x W, max edge %.2f x W",
                    mode,
                    res["completion_s"],
                    res["completion_s"] / doc["link_bound_s"],
                    res["origin_bytes"] / self.W,
                    res["max_edge_ratio"],
                )
                log.info(
                    "[%s] CPU: fleet %.1f core-s, host %.0f %% busy (%.0f %% stolen by the hypervisor)",
                    mode,
                    res["cpu"]["fleet_cpu_s"],
                    100 * res["cpu"]["host_busy"],
                    100 * res["cpu"].get("host_steal", 0),
                )
                peak = res["cpu"].get("node_peak_cores") or {}
                if peak:
                    log.info(
                        "[%s] busiest nodes (cores over %.0f s; a UML node has one CPU): %s",
                        mode,
                        res["cpu"]["node_peak_window_s"],
                        ", ".join(f"{n} {v:.2f}" for n, v in sorted(peak.items(), key=lambda kv: -kv[1])[:4]),
                    )
        doc["total_s"] = round(time.monotonic() - t0, 1)
        return doc

    def prepare(self, mode):
        f = self.fleet
        o = f["o"]
        portal = f"{o.ip}:3260"
        tree = mode.startswith("tree")
        if tree:
            # The registry's etcd runs where a cloud runs it, on a controller, not on the storage
            # origin: natively on the host side of the bridge (in a UML node each of its syscalls
            # is a ptrace round trip: it was 7 % of the host's CPU samples, on the origin node).
            url = f"http://{f.host_ip}:2379"
            f.host_service(
                "etcd",
                [
                    "etcd",
                    "--name",
                    "ctl",
                    "--data-dir",
                    os.path.join(f.shm_dir, "etcd"),
                    "--listen-client-urls",
                    url,
                    "--advertise-client-urls",
                    url,
                    "--listen-peer-urls",
                    "http://127.0.0.1:2380",
                ],
                log_path=os.path.join(f.workdir, "etcd.log"),
            )
            self.registry = f"etcd3+{url}"
        if self.a.min_tso_segs is not None:
            setting = f"echo {int(self.a.min_tso_segs)} > /proc/sys/net/ipv4/tcp_min_tso_segs"
            parallel(lambda n: f[n].check(setting, timeout=60), list(f.nodes))
        if self.ram_local_disk(mode):
            kib = self.local_device_bytes() // 1024
            parallel(lambda c: f[c].check(f"modprobe brd rd_nr=1 rd_size={kib} max_part=0", timeout=60), self.cns)
        py(o, f"out(vmthunder.export_volume({VOLUME!r}, '/dev/ubdb', {portal!r}))")
        self.conn = {}
        for c in self.cns:
            self.conn[c] = py(o, f"out(vmthunder.allow_initiator({VOLUME!r}, {f[c].initiator_iqn!r}, {portal!r}))")
        script = open(GUEST_SCRIPT, "rb").read()
        trace_json = json.dumps({"image_bytes": self.image_bytes, "reads": self.trace["reads"]}).encode()
        trace_packed = trace_bin(self.trace["reads"])
        replay_bin = build_replay() if self.a.replay == "c" else None
        self.replay_bin = "/vmt-share/replay" if replay_bin else None
        for c in self.cns:
            f[c].write_file("fleet_guest.py", script)
            f[c].write_file("trace.json", trace_json)
            f[c].write_file("trace.bin", trace_packed)
            if replay_bin:
                f[c].write_file("replay", replay_bin, mode=0o755)
            f[c].write_file("origin.json", json.dumps(self.conn[c]).encode())
        if tree:
            deadline = time.monotonic() + 60
            health = f"python3 -c \"import urllib.request; urllib.request.urlopen('{url}/health', timeout=2)\""
            while o.run(health, timeout=20)[0] != 0:
                if time.monotonic() > deadline:
                    raise BenchError(f"etcd did not come up at {url} (log: {f.workdir}/etcd.log)")
                time.sleep(1)

    # ------------------------------------------------------------------ measuring
    def counters(self) -> dict:
        res = parallel(lambda c: json.loads(guest(self.fleet[c], "counters", timeout=60)), self.cns)
        res["_taps"] = tap_counters(self.fleet)
        res["_cpu"] = cpu_snapshot(self.fleet)
        return res

    def replay_cmd(self, dev, vm, mode, go=True) -> str:
        return shlex.join(
            fleet_guest.replay_argv(
                dev,
                "/vmt-share/trace.json",
                f"/vmt-share/{mode}/{vm}.json",
                self.a.depth,
                self.a.think,
                go=f"/vmt-share/{mode}/go" if go else None,
                binary=self.replay_bin,
                script="/vmt-share/fleet_guest.py",
            )
        )

    def go(self, mode, procs, ready_files) -> float:
        """Wait (bounded) until every reader/copier is up and waiting, then start them all at
        once: the host creates <mode>/go in every node's share (no clock agreement needed)."""
        f = self.fleet
        deadline = time.monotonic() + 60 + 2 * len(ready_files)
        while True:
            waiting = [(n, p) for n, p in ready_files if not (read_json(f[n].host_path(p)) or {}).get("ready")]
            if not waiting:
                break
            for vm, (node, pr) in procs.items():
                if pr.poll() is not None:
                    raise BenchError(f"[{mode}] {vm} on {node} exited early rc={pr.poll()}\n{pr.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"[{mode}] not ready within 60s: {waiting}")
            time.sleep(0.1)
        t = time.time()
        for c in self.cns:
            with open(f[c].host_path(f"{mode}/go"), "w"):
                pass
        return t

    def read_timeout(self, mode) -> float:
        rate = self.rate_bps / 8 * 0.9
        if mode == "full_copy":
            t = self.n * self.image_bytes / rate * 2 + self.m * self.W / rate
        elif mode == "direct":
            t = self.m * self.W / rate * 3
        else:
            t = self.n * self.W / rate * 3
        if self.a.think:
            t += self.trace["reads"][-1][0] if self.trace["reads"] else 0
        if self.a.start == "attach":
            t += 120 + 20 * self.n if mode.startswith("tree") else 60
        return t + 180

    def monitor(self, mode, procs, start_at, copies=None) -> dict:
        """Wait (bounded) until every VM's result is in; show progress; sample link counters."""
        f = self.fleet
        deadline = time.monotonic() + max(0.0, start_at - time.time()) + self.read_timeout(mode)
        samples, cpu_samples = [], []
        total = len(self.trace["reads"])
        last_show = 0.0
        results = {}
        origin_tx0 = None
        while True:
            now = time.time()
            try:
                taps = tap_counters(f)
                samples.append([round(now - start_at, 3), {k: v for k, v in taps.items()}])
                if origin_tx0 is None:
                    origin_tx0 = taps["o"][0]
            except Exception as e:  # sampling is best effort
                log.debug("tap sampling failed: %s", e)
            cpu_samples.append([round(now - start_at, 3), node_ticks(f)])
            prog = {}
            for vm, node in self.vms.items():
                r = read_json(f[node].host_path(f"{mode}/{vm}.json"))
                prog[vm] = r or {}
                if r and "end" in r:
                    results[vm] = r
            for vm, (node, p) in procs.items():
                rc = p.poll()
                if rc is not None and vm not in results:
                    r = read_json(f[node].host_path(f"{mode}/{vm}.json"))
                    if r and "end" in r:
                        results[vm] = r
                    else:
                        logs = ""
                        for name in (f"{mode}/member/out", f"{mode}/boot-{node}.log", f"{mode}/{vm}.json.log"):
                            try:
                                logs += f"--- {name}\n" + open(f[node].host_path(name), errors="replace").read()[-2500:]
                            except OSError:
                                pass
                        raise BenchError(f"[{mode}] {vm} on {node}: exited rc={rc}\n{p.output()[-2000:]}{logs}")
            if len(results) == len(self.vms):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"[{mode}] timed out: {len(results)}/{len(self.vms)} VMs finished")
            if now - last_show >= self.a.progress_s and now >= start_at:
                done_reads = sum(p.get("done", 0) for p in prog.values())
                done_vms = len(results)
                otx = (samples[-1][1]["o"][0] - origin_tx0) if samples and origin_tx0 is not None else 0
                extra = ""
                if copies:
                    cp = [read_json(f[c].host_path(f"{mode}/copy-{c}.json")) or {} for c in self.cns]
                    cbytes = sum(x.get("bytes", 0) for x in cp)
                    extra = f", copies {cbytes / MIB:.0f}/{self.n * self.image_bytes / MIB:.0f} MiB"
                log.info(
                    "[%s] %5.1fs: VMs done %d/%d, reads %d/%d%s, origin sent %.1f MiB",
                    mode,
                    now - start_at,
                    done_vms,
                    len(self.vms),
                    done_reads,
                    total * len(self.vms),
                    extra,
                    otx / MIB,
                )
                last_show = now
            time.sleep(0.5)
        try:
            samples.append([round(time.time() - start_at, 3), tap_counters(f)])
        except Exception:
            pass
        cpu_samples.append([round(time.time() - start_at, 3), node_ticks(f)])
        return {"results": results, "samples": samples, "cpu_samples": cpu_samples}

    def summarize(self, mode, base, results, before, after, parents=None) -> dict:
        """base: {vm: guest time its boot began} (its replay start; the copy start for full_copy)."""
        W = self.W
        bad = {vm: r for vm, r in results.items() if r.get("errors") or not r.get("finished")}
        wrong = {vm: r["digest"] for vm, r in results.items() if r.get("digest") != self.digest}
        vm_times = {vm: round(r["end"] - base[vm], 3) for vm, r in sorted(results.items())}
        # the boot reads alone (from the VM's first read), without attach/login/copy time
        vm_read = {vm: round(r["end"] - r["start"], 3) for vm, r in sorted(results.items())}
        edges = []
        for c in self.cns:
            b, a = before[c]["sessions"], after[c]["sessions"]
            for sid, s in sorted(a.items(), key=lambda kv: int(kv[0])):
                prev = b.get(sid, {})
                same = prev if prev.get("target") == s["target"] else {}  # a session id reused: new counters
                delta = s["read_bytes"] - same.get("read_bytes", 0)
                ios = s.get("read_ios", 0) - same.get("read_ios", 0)
                parent = self.ip_to_node.get(s["address"], s["address"])
                parent = "origin" if parent == "o" else parent
                # reads = SCSI read commands the child sent (each costs both ends a round of
                # iSCSI, TCP and block-layer work, whatever its size)
                edges.append(
                    {
                        "parent": parent,
                        "child": c,
                        "bytes": delta,
                        "ratio": round(delta / W, 4),
                        "reads": ios,
                        "mean_read_kib": round(delta / ios / 1024, 1) if ios else None,
                    }
                )
        if parents is not None:
            # the active path of each child (dm-multipath failover: I/O goes to one path): the
            # session its data came over; the other paths are standby
            for c in self.cns:
                mine = [e for e in edges if e["child"] == c]
                top = max(mine, key=lambda e: e["bytes"], default=None)
                for e in mine:
                    e["role"] = "active" if e is top else "standby"
        edges = [e for e in edges if e["bytes"] > 0 or e.get("role") == "active"]
        taps0, taps1 = before["_taps"], after["_taps"]
        links = {x: {"tx_bytes": taps1[x][0] - taps0[x][0], "rx_bytes": taps1[x][1] - taps0[x][1]} for x in taps1}
        origin_bytes = links["o"]["tx_bytes"]
        origin_data = sum(e["bytes"] for e in edges if e["parent"] == "origin")
        times = list(vm_times.values())
        res = {
            "completion_s": round(max(times), 3),
            "vm_times_s": vm_times,
            "vm_read_s": vm_read,
            "vm_node": dict(self.vms),
            "vm_median_s": round(statistics.median(times), 3),
            "vm_min_s": round(min(times), 3),
            "origin_bytes": origin_bytes,
            "origin_data_bytes": origin_data,
            "origin_ratio": round(origin_bytes / W, 4),
            "edges": edges,
            "max_edge_ratio": round(max((e["ratio"] for e in edges), default=0.0), 4),
            "links": links,
            "cpu": cpu_summary(before["_cpu"], after["_cpu"]),
            "all_finished": not bad and len(results) == len(self.vms),
            "data_ok": not wrong,
        }
        if bad:
            res["failed_vms"] = {vm: (r.get("errors") or ["unfinished"])[:3] for vm, r in bad.items()}
        if wrong:
            res["wrong_digests"] = wrong
            log.error("[%s] DATA MISMATCH on %s", mode, sorted(wrong))
        return res

    def timeline(self, mon, results, base) -> dict:
        """Downsampled link counters (cumulative bytes per node) and VM progress for the plot."""
        s = mon["samples"]
        step = max(1, len(s) // 300)
        keep = s[::step] + ([s[-1]] if s and (len(s) - 1) % step else [])
        t = [x[0] for x in keep]
        tx = {n: [x[1][n][0] - keep[0][1][n][0] for x in keep] for n in (keep[0][1] if keep else {})}
        rx = {n: [x[1][n][1] - keep[0][1][n][1] for x in keep] for n in (keep[0][1] if keep else {})}
        vms = {}
        for vm, r in results.items():
            sm = r.get("samples") or []
            st = max(1, len(sm) // 150)
            off = r["start"] - base[vm]
            pts = sm[::st] + ([sm[-1]] if sm and (len(sm) - 1) % st else [])
            vms[vm] = [[round(off + a, 3), b] for a, b in pts]
        return {"t": t, "tx": tx, "rx": rx, "vm_progress": vms, "vm_bytes": sum(x[2] for x in self.trace["reads"])}

    # ------------------------------------------------------------------ tree
    def run_tree(self, mode, fanout, prefetch) -> dict:
        f = self.fleet
        image = f"img-{mode}".replace("_", "-")
        wd = f"/vmt-share/{mode}/member"
        for c in self.cns:
            os.makedirs(f[c].host_path(f"{mode}/member"), exist_ok=True)
        members = {}
        replay = ""
        if self.a.start == "attach":
            # as Nova would: each VM boots as soon as its disk is attached
            replay = (
                f" --replay-trace /vmt-share/trace.json --replay-dir /vmt-share/{mode} --depth {self.a.depth}"
                + (" --think" if self.a.think else "")
                + (f" --replay-bin {self.replay_bin}" if self.replay_bin else "")
            )
        if prefetch:
            # the recorded boot profile of the image: the member prefetches it through its template
            replay += f" --profile /vmt-share/trace.json --prefetch-order {self.a.prefetch_order}"
            if self.a.prefetch_depth:
                replay += f" --prefetch-depth {self.a.prefetch_depth}"
        for c in self.cns:
            members[c] = f[c].spawn(
                f"python3 /vmt-share/fleet_guest.py member --registry {self.registry} --host {c} --image {image} "
                f"--origin /vmt-share/origin.json --vms {','.join(self.vms_of[c])} --export-ip {f[c].ip} "
                f"--fanout {fanout} --expect-hosts {self.n} --cache-mib {self.cache_mib} --cow-mib {COW_MIB} "
                f"--cache-device {'/dev/ram0' if self.ram_local_disk(mode) else '/dev/ubdb'} "
                f"--workdir {wd} --max-seconds {self.read_timeout(mode) + 900:.0f} --log-level {self.a.member_log_level}{replay} "
                f"> /vmt-share/{mode}/member/out 2>&1"
            )

        def wait_all(fname, timeout, what):
            deadline = time.monotonic() + timeout
            got = {}
            while len(got) < len(self.cns):
                for c in self.cns:
                    if c in got:
                        continue
                    r = read_json(f[c].host_path(f"{mode}/member/{fname}"))
                    if r is not None:
                        if r.get("error"):
                            raise BenchError(f"[{mode}] {c}: {r['error']}")
                        got[c] = r
                    elif members[c].poll() is not None:
                        out = (read_json(f[c].host_path(f"{mode}/member/attached.json")) or {}).get("error", "")
                        tail = open(f[c].host_path(f"{mode}/member/out"), errors="replace").read()[-2500:]
                        raise BenchError(f"[{mode}] member on {c} exited rc={members[c].poll()} {out}\n{tail}")
                if time.monotonic() > deadline:
                    raise BenchError(f"[{mode}] {what}: {sorted(got)} of {self.cns} within {timeout:.0f}s")
                time.sleep(0.2)
            return got

        try:
            wait_all("registered.json", 120, "registered")
            log.info("[%s] %d members registered; all join now (fan-out %d)", mode, self.n, fanout)
            if self.a.start == "attach":
                before = self.counters()
                start_at = self.go(mode, {}, [])
                for c in self.cns:
                    f[c].write_file(f"{mode}/member/go", b"")
                mon = self.monitor(mode, {vm: (c, members[c]) for vm, c in self.vms.items()}, start_at)
                after = self.counters()
                att = wait_all("attached.json", 30, "attached")
                base = {vm: att[c]["t_go"] for vm, c in self.vms.items()}
                joins = {c: round(max(r["t_attached"].values()) - r["t_go"], 3) for c, r in att.items()}
            else:
                for c in self.cns:
                    f[c].write_file(f"{mode}/member/go", b"")
                att = wait_all("attached.json", 120 + 20 * self.n, "attached")
                joins = {c: round(max(r["t_attached"].values()) - r["t_go"], 3) for c, r in att.items()}
                log.info("[%s] joined in %.1fs (last node)", mode, max(joins.values()))
                paths = {vm: att[c]["paths"][vm] for vm, c in self.vms.items()}
                before = self.counters()
                procs = {vm: (c, f[c].spawn(self.replay_cmd(paths[vm], vm, mode))) for vm, c in self.vms.items()}
                start_at = self.go(mode, procs, [(c, f"{mode}/{vm}.json") for vm, c in self.vms.items()])
                mon = self.monitor(mode, procs, start_at)
                after = self.counters()
                base = {vm: r["start"] for vm, r in mon["results"].items()}
            parents = {c: r.get("parents") for c, r in att.items()}
            depth = {c: r.get("depth") for c, r in att.items()}
            log.info("[%s] tree (placement): %s", mode, parents)
            res = self.summarize(mode, base, mon["results"], before, after, parents)
            active = {e["child"]: e["parent"] for e in res["edges"] if e.get("role") == "active"}
            res["fanout"] = fanout
            res["prefetch"] = prefetch
            kids = {}
            for c, p in active.items():
                kids[p] = kids.get(p, 0) + 1

            def level(c, seen=()):
                p = active.get(c, "origin")
                return 1 if p == "origin" or p in seen else 1 + level(p, seen + (c,))

            res["tree_shape"] = {
                "max_children": max(kids.values()),
                "origin_children": kids.get("origin", 0),
                "levels": max(level(c) for c in active),
                "bound_s": round(max(kids.values()) * self.W * 8 / self.rate_bps, 3),
            }
            res["tree"] = {
                "parents": parents,
                "active_parent": active,
                "depth": depth,
                "join_s": joins,
                "joins_wall_s": round(max(joins.values()), 3),
                "attach_s": {vm: att[c]["attach_s"][vm] for vm, c in self.vms.items()},
            }
            res["timeline"] = self.timeline(mon, mon["results"], base)
            res["cpu"].update(node_load(mon["cpu_samples"]))
            if "node_samples" in res["cpu"]:
                res["cpu"]["joins_cpu_s"] = cpu_until(res["cpu"]["node_samples"], max(joins.values()))
            self.stop_members(mode, members)
            members = {}
            cache, events, prefetch_reports = {}, {}, {}
            for c in self.cns:
                if self.a.logs:
                    os.makedirs(self.a.logs, exist_ok=True)
                    try:
                        shutil.copy(f[c].host_path(f"{mode}/member/log"), os.path.join(self.a.logs, f"{mode}-{c}.log"))
                    except OSError as e:
                        log.warning("[%s] no member log of %s: %s", mode, c, e)
                fin = read_json(f[c].host_path(f"{mode}/member/final.json")) or {}
                if fin.get("prefetch"):
                    prefetch_reports[c] = fin["prefetch"]
                st = fin.get("status")
                if isinstance(st, dict):
                    cache[c] = ((st.get("templates") or {}).get(image) or {}).get("cache_status")
                if fin.get("events"):
                    events[c] = fin["events"]
            res["cache_status"] = cache
            res["tree"]["events"] = events
            res["tree"]["prefetch"] = prefetch_reports
            if events:
                log.warning("[%s] tree events: %s", mode, events)
            return res
        finally:
            self.stop_members(mode, members)

    def stop_members(self, mode, members):
        """Two phases: every member stops its upkeep (stop), then all leave the registry (exit)."""
        f = self.fleet
        members = {c: p for c, p in members.items() if f[c].alive()}
        if not members:
            return  # (after a teardown: nothing to stop, nothing to write)
        for phase, done in (("stop", "final.json"), ("exit", None)):
            for c in members:
                try:
                    f[c].write_file(f"{mode}/member/{phase}", b"")
                except Exception:
                    pass
            deadline = time.monotonic() + 30
            if done:
                while time.monotonic() < deadline and not all(
                    os.path.exists(f[c].host_path(f"{mode}/member/{done}")) or members[c].poll() is not None for c in members
                ):
                    time.sleep(0.2)
        for c, p in members.items():
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except Exception:
                try:
                    p.kill()
                except Exception:
                    pass

    # ------------------------------------------------------------------ baselines
    def logins(self) -> dict:
        return parallel(
            lambda c: guest(self.fleet[c], "login --origin /vmt-share/origin.json").strip().splitlines()[-1], self.cns
        )

    def boot_cmd(self, mode, c) -> str:
        think = " --think" if self.a.think else ""
        args = (
            f"boot --host {c} --origin /vmt-share/origin.json --vms {','.join(self.vms_of[c])} "
            f"--trace /vmt-share/trace.json --out-dir /vmt-share/{mode} --go /vmt-share/{mode}/go "
            f"--depth {self.a.depth}{think}"
        )
        if self.a.start == "sync":
            args += " --login-first"
        if mode == "full_copy":
            args += " --copy-to /dev/ubdc"
        if self.replay_bin:
            args += f" --replay-bin {self.replay_bin}"
        return f"python3 /vmt-share/fleet_guest.py {args} > /vmt-share/{mode}/boot-{c}.log 2>&1"

    def run_baseline(self, mode) -> dict:
        """direct: plain boot from volume (every VM reads the raw iSCSI disk of the origin);
        full_copy: the node copies the whole image first, its VMs then read the local copy."""
        f = self.fleet
        for c in self.cns:
            os.makedirs(f[c].host_path(mode), exist_ok=True)
        sync_direct = mode == "direct" and self.a.start == "sync"
        if sync_direct:
            devs = self.logins()
        before = self.counters()
        procs = {}
        if sync_direct:
            # every VM's reader is up and waiting: all start within milliseconds of the signal
            procs = {vm: (c, f[c].spawn(self.replay_cmd(devs[c], vm, mode))) for vm, c in self.vms.items()}
            ready = [(c, f"{mode}/{vm}.json") for vm, c in self.vms.items()]
        else:
            for c in self.cns:
                p = f[c].spawn(self.boot_cmd(mode, c))
                for vm in self.vms_of[c]:
                    procs[vm] = (c, p)
            ready = [(c, f"{mode}/node-{c}.json") for c in self.cns]
        start_at = self.go(mode, procs, ready)
        mon = self.monitor(mode, procs, start_at, copies=mode == "full_copy")
        after = self.counters()
        if sync_direct:
            base = {vm: r["start"] for vm, r in mon["results"].items()}
            nodes = {}
        else:
            nodes = {c: read_json(f[c].host_path(f"{mode}/node-{c}.json")) or {} for c in self.cns}
            base = {vm: nodes[c]["t_go"] for vm, c in self.vms.items()}
        res = self.summarize(mode, base, mon["results"], before, after)
        if nodes:
            res["login_s"] = {c: round(x["t_attached"] - x["t_go"], 3) for c, x in nodes.items() if "t_attached" in x}
        if mode == "full_copy":
            copies = {c: read_json(f[c].host_path(f"{mode}/copy-{c}.json")) or {} for c in self.cns}
            res["copy_s"] = {c: round(x["end"] - nodes[c]["t_go"], 3) for c, x in copies.items() if "end" in x}
            res["copy_bytes"] = {c: x.get("bytes") for c, x in copies.items()}
        res["timeline"] = self.timeline(mon, mon["results"], base)
        res["cpu"].update(node_load(mon["cpu_samples"]))
        return res


def host_speed() -> dict:
    """A fingerprint of the host's single-core speed, taken before the fleet boots: the trees
    are CPU-bound at 100 Mbit/s, so runs on different hosts compare only with this beside them
    (a slower host stretches tree times, not direct's, which the origin's link bounds)."""
    import timeit

    best = min(timeit.repeat("s = 0\nfor i in range(2_000_000): s += i", number=1, repeat=5))
    return {"python_loop_2e6_s": round(best, 4), "cpu_model": _cpu_model(), "cores": os.cpu_count()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    except OSError:
        return "?"


def provenance() -> dict:
    """What ran: the repository commit (and whether the Python layer differs from it) and the
    installed vmthunder package the guests import."""
    import hashlib

    out = {}
    try:
        out["git_commit"] = (
            subprocess.run(
                ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10
            )
            .stdout.decode()
            .strip()
        )
    except Exception:
        pass
    try:
        import vmthunder

        pkg = os.path.dirname(vmthunder.__file__)
        out["vmthunder"] = vmthunder.__version__
        for mod in ("tree.py", "registry.py"):
            p = os.path.join(pkg, mod)
            if os.path.exists(p):
                h = hashlib.sha1(open(p, "rb").read()).hexdigest()[:12]
                repo_p = os.path.join(REPO, "python", "vmthunder", mod)
                same = os.path.exists(repo_p) and hashlib.sha1(open(repo_p, "rb").read()).hexdigest()[:12] == h
                out[mod] = h + ("" if same else " (differs from the repository's)")
    except Exception as e:
        out["vmthunder"] = f"not importable: {e}"
    return out


def write_json(path, doc):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ============================================================================= main
def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python3 -m bench.fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  python3 -m bench.fleet                         # 8 nodes, 8 VMs, 15 Mbit/s: tree, direct, full copy's bound\n"
        "  python3 -m bench.fleet --full-copy measure     # the full copy measured too (~30 min more at 2 GiB)\n"
        "  python3 -m bench.fleet --nodes 4 --vms 8 --modes tree,direct\n"
        "  python3 -m bench.fleet --modes tree,tree-f2,direct --trace synthetic\n"
        "  python3 -m bench.fleet --scaling 2,4,8 --modes tree,direct\n"
        "  python3 -m bench.fleet --nodes 3 --smoke --out /tmp/fleet   # the test suite's short run\n"
        "  python3 -m bench.plot bench/results/fleet-8n-15mbit.json   # its timeline PNG again\n"
        "Leftovers of a killed run: python -m lab cleanup",
    )
    ap.add_argument("--nodes", type=int, default=8, help="compute nodes (default: %(default)s)")
    ap.add_argument("--vms", type=int, default=None, help="VMs, round-robin over the nodes (default: one per node)")
    ap.add_argument(
        "--rate",
        help="every link, each direction, tc syntax (default: the lab's faithful rate for the fleet's "
        "largest size: " + ", ".join(f"{r} up to {n} nodes" for n, r in FAITHFUL_RATES) + ")",
    )
    ap.add_argument(
        "--fanout",
        type=int,
        default=3,
        help="tree fan-out of mode 'tree' (default: %(default)s, the "
        "placement default); add modes tree-f2, tree-f1 ... to compare in the same fleet",
    )
    ap.add_argument(
        "--full-copy",
        choices=("bound", "measure"),
        default="bound",
        help="the full-copy baseline: its link bound, image bytes x nodes / rate, printed as a bound "
        "(default: the first run takes minutes), or measured (adds mode full_copy: ~30 min for a "
        "2 GiB image to 8 nodes at 100 Mbit/s)",
    )
    ap.add_argument(
        "--modes",
        default="tree,direct",
        help="comma-separated: tree, tree-fK (fan-out K), direct, full_copy (default: %(default)s)",
    )
    ap.add_argument(
        "--trace",
        default=None,
        metavar="PATH|synthetic",
        help="boot read trace (default: bench/traces/debian12-boot.json if it exists, else synthetic)",
    )
    ap.add_argument("--synthetic-ws-mib", type=int, default=48, help="synthetic working set (default: %(default)s MiB)")
    ap.add_argument("--synthetic-image-mib", type=int, default=256, help="synthetic image (default: %(default)s MiB)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the synthetic trace (default: %(default)s)")
    ap.add_argument("--depth", type=int, default=8, help="reads in flight per VM (default: %(default)s)")
    ap.add_argument(
        "--start",
        choices=("attach", "sync"),
        default="attach",
        help="attach (default): as Nova would, each VM boots as soon as its disk is attached and "
        "times run from the fleet's launch (joins and logins included); sync: attach everything "
        "first, then all VMs start their reads at the same instant (the data path alone, worst-case "
        "lockstep)",
    )
    th = ap.add_mutually_exclusive_group()
    th.add_argument("--think", action="store_true", help="honour the trace's time offsets as a lower bound")
    th.add_argument("--no-think", dest="think", action="store_false", help="ignore think time (default)")
    ap.add_argument(
        "--replay",
        choices=("c", "python"),
        default="c",
        help="the VM stand-in: c (default: bench/replay.c, built with cc) or python (fleet_guest.py replay); "
        "same reads and digest, the C one costs its node far fewer syscalls and page faults",
    )
    ap.add_argument(
        "--mem",
        default="448M",
        help="RAM per compute node; the default holds the ram local disk "
        "(--local-disk) beside the page cache (default: %(default)s)",
    )
    ap.add_argument("--origin-mem", default="320M", help="RAM of the origin node (default: %(default)s)")
    ap.add_argument("--progress-s", type=float, default=5.0, help="progress line interval (default: %(default)s s)")
    ap.add_argument(
        "--scaling",
        default=None,
        metavar="N1,N2,...",
        help="run one fleet per size (VMs = nodes x --vms-per-node) and write fleet-scaling-<rate>.json",
    )
    ap.add_argument("--vms-per-node", type=int, default=1, help="with --scaling (default: %(default)s)")
    host_memory.add_option(ap)
    ap.add_argument("--logs", metavar="DIR", help="keep each tree member's log (vmthunder's own log lines) in DIR")
    ap.add_argument(
        "--member-log-level",
        choices=("INFO", "DEBUG"),
        default="INFO",
        help="level of the members' logs (DEBUG: each tool run with its duration, each registry "
        "request: where a join's time goes; default: %(default)s)",
    )
    ap.add_argument(
        "--min-tso-segs",
        type=int,
        default=None,
        metavar="N",
        help="set every node's net.ipv4.tcp_min_tso_segs to N (2..64; default: the kernel's 2). TCP "
        "sizes a send to ~1 ms at its pacing rate: 64 KiB on the 1 GbE link the fleet models, ~12 KiB "
        "on its 100 Mbit/s stand-in, so each byte costs the UML nodes ~5x the packets a 1 GbE host "
        "handles; 44 (x 1448 B MSS = 64 KiB) restores the 1 GbE frame count. Every mode gets it. Measured "
        "2026-12-03 (bench/README.md): 44 cut direct reads' CPU ~13 %% but made the 8-node chain "
        "slower (17.3-17.5 s against 15.6-16.6 s) with more CPU, so the default leaves it alone",
    )
    ap.add_argument(
        "--prefetch-order",
        choices=fleet_guest.PREFETCH_ORDERS,
        default="forward",
        help="the tree modes' prefetch walks the boot profile ahead of the VM from its start "
        "(forward, the library default) or from its end while the VM boots from its start (reverse; "
        "default: %(default)s)",
    )
    ap.add_argument(
        "--prefetch-depth",
        type=int,
        choices=range(1, 65),
        metavar="N",
        help="the tree modes' prefetch keeps N reads in flight (1..64; default: the library's, 8 through a coalescing template)",
    )
    ap.add_argument(
        "--local-disk",
        choices=("ram", "ubd"),
        default="ram",
        help="the tree modes' local device (the cache set and the VMs' COW; a compute node's SSD): "
        "ram, a brd RAM disk inside the node (--mem holds it), or ubd, a UML disk over a file in the "
        "host's tmpfs, where each request is a round trip to UML's I/O thread. Both keep the data in "
        "RAM; measured 2026-12-03 (bench/README.md) ubd cost the 8-node chain 10-16 %% more CPU "
        "(default: %(default)s)",
    )
    ap.add_argument("--verbose", action="store_true", help="log the harness too (node boots, teardown)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: bench/results)")
    ap.add_argument(
        "--name",
        help="the result file's name without .json (default: the scenario, e.g. "
        "fleet-8n-15mbit, fleet-scaling-15mbit; give one for experiments that should not replace it)",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny run for tests: synthetic 8 MiB working set over a 32 MiB image, short delays"
    )
    a = ap.parse_args(argv)
    a.modes = [x.strip() for x in a.modes.split(",") if x.strip()]
    if a.full_copy == "measure" and "full_copy" not in a.modes:
        a.modes.append("full_copy")
    for md in a.modes:
        m = TREE_MODE.fullmatch(md)
        if md not in ALL_MODES and not (m and (m.group(1) is None or int(m.group(1)) >= 1)):
            ap.error(f"unknown mode {md!r}")
    if len(set(a.modes)) != len(a.modes):
        ap.error("a mode twice")
    if a.fanout < 1 or a.depth < 1:
        ap.error("--fanout and --depth must be >= 1")
    if a.min_tso_segs is not None and not 2 <= a.min_tso_segs <= 64:
        ap.error(f"--min-tso-segs {a.min_tso_segs}: must be 2..64")
    a.host_memory = host_memory.choice(a.host_memory, a.smoke)
    if a.smoke:
        a.trace = "synthetic"
        a.synthetic_ws_mib, a.synthetic_image_mib = 8, 32
        a.progress_s = min(a.progress_s, 2.0)
        a.mem = "256M"
    if a.scaling:
        try:
            a.sizes = [int(x) for x in a.scaling.split(",") if x.strip()]
        except ValueError:
            ap.error("--scaling takes sizes like 2,4,8")
    else:
        a.sizes = None
    for n in a.sizes or [a.nodes]:
        if not 1 <= n <= 60:
            ap.error("nodes: 1..60")
    if a.rate is None:
        a.rate = faithful_rate(max(a.sizes or [a.nodes]))
    try:
        parse_rate(a.rate)
    except HarnessError as e:
        ap.error(str(e))
    return a


def faithful_rate(nodes):
    """The lab's faithful rate for `nodes` compute nodes; beyond the largest size measured, that
    size's rate (the run says whether the host stayed below 70 % busy)."""
    return next((rate for n, rate in FAITHFUL_RATES if nodes <= n), FAITHFUL_RATES[-1][1])


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("vmthunder.harness").setLevel(logging.INFO if a.verbose else logging.WARNING)
    if os.geteuid() != 0:
        print("bench/fleet.py must run as root (UML nodes, network namespaces)", file=sys.stderr)
        return 2
    ok, why = uml_available()
    if not ok:
        print(f"user-mode Linux cannot run here: {why}", file=sys.stderr)
        return 2
    if a.trace in (None, "") and os.path.exists(DEFAULT_TRACE):
        a.trace = DEFAULT_TRACE
    if a.trace in (None, "", "synthetic"):
        trace = synthetic_trace(a.synthetic_image_mib * MIB, a.synthetic_ws_mib * MIB, a.seed)
    else:
        trace = load_trace(a.trace)
    W = union_bytes(trace["reads"])
    log.info(
        "trace: %s: %d reads, %.1f MiB read, W = %.1f MiB over a %.0f MiB image",
        trace["source"],
        len(trace["reads"]),
        sum(r[2] for r in trace["reads"]) / MIB,
        W / MIB,
        trace["image_bytes"] / MIB,
    )
    os.makedirs(a.out, exist_ok=True)

    def on_sigterm(signum, frame):  # the harness tears its fleets down first, then calls this
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    tmp = tempfile.mkdtemp(prefix="vmt-fleet-")
    stack = contextlib.ExitStack()
    report = []  # printed last, after the host is restored: the table, then the PNG's path
    try:
        image_path = os.path.join(tmp, "origin.img")
        make_origin_image(image_path, trace["image_bytes"], trace["reads"])
        digest = expected_digest(image_path, trace["reads"])
        prov = {**record.provenance(), **provenance()}
        prov["host_speed"] = host_speed()
        log.info("host: %s", prov["host_speed"])
        want = host_memory.want_for(max(a.sizes or [a.nodes]) + 1, parse_size(a.mem), trace["image_bytes"])
        prov["host_memory"] = host_memory.enter(stack, a.host_memory, want)
        if trace.get("sha1"):
            prov["trace_sha1"] = trace["sha1"]
        common = {
            "provenance": prov,
            "trace": trace["source"],
            "reads": len(trace["reads"]),
            "read_bytes": sum(r[2] for r in trace["reads"]),
            "depth": a.depth,
            "think": a.think,
            "replay": a.replay,
            "start": a.start,
            "min_tso_segs": a.min_tso_segs,
            "rate": a.rate,
            "command": " ".join(["python3", "-m", "bench.fleet"] + (sys.argv[1:] if argv is None else argv)),
            "bytes_note": "origin_bytes: the origin's link tx (NIC, TCP/iSCSI headers included; etcd runs on the controller); "
            "origin_data_bytes and edges[].bytes: data the child read over that iSCSI session "
            "(block-layer counters); ratio = bytes / working_set_bytes",
        }
        sizes = a.sizes or [a.nodes]
        docs = []
        for n in sizes:
            m = a.vms if (a.vms and not a.sizes) else n * (a.vms_per_node if a.sizes else 1)
            run = FleetRun(a, trace, image_path, W, digest, n, m)
            doc = run.run()
            doc.update(common)
            doc["goals"] = goals(doc)
            docs.append(doc)
            if not a.sizes:
                name = a.name or record.fleet_scenario(n, doc["rate_bps"], a.start, "sha1" not in trace)
                path = os.path.join(a.out, name + ".json")
                png = os.path.join(a.out, name + "-timeline.png")
                doc["png"] = os.path.basename(png) if plot(doc, png) else None
                write_json(path, doc)
                record.append_history(path, record.fleet_summary(doc, name))
                log.info("wrote %s", path)
                report += [table(doc), f"\ntimeline: {png}" if doc["png"] else "\ntimeline: none (matplotlib missing)"]
            else:
                log.info(
                    "size %d done: %s", n, {k: r.get("completion_s", r.get("error", "")[:60]) for k, r in doc["modes"].items()}
                )
        if a.sizes:
            for d in docs:
                for r in d["modes"].values():
                    r.pop("timeline", None)
            md = scaling_table(docs)
            name = a.name or record.fleet_scenario(None, docs[0]["rate_bps"], a.start, "sha1" not in trace)
            path = os.path.join(a.out, name + ".json")
            write_json(
                path,
                {
                    "sizes": sizes,
                    "rate_bps": docs[0]["rate_bps"],
                    "fanout": a.fanout,
                    "working_set_bytes": W,
                    "runs": docs,
                    "table_md": md,
                    **common,
                },
            )
            for d in docs:
                record.append_history(path, record.fleet_summary(d, name))
            log.info("wrote %s", path)
            report.append(md)
        failed = [(d["nodes"], k) for d in docs for k, r in d["modes"].items() if "error" in r or not r.get("all_finished")]
        return 1 if failed else 0
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
        sys.stderr.flush()
        print("\n".join(report), flush=True)


if __name__ == "__main__":
    sys.exit(main())
