"""A network outage does not kill a node, in three UML nodes with real iSCSI, LIO,
device-mapper and bcache.

O exports the origin volumes (the stand-in for Cinder); R attaches a VM from O and relays; leaf
L attaches a VM with R first and O last. Each node runs the tree upkeep (`Tree.maintain`, no
registry) every UPKEEP_S seconds, as nova-compute does, and logs each round. A reader on L reads
its VM's disk continuously with O_DIRECT, 4 KiB at offsets never read before, and checks each
read against the origin. The outage is made on the host: the bridge ports of the cut nodes are
disabled (nothing in or out), then enabled again.

(a) O unreachable for 15 s, (b) R and O unreachable together for 15 s: no read fails or
mismatches, every path is active again within two upkeep rounds of its session's return, both
templates are still attached to their bcache, and a full re-read equals the origin.
(c) An outage longer than the queueing bound (10 s here): the reader gets errors; once the
network is back upkeep heals the paths and re-arms queueing, reads succeed again, a full re-read
equals the origin and what the VM wrote before the outage is still there. Past the bound the
VM also writes 512 bytes with O_DIRECT into a chunk it never wrote: refused (the VM disk has
4 KiB blocks), never a copy from the dead origin that would invalidate its snapshot; once
with bcache (c), once with dm-cache (d), whose 512-byte blocks lost the VM its disk before.

Each test uses its own origin volume and image, and detaches at the end. Timings are printed
and, with VMT_BLACKOUT_RESULTS=<file>, written there as JSON.
"""

import hashlib
import json
import os
import random
import re
import subprocess
import time

import pytest

from lab import Fleet
from tests.kernel._vmt import md5_of, node_ctor, py, random_disk, require_uml

IMAGE_MB = 64
IMAGE = IMAGE_MB << 20
BLOCK = 4096
SLOT = 16 << 10  # one read per 16 KiB: readahead of a neighbour never makes a read warm
UPKEEP_S = 2.0
READ_GAP_S = 0.04  # the reader's pace: at most 25 reads a second
PATTERN_MIB = IMAGE_MB - 1  # (c): the VM writes its last MiB before the outage; the reader skips it
VOLUMES = {"a": "ubdb", "b": "ubdc", "c": "ubdd", "d": "ubde"}
# (c), (d): during the outage, past the bound, the leaf's VM writes 512 bytes (O_DIRECT) into
# a 4 KiB chunk it never wrote and nothing read: between the reader's slots.
SUBCHUNK_OFFSET = 100 * SLOT + 8192 + 512

READER = r"""
import hashlib, json, mmap, os, sys, time
a = json.loads(sys.argv[1])
plan = json.load(open(a["plan"]))
stop, mark = os.path.join(a["dir"], "stop"), os.path.join(a["dir"], "mark")
st = {"reads": 0, "errors": 0, "mismatches": 0, "worst_stall_s": 0.0, "first_error_t": None, "last_error_t": None,
      "reads_after_mark": 0, "errors_after_mark": 0, "error_messages": [], "stalls": [], "done": False}
def save():
    tmp = os.path.join(a["dir"], "reader.json.tmp")
    with open(tmp, "w") as f:
        json.dump(st, f)
    os.replace(tmp, os.path.join(a["dir"], "reader.json"))
buf = mmap.mmap(-1, 4096)
fd = os.open(a["dev"], os.O_RDONLY | os.O_DIRECT)
saved = 0.0
for off, want in plan:
    if os.path.exists(stop):
        break
    marked = os.path.exists(mark)
    t0 = time.time()
    ok = True
    try:
        n = os.preadv(fd, [buf], off)
        if n != 4096 or hashlib.md5(buf[:n]).hexdigest() != want:
            st["mismatches"] += 1
    except OSError as e:
        ok = False
        st["errors"] += 1
        st["first_error_t"] = st["first_error_t"] or t0
        st["last_error_t"] = t0
        if len(st["error_messages"]) < 5:
            st["error_messages"].append(f"{off}: {e}")
    dt = time.time() - t0
    st["reads"] += 1
    st["reads_after_mark"] += marked
    st["errors_after_mark"] += marked and not ok
    st["worst_stall_s"] = max(st["worst_stall_s"], dt)
    if dt > 1.0 and len(st["stalls"]) < 50:
        st["stalls"].append([t0, round(dt, 2), ok])
    if time.time() - saved > 0.5:
        save()
        saved = time.time()
    time.sleep(max(0.0, a["gap"] - dt))
st["done"] = True
st["exhausted"] = not os.path.exists(stop)
save()
"""

UPKEEP = r"""
import json, logging, os, sys, time
a = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, filename=os.path.join(a["dir"], "log"),
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
import vmthunder
from vmthunder.tree import Tree
node = vmthunder.Node(**a["node"])
tree = Tree(node, None, initiator=a["initiator"], state_dir=a["node"]["state_dir"])
stop = os.path.join(a["dir"], "stop")
deadline = time.monotonic() + a["max_s"]
n = 0
with open(os.path.join(a["dir"], "rounds.jsonl"), "a") as out:
    while not os.path.exists(stop) and time.monotonic() < deadline:
        t0 = time.time()
        tree.maintain()
        t = node.status()["templates"].get(a["image"], {})
        sessions = {}
        for s in sorted(os.listdir("/sys/class/iscsi_session")):
            try:
                iqn = open(f"/sys/class/iscsi_session/{s}/targetname").read().strip()
                state = open(f"/sys/class/iscsi_session/{s}/state").read().strip()
            except OSError:
                continue
            if iqn in a["iqns"]:
                sessions[s] = state
        out.write(json.dumps({"round": n, "t": t0, "paths": t.get("paths"), "queueing": t.get("queueing"),
                              "cache": t.get("cache_status"), "complete": t.get("complete"), "sessions": sessions}) + "\n")
        out.flush()
        n += 1
        time.sleep(max(0.0, a["interval"] - (time.time() - t0)))
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_uml()
    work = tmp_path_factory.mktemp("blackout")
    origin = work / "origin.img"
    random_disk(origin, IMAGE)
    data = origin.read_bytes()
    disks = {}
    for tag, ubd in VOLUMES.items():  # one volume per test: LIO's iblock holds its disk exclusively
        p = work / f"origin-{tag}.img"
        p.write_bytes(data)
        disks[ubd] = str(p)
    nodes = {"o": {"disks": disks}, "r": {"disks": {"ubdb": 512 << 20}}, "l": {"disks": {"ubdb": 512 << 20}}}
    with Fleet(nodes=nodes, name=f"bo{os.getpid()}", subnet="198.18.24.0/24", mem="320M") as f:
        o = f["o"]
        for tag, ubd in VOLUMES.items():
            py(o, f"out(vmthunder.export_volume('bo-{tag}', '/dev/{ubd}', '{o.ip}:3260'))")
        f.data = data
        f.results = {}
        yield f
        path = os.environ.get("VMT_BLACKOUT_RESULTS")
        if path and f.results:
            from bench import record

            record.write_result(path, {"provenance": record.provenance(), **f.results})


def set_port(fleet, node, up):
    """Enable (forwarding) or disable node's port on the fleet's bridge: a disabled port drops
    every frame both ways, as a pulled cable or a dead switch port does."""
    subprocess.run(
        ["ip", "netns", "exec", fleet.netns, "bridge", "link", "set", "dev", node.tap, "state", "3" if up else "0"],
        check=True,
        timeout=30,
        capture_output=True,
    )


def read_json(node, name, default=None):
    try:
        return json.loads(node.read_file(name))
    except (OSError, ValueError):
        return default


def rounds_of(node, d):
    try:
        text = node.read_file(f"{d}/rounds.jsonl").decode()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip().endswith("}")]


def healthy(r, queueing):
    return (
        r["sessions"]
        and all(s == "LOGGED_IN" for s in r["sessions"].values())
        and r["paths"]
        and all(p["state"] == "A" for p in r["paths"])
        and (not queueing or r.get("queueing") is True)
    )


def recovery(rounds, t_cut, t_back):
    """Rounds from the restore on: the first whose sessions are all logged in again, the first
    after it whose paths are all active; and whether any path was failed during the outage."""
    failed = any(p["state"] == "F" for r in rounds if t_cut <= r["t"] for p in (r["paths"] or []))
    after = [r for r in rounds if r["t"] >= t_back]
    back = next((i for i, r in enumerate(after) if r["sessions"] and all(s == "LOGGED_IN" for s in r["sessions"].values())), None)
    active = (
        None
        if back is None
        else next(
            (i for i, r in enumerate(after) if i >= back and r["paths"] and all(p["state"] == "A" for p in r["paths"])), None
        )
    )
    return {
        "failed_during_outage": failed,
        "sessions_back_s": None if back is None else round(after[back]["t"] - t_back, 1),
        "paths_active_s": None if active is None else round(after[active]["t"] - t_back, 1),
        "rounds_to_active": None if active is None else active - back,
    }


def plan_for(fleet, tag):
    """[offset, md5] of 4 KiB reads at distinct slots in a random order (fresh: never read)."""
    slots = [i * SLOT for i in range(IMAGE // SLOT) if i * SLOT < PATTERN_MIB << 20]
    random.Random(tag).shuffle(slots)
    return [[off, hashlib.md5(fleet.data[off : off + BLOCK]).hexdigest()] for off in slots]


def run_outage(fleet, tag, cut, outage_s, queue_timeout_s=None, write=None, engine=None, during=None):
    """Build the R -> L chain for image `img-<tag>` over volume `bo-<tag>`, read on L through an
    outage of the nodes in `cut` lasting `outage_s`, wait until both nodes are healthy again,
    and return what was measured. `write`: bytes L's VM writes at PATTERN_MIB before the
    outage. `engine`: the cache engine of both nodes. `during`: (seconds, fn): fn(L, L's VM
    disk) runs that long into the outage; what it returns is res["during"]."""
    o, r, l = fleet["o"], fleet["r"], fleet["l"]
    image, volume = f"img-{tag}", f"bo-{tag}"
    kw = {} if queue_timeout_s is None else {"queue_timeout_s": queue_timeout_s}
    if engine is not None:
        kw["engine"] = engine
    ctor = {r: dict(export_ip=r.ip, **kw), l: dict(kw)}
    conn = {n: py(o, f"out(vmthunder.allow_initiator({volume!r}, {n.initiator_iqn!r}, '{o.ip}:3260'))") for n in (r, l)}
    vm_r = py(r, node_ctor(r, **ctor[r]) + f"out(node.attach({image!r}, [{conn[r]!r}], 'vr-{tag}'))", timeout=300)
    conn_l = py(r, node_ctor(r, **ctor[r]) + f"out(node.export_info({image!r}, {l.initiator_iqn!r}))")
    vm_l = py(l, node_ctor(l, **ctor[l]) + f"out(node.attach({image!r}, [{conn_l!r}, {conn[l]!r}], 'vl-{tag}'))", timeout=300)
    if write is not None:
        src = l.write_file(f"pattern-{tag}.bin", write)
        l.check(f"dd if={src} of={vm_l} bs=1M seek={PATTERN_MIB} oflag=direct conv=notrunc,fsync 2>&1", timeout=60)
    origin_iqn = conn[l]["data"]["target_iqn"]
    iqns = {r: [origin_iqn], l: [origin_iqn, conn_l["data"]["target_iqn"]]}
    procs, dirs = [], {n: f"blackout-{tag}/upkeep" for n in (r, l)}
    rdir = f"blackout-{tag}/reader"
    during_result = None
    try:
        for n in (r, l):
            n.write_file(f"{dirs[n]}/.keep", b"")
            args = {
                "node": dict(host=n.name, cache_device="/dev/ubdb", state_dir="/var/lib/vmthunder", cow_size_mib=32, **ctor[n]),
                "initiator": n.initiator_iqn,
                "image": image,
                "iqns": iqns[n],
                "interval": UPKEEP_S,
                "dir": f"/vmt-share/{dirs[n]}",
                "max_s": 900,
            }
            script = n.write_file(f"blackout-{tag}/upkeep.py", UPKEEP.encode())
            procs.append(n.spawn(f"python3 {script} '{json.dumps(args)}' 2>&1"))
        l.write_file(f"{rdir}/plan.json", json.dumps(plan_for(fleet, tag)).encode())
        script = l.write_file(f"blackout-{tag}/reader.py", READER.encode())
        args = {"dev": vm_l, "plan": f"/vmt-share/{rdir}/plan.json", "dir": f"/vmt-share/{rdir}", "gap": READ_GAP_S}
        procs.append(l.spawn(f"python3 {script} '{json.dumps(args)}' 2>&1"))
        deadline = time.monotonic() + 120
        while (read_json(l, f"{rdir}/reader.json") or {}).get("reads", 0) < 40:
            assert time.monotonic() < deadline, f"the reader did not start: {procs[-1].output()[-2000:]}"
            time.sleep(1)
        assert all(rounds_of(n, dirs[n]) for n in (r, l)), "upkeep is not running"

        t_cut = time.time()
        for n in cut:
            set_port(fleet, n, False)
        try:
            if during is not None:
                time.sleep(during[0])
                during_result = during[1](l, vm_l)
            time.sleep(max(0.0, outage_s - (time.time() - t_cut)))
        finally:
            for n in cut:
                set_port(fleet, n, True)
        t_back = time.time()

        # Both nodes healthy again: sessions logged in, paths active (and queueing re-armed).
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            last = {n.name: (rounds_of(n, dirs[n]) or [{}])[-1] for n in (r, l)}
            if all(x.get("t", 0) > t_back and healthy(x, queue_timeout_s is not None) for x in last.values()):
                break
            time.sleep(2)
        l.write_file(f"{rdir}/mark", b"")
        time.sleep(6)  # read on after the recovery
        l.write_file(f"{rdir}/stop", b"")
        deadline = time.monotonic() + 120
        while not (read_json(l, f"{rdir}/reader.json") or {}).get("done"):
            assert time.monotonic() < deadline, "the reader did not stop"
            time.sleep(1)
    finally:
        for n in (r, l):
            n.write_file(f"{dirs[n]}/stop", b"")
        l.write_file(f"{rdir}/stop", b"")
        for p in procs:
            if p.poll() is None:
                p.wait(60)
    reader = read_json(l, f"{rdir}/reader.json")
    res = {
        "outage_s": round(t_back - t_cut, 1),
        "reader": {k: v for k, v in reader.items() if k != "stalls"},
        "stalls": [[round(t - t_cut, 1), dt, ok] for t, dt, ok in reader["stalls"]],
        "first_error_after_cut_s": reader["first_error_t"] and round(reader["first_error_t"] - t_cut, 1),
        "last_error_after_back_s": reader["last_error_t"] and round(reader["last_error_t"] - t_back, 1),
    }
    res.update({n.name: recovery(rounds_of(n, dirs[n]), t_cut, t_back) for n in (r, l)})
    res["last_round"] = {n.name: rounds_of(n, dirs[n])[-1] for n in (r, l)}
    res["reinstated"] = {n.name: n.read_file(f"{dirs[n]}/log").decode().count("reinstated path") for n in (r, l)}
    res["vms"] = {"r": vm_r, "l": vm_l}
    res["during"] = during_result
    fleet.results[tag] = {k: v for k, v in res.items() if k != "vms"}
    print(f"blackout {tag}: {json.dumps(fleet.results[tag])}")
    return res


def detach(fleet, tag, kw):
    r, l = fleet["r"], fleet["l"]
    py(l, node_ctor(l, **kw) + f"node.detach('vl-{tag}')", timeout=300)
    py(r, node_ctor(r, export_ip=r.ip, **kw) + f"node.detach('vr-{tag}')", timeout=300)


def assert_survived(fleet, res, tag):
    """No read failed or was wrong, every path is active within two upkeep rounds of its
    session's return, both templates still sit on their bcache, a full re-read is the origin."""
    rd = res["reader"]
    assert rd["errors"] == 0 and rd["mismatches"] == 0, f"reads failed through the outage: {res}"
    assert rd["reads_after_mark"] > 0, f"the reader did not read on after the recovery: {res}"
    for n in ("r", "l"):
        rec = res[n]
        assert rec["rounds_to_active"] is not None and rec["rounds_to_active"] <= 2, (
            f"{n}: paths not all active within two upkeep rounds of the sessions' return: {res}"
        )
        last = res["last_round"][n]
        assert last["complete"] and re.search(r"bcache state=(clean|dirty) ", last["cache"] or ""), (
            f"{n}: the template lost its cache: {last}"
        )
    expect = hashlib.md5(fleet.data).hexdigest()
    assert md5_of(fleet["l"], res["vms"]["l"], IMAGE) == expect, "the leaf's VM does not read as the origin"
    assert md5_of(fleet["r"], res["vms"]["r"], IMAGE) == expect, "the relay's VM does not read as the origin"


def test_blackout_origin_15s(fleet):
    res = run_outage(fleet, "a", [fleet["o"]], 15)
    assert res["r"]["failed_during_outage"], f"the relay's path to the origin never failed: the outage did not bite: {res}"
    assert_survived(fleet, res, "a")
    detach(fleet, "a", {})


def test_blackout_relay_and_origin_15s(fleet):
    res = run_outage(fleet, "b", [fleet["r"], fleet["o"]], 15)
    assert res["l"]["failed_during_outage"], f"the leaf's paths never failed: the outage did not bite: {res}"
    assert_survived(fleet, res, "b")
    detach(fleet, "b", {})


def subchunk_write(node, vm):
    """512 bytes with O_DIRECT (qemu's cache=none, Nova's default, passes a guest's 512-byte
    write on as one) into a chunk the VM never wrote: (rc, dd's output, the VM disk's logical
    block size). Buffered writes are safe anyway: the page cache writes whole 4 KiB blocks of a
    disk whose size is a multiple of 4 KiB, reading the block first."""
    rc, out = node.run(
        f"dd if=/dev/urandom of={vm} bs=512 count=1 seek={SUBCHUNK_OFFSET // 512} oflag=direct conv=notrunc 2>&1", timeout=90
    )
    lbs = node.check(f"blockdev --getss {vm}").strip()
    return {"rc": rc, "output": out[-500:], "logical_block_size": int(lbs)}


def snapshot_status(node, vm):
    return node.check(f"dmsetup status $(basename {vm})").strip()


CACHE_UP = {
    None: r"bcache state=(clean|dirty) ",
    # dm-cache's status ends in its metadata mode and needs_check; a failed cache says "Fail".
    "dm-cache": r" rw -\s*$",
}


def past_the_bound(fleet, tag, engine=None):
    """An outage of relay and origin (30 s) longer than the queueing bound (10 s): reads fail,
    a sub-chunk write fails, and afterwards the node heals without a reboot and no data of the
    VM is lost: its snapshot is valid and reads as the origin plus what it wrote before."""
    bound = 10
    pattern = os.urandom(1 << 20)
    res = run_outage(
        fleet, tag, [fleet["r"], fleet["o"]], 30, queue_timeout_s=bound, write=pattern, engine=engine, during=(23, subchunk_write)
    )
    rd = res["reader"]
    assert rd["errors"] > 0, f"an outage past the bound must reach the reader: {res}"
    assert rd["mismatches"] == 0, f"wrong data, not an error: {res}"
    assert rd["reads_after_mark"] > 0 and rd["errors_after_mark"] == 0, f"reads still fail after the recovery: {res}"
    for n in ("r", "l"):
        last = res["last_round"][n]
        assert healthy(last, True), f"{n}: not healed (paths, sessions, queueing): {last}"
        assert last["complete"] and re.search(CACHE_UP[engine], last["cache"] or ""), f"{n}: the template lost its cache: {last}"
    # The leaf's paths failed with the relay cut off; the relay's had no I/O to fail.
    assert res["l"]["failed_during_outage"] and res["reinstated"]["l"] > 0, f"upkeep reinstated none of the leaf's paths: {res}"
    l = fleet["l"]
    vm_l = res["vms"]["l"]
    w = res["during"]
    assert w["rc"] != 0, f"a write that needs the unreachable origin succeeded: {w}"
    status = snapshot_status(l, vm_l)
    assert "Invalid" not in status, (
        f"a failed sub-chunk write cost the VM its disk (snapshot {status!r}; VM disk blocks {w['logical_block_size']} bytes)"
    )
    expect = bytearray(fleet.data)
    expect[PATTERN_MIB << 20 : (PATTERN_MIB + 1) << 20] = pattern
    assert md5_of(l, vm_l, IMAGE) == hashlib.md5(bytes(expect)).hexdigest(), (
        "after the recovery the leaf's VM does not read as the origin plus what it wrote"
    )
    assert md5_of(fleet["r"], res["vms"]["r"], IMAGE) == hashlib.md5(fleet.data).hexdigest()
    detach(fleet, tag, {"queue_timeout_s": bound, **({"engine": engine} if engine else {})})


def test_blackout_longer_than_the_queueing_bound(fleet):
    past_the_bound(fleet, "c")


def test_blackout_longer_than_the_queueing_bound_dm_cache(fleet):
    past_the_bound(fleet, "d", engine="dm-cache")
