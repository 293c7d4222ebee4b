#!/usr/bin/env python3
"""Guest side of bench/fleet.py: runs inside a UML compute node (stdlib + vmthunder only).

    fleet_guest.py member  --registry URL --host cn1 --image IMG --origin FILE --vms vm01,vm09 \
                           --export-ip IP --fanout 3 --expect-hosts 8 --workdir DIR ...
        Stand-in for nova-compute: holds the registry membership (heartbeats live with this
        process), registers the host, waits until every compute host is registered (so every
        relay can grant every other host up front, as long-running nova-computes would have),
        then, at the start signal (DIR/go), attaches its VMs through vmthunder.tree.Tree (engine
        bcache), starting each VM's replay as soon as it is attached (--replay-trace), writes
        DIR/attached.json, runs the tree upkeep on a thread until DIR/stop exists, writes
        DIR/final.json and leaves the registry when DIR/exit exists.
    fleet_guest.py boot    --host cn1 --origin FILE --vms vm01 --trace T --out-dir D --go FILE
                           [--login-first] [--copy-to /dev/ubdc] [--depth 8] [--think]
        A node of a baseline mode: at the start signal log in to the origin (plain boot from
        volume), optionally copy the whole image to a local disk first (full copy), then start
        one replay process per VM.
    fleet_guest.py login   --origin FILE
        Log in to the origin volume (open-iscsi, CHAP from the connection dict; an existing
        session is reused) and print the raw disk (/dev/sdX): plain boot from volume.
    fleet_guest.py copy    SRC DST --progress FILE [--go FILE]
        Copy SRC to DST (1 MiB O_DIRECT reads and writes): Nova's image cache download.
    fleet_guest.py replay  DEV TRACE --out FILE [--go FILE] [--depth 1] [--think]
        Replay a boot read trace on DEV with O_DIRECT (page-aligned mmap buffers, Linux AIO from
        one thread), in trace order, at most DEPTH reads in flight (a read overlapping one in flight waits
        for it), starting when the file --go exists (the
        host creates it on every node at once); with --think a read is never issued before the
        start + its recorded time offset. Writes progress and the result (start, end, bytes, a
        digest of the data read, errors, progress samples) to FILE.
    fleet_guest.py counters
        Bytes read per iSCSI session (block-layer counters of its disks), with the session's
        target and portal, and the NIC counters: JSON on stdout.
"""

import argparse
import ctypes
import errno
import glob
import json
import logging
import mmap
import os
import subprocess
import sys
import time
import zlib

PAGE = 4096


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def read_first_line(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# ----------------------------------------------------------------------------- counters
def counters():
    sessions = {}
    for sdir in glob.glob("/sys/class/iscsi_session/session*"):
        sid = os.path.basename(sdir)[len("session") :]
        conn = glob.glob(f"/sys/class/iscsi_connection/connection{sid}:*")
        addr = read_first_line(os.path.join(conn[0], "persistent_address")) if conn else None
        port = read_first_line(os.path.join(conn[0], "persistent_port")) if conn else None
        read_bytes = read_ios = 0
        disks = []
        for blk in glob.glob(f"{sdir}/device/target*/*:*:*:*/block/*"):
            name = os.path.basename(blk)
            stat = read_first_line(f"/sys/block/{name}/stat")
            if stat:
                fields = stat.split()
                read_ios += int(fields[0])  # completed read requests (after merging)
                read_bytes += int(fields[2]) * 512
                disks.append(name)
        sessions[sid] = {
            "target": read_first_line(os.path.join(sdir, "targetname")),
            "address": addr,
            "port": port,
            "read_bytes": read_bytes,
            "read_ios": read_ios,
            "disks": disks,
        }
    nic = {k: int(read_first_line(f"/sys/class/net/vec0/statistics/{k}") or 0) for k in ("rx_bytes", "tx_bytes")}
    return {"sessions": sessions, "nic": nic, "clock": time.time()}


# ----------------------------------------------------------------------------- raw iSCSI login
def conn_data(conn):
    d = conn.get("data", conn) if isinstance(conn, dict) else {}
    portal = d.get("target_portal") or (d.get("target_portals") or [None])[0]
    iqn = d.get("target_iqn") or (d.get("target_iqns") or [None])[0]
    lun = d.get("target_lun", (d.get("target_luns") or [0])[0])
    if not portal or not iqn:
        raise SystemExit(f"connection info without portal/iqn: {sorted(d)}")
    if ":" not in portal:
        portal += ":3260"
    return portal, iqn, int(lun), d


def session_of(iqn, portal):
    ip, port = portal.rsplit(":", 1)
    for sdir in glob.glob("/sys/class/iscsi_session/session*"):
        sid = os.path.basename(sdir)[len("session") :]
        if read_first_line(os.path.join(sdir, "targetname")) != iqn:
            continue
        for c in glob.glob(f"/sys/class/iscsi_connection/connection{sid}:*"):
            if (
                read_first_line(os.path.join(c, "persistent_address")) == ip
                and read_first_line(os.path.join(c, "persistent_port")) == port
            ):
                return sid
    return None


def session_disk(sid, lun):
    for blk in glob.glob(f"/sys/class/iscsi_session/session{sid}/device/target*/*:*:*:{lun}/block/*"):
        return "/dev/" + os.path.basename(blk)
    return None


def adm(*args, secret=None):
    p = subprocess.run(["iscsiadm", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    if p.returncode not in (0, 15):  # 15: session exists
        out = p.stdout.decode(errors="replace")
        if secret:
            out = out.replace(secret, "***")
        raise SystemExit(f"iscsiadm {' '.join(a if a != secret else '***' for a in args)}: rc={p.returncode}\n{out}")


def login(conn):
    portal, iqn, lun, d = conn_data(conn)
    sid = session_of(iqn, portal)
    if sid is None:
        node = ["-m", "node", "-T", iqn, "-p", portal]
        adm(*node, "-o", "new")
        adm(*node, "-o", "update", "-n", "node.startup", "-v", "manual")
        if d.get("auth_method") == "CHAP" or d.get("auth_username"):
            adm(*node, "-o", "update", "-n", "node.session.auth.authmethod", "-v", "CHAP")
            adm(*node, "-o", "update", "-n", "node.session.auth.username", "-v", d["auth_username"])
            adm(*node, "-o", "update", "-n", "node.session.auth.password", "-v", d["auth_password"], secret=d["auth_password"])
        adm(*node, "--login")
        sid = session_of(iqn, portal)
        if sid is None:
            raise SystemExit(f"login to {iqn} at {portal}: no session appeared")
    deadline = time.monotonic() + 30
    scanned = False
    while True:
        dev = session_disk(sid, lun)
        if dev and os.path.exists(dev):
            try:
                with open(dev, "rb") as f:
                    if f.seek(0, os.SEEK_END) > 0:
                        return dev
            except OSError as e:
                # a LUN that just appeared can refuse to open for a moment (ENXIO): retry below
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
        if not scanned:
            host = glob.glob(f"/sys/class/iscsi_session/session{sid}/device/../scsi_host/host*")
            hosts = [os.path.basename(h) for h in host] or [
                os.path.basename(os.path.dirname(os.path.realpath(f"/sys/class/iscsi_session/session{sid}/device")))
            ]
            for h in hosts:
                if h.startswith("host"):
                    try:
                        with open(f"/sys/class/scsi_host/{h}/scan", "w") as f:
                            f.write(f"- - {lun}")
                    except OSError:
                        pass
            scanned = True
        if time.monotonic() > deadline:
            raise SystemExit(f"LUN {lun} of {iqn} at {portal} did not appear")
        time.sleep(0.1)


# ----------------------------------------------------------------------------- copy
def copy(src, dst, progress, go):
    write_json(progress, {"ready": True})
    wait_go(go)
    chunk = 1 << 20
    buf = mmap.mmap(-1, chunk)
    fi = os.open(src, os.O_RDONLY | os.O_DIRECT)
    fo = os.open(dst, os.O_WRONLY | os.O_DIRECT)
    size = os.lseek(fi, 0, os.SEEK_END)
    t0 = time.time()
    done, last = 0, 0.0
    while done < size:
        n = os.preadv(fi, [buf], done)
        if n <= 0:
            raise SystemExit(f"short read at {done}")
        n -= n % 512
        w = os.pwritev(fo, [memoryview(buf)[:n]], done)
        done += w
        now = time.time()
        if now - last > 0.5:
            write_json(progress, {"start": t0, "t": now, "bytes": done, "size": size})
            last = now
    os.fsync(fo)
    os.close(fi)
    os.close(fo)
    write_json(progress, {"start": t0, "t": time.time(), "end": time.time(), "bytes": done, "size": size, "done": True})


# ----------------------------------------------------------------------------- replay
def wait_go(go, timeout=600.0):
    """Wait for the host's start signal (a file it creates in /vmt-share): every guest starts
    within a few ms of the others without relying on guest and host clocks agreeing."""
    if not go:
        return
    deadline = time.monotonic() + timeout
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit(f"no start signal {go} within {timeout}s")
        time.sleep(0.005)


class Aio:
    """Linux native AIO (io_setup/io_submit/io_getevents through libc's syscall()) for O_DIRECT
    preads: one thread keeps DEPTH reads in flight. In a UML guest every syscall of a process is
    two host context switches; the thread-per-slot replay this replaces spent most of its CPU in
    GIL hand-offs (futexes), CPU the nodes' data paths then lacked."""

    SYS_SETUP, SYS_DESTROY, SYS_GETEVENTS, SYS_SUBMIT = 206, 207, 208, 209  # x86_64

    class Iocb(ctypes.Structure):
        _fields_ = [
            ("data", ctypes.c_uint64),
            ("key", ctypes.c_uint32),
            ("rw_flags", ctypes.c_uint32),
            ("opcode", ctypes.c_uint16),
            ("reqprio", ctypes.c_int16),
            ("fildes", ctypes.c_uint32),
            ("buf", ctypes.c_uint64),
            ("nbytes", ctypes.c_uint64),
            ("offset", ctypes.c_int64),
            ("reserved2", ctypes.c_uint64),
            ("flags", ctypes.c_uint32),
            ("resfd", ctypes.c_uint32),
        ]

    class Event(ctypes.Structure):
        _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]

    class Timespec(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

    def __init__(self, depth):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.ctx = ctypes.c_ulong(0)
        self._call(self.SYS_SETUP, ctypes.c_long(depth), ctypes.byref(self.ctx))
        self.events = (self.Event * depth)()

    def _call(self, nr, *args):
        while True:
            r = self.libc.syscall(ctypes.c_long(nr), *args)
            if r >= 0:
                return r
            e = ctypes.get_errno()
            if e != errno.EINTR:
                raise OSError(e, f"aio syscall {nr}: {os.strerror(e)}")

    def submit(self, iocb):
        ptr = ctypes.pointer(iocb)
        self._call(self.SYS_SUBMIT, self.ctx, ctypes.c_long(1), ctypes.byref(ptr))

    def wait(self, timeout_s=None):
        """Completed (slot, result) pairs: at least one unless the timeout passes first."""
        ts = None
        if timeout_s is not None:
            ts = ctypes.byref(self.Timespec(int(timeout_s), int((timeout_s % 1) * 1e9)))
        n = self._call(self.SYS_GETEVENTS, self.ctx, ctypes.c_long(1), ctypes.c_long(len(self.events)), self.events, ts)
        return [(self.events[i].data, self.events[i].res) for i in range(n)]

    def close(self):
        self._call(self.SYS_DESTROY, self.ctx)


def replay(dev, trace_path, go, out, depth, think):
    with open(trace_path) as f:
        tr = json.load(f)
    reads = tr["reads"]  # [[t, off, len]] page aligned already
    total = sum(r[2] for r in reads)
    depth = max(1, depth)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    maxlen = max(r[2] for r in reads)
    bufs = [mmap.mmap(-1, maxlen) for _ in range(depth)]  # page aligned, as O_DIRECT wants
    addrs = [ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in bufs]
    iocbs = [Aio.Iocb() for _ in range(depth)]
    aio = Aio(depth)
    crcs = [0] * len(reads)
    errors = []
    free = list(range(depth))
    inflight = {}  # slot -> read index
    samples = []
    done = nbytes = 0
    last = None

    def complete(events):
        nonlocal done, nbytes, last
        for slot, res in events:
            i = inflight.pop(slot)
            n = reads[i][2]
            if res != n:
                errors.append(f"read {i} at {reads[i][1]}: " + (os.strerror(-res) if res < 0 else f"short read {res}/{n}"))
            else:
                crcs[i] = zlib.crc32(memoryview(bufs[slot])[:n])
                done += 1
                nbytes += n
            free.append(slot)
        last = time.time()

    write_json(out, {"ready": True})
    wait_go(go)
    t0 = time.time()
    next_show = t0
    try:
        for i, (t, off, n) in enumerate(reads):
            if errors:
                break
            if think:
                while time.time() < t0 + t:
                    wait = t0 + t - time.time()
                    if inflight:
                        complete(aio.wait(max(0.0, wait)))
                    else:
                        time.sleep(max(0.0, wait))
            # A read overlapping one in flight waits for it: a guest never has two reads of one
            # page in flight (the trace's sub-page reads, widened to 4 KiB, would otherwise be
            # issued as concurrent duplicates). So does one that finds no free slot.
            while not free or any(reads[j][1] < off + n and off < reads[j][1] + reads[j][2] for j in inflight.values()):
                complete(aio.wait())
            slot = free.pop()
            cb = iocbs[slot]
            ctypes.memset(ctypes.byref(cb), 0, ctypes.sizeof(cb))
            cb.data, cb.opcode, cb.fildes, cb.buf, cb.nbytes, cb.offset = slot, 0, fd, addrs[slot], n, off
            inflight[slot] = i
            aio.submit(cb)
            now = time.time()
            if now >= next_show:
                samples.append([round(now - t0, 3), nbytes])
                write_json(out, {"start": t0, "t": now, "done": done, "bytes": nbytes, "reads": len(reads), "total": total})
                next_show = now + 0.25
        while inflight:
            complete(aio.wait())
    except OSError as e:  # reported in the result
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        if not inflight:
            aio.close()
        os.close(fd)
    t1 = last or time.time()
    samples.append([round(t1 - t0, 3), nbytes])
    acc = 0
    for c in crcs:
        acc = zlib.crc32(c.to_bytes(4, "little"), acc)
    write_json(
        out,
        {
            "start": t0,
            "end": t1,
            "reads": len(reads),
            "done": done,
            "bytes": nbytes,
            "total": total,
            "digest": f"{acc:08x}",
            "errors": errors,
            "samples": samples,
            "finished": not errors and done == len(reads),
        },
    )


def replay_argv(dev, trace, out, depth, think, go=None, binary=None, python="python3", script=None):
    """The command line of a 'VM' replaying TRACE (.json) on DEV (the one place that knows both
    replays' argument order; fleet.py builds the host-started ones with it too). BINARY:
    bench/replay.c built, reading the trace's .bin twin (fleet.py writes both); else this
    script's replay. GO: a file to wait for before the first read (None: start at once)."""
    if binary:
        return [binary, dev, os.path.splitext(trace)[0] + ".bin", out, go or "-", str(depth), "1" if think else "0"]
    argv = [python, script or os.path.abspath(__file__), "replay", dev, trace]
    if go:
        argv += ["--go", go]
    argv += ["--out", out, "--depth", str(depth)]
    return argv + (["--think"] if think else [])


def start_replay(dev, trace, out, depth, think, binary=None):
    """A 'VM': the replay in its own process, starting at once."""
    argv = replay_argv(dev, trace, out, depth, think, binary=binary, python=sys.executable)
    return subprocess.Popen(argv, stdout=open(out + ".log", "w"), stderr=subprocess.STDOUT)


# ----------------------------------------------------------------------------- baselines
def boot(a):
    """A node of a baseline mode: log in to the origin (before the start signal with
    --login-first), optionally copy the whole image to a local disk, then start its VMs."""
    os.makedirs(a.out_dir, exist_ok=True)
    state = os.path.join(a.out_dir, f"node-{a.host}.json")
    conn = json.load(open(a.origin))
    res = {}
    dev = login(conn) if a.login_first else None
    write_json(state, {"ready": True})
    wait_go(a.go)
    res["t_go"] = time.time()
    if dev is None:
        dev = login(conn)
    res["t_attached"] = time.time()
    res["dev"] = dev
    if a.copy_to:
        copy(dev, a.copy_to, os.path.join(a.out_dir, f"copy-{a.host}.json"), None)
        res["t_copied"] = time.time()
        dev = a.copy_to
    write_json(state, res)
    procs = [
        start_replay(dev, a.trace, os.path.join(a.out_dir, f"{vm}.json"), a.depth, a.think, a.replay_bin)
        for vm in a.vms.split(",")
    ]
    rcs = [p.wait() for p in procs]
    res["replay_rcs"] = rcs
    write_json(state, res)
    return 0 if not any(rcs) else 1


# ----------------------------------------------------------------------------- member
PREFETCH_ORDERS = ("reverse", "forward")  # Tree(prefetch_reverse=True / False)


def member(a):
    import vmthunder
    from vmthunder.registry import Registry
    from vmthunder.tree import Tree, load_profile

    os.makedirs(a.workdir, exist_ok=True)
    logging.basicConfig(
        level=getattr(logging, a.log_level),
        filename=os.path.join(a.workdir, "log"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    deadline = time.monotonic() + a.max_seconds
    stop_file = os.path.join(a.workdir, "stop")
    initiator = open("/etc/iscsi/initiatorname.iscsi").read().split("=", 1)[1].strip()
    node = vmthunder.Node(
        host=a.host,
        cache_device=a.cache_device,
        state_dir=a.state_dir,
        export_ip=a.export_ip,
        engine="bcache",
        cache_size_mib=a.cache_mib,
        cow_size_mib=a.cow_mib,
        path_timeout_s=4,
    )
    # A long-running nova-compute has its cache set from earlier images (vmthunder.nova makes
    # it at start, and the open-iscsi interface record): the fleet's first join should not pay
    # for make-bcache -C or iscsiadm -m iface.
    node.prepare_cache()
    node.prepare_initiator()
    reg = Registry(a.registry, a.host)  # the library default lease (10 s)
    reg.start()
    result = {"host": a.host, "t_registered": None, "paths": {}, "attach_s": {}}
    try:
        tree = Tree(
            node,
            reg,
            initiator=initiator,
            export_ip=a.export_ip,
            fanout=a.fanout,
            prefetch_reverse=a.prefetch_order == "reverse",
            prefetch_depth=a.prefetch_depth,
        )
        # As nova-compute does at start (vmthunder.nova: rejoin, then upkeep every 2 s): the host
        # record with its grant key goes out before any join, so the first relays grant every
        # member from their first claim on.
        tree.register()
        while len(reg.hosts()) < a.expect_hosts:
            if time.monotonic() > deadline - 60:
                raise SystemExit(f"only {len(reg.hosts())}/{a.expect_hosts} hosts registered")
            time.sleep(0.3)
        result["t_registered"] = time.time()
        write_json(os.path.join(a.workdir, "registered.json"), result)
        go = os.path.join(a.workdir, "go")
        while not os.path.exists(go):
            if time.monotonic() > deadline - 60:
                raise SystemExit("no go")
            time.sleep(0.1)
        result["t_go"] = time.time()
        logging.getLogger("fleet.member").info("go: joining %s", a.image)
        origin = json.load(open(a.origin))
        profile = load_profile(a.profile) if a.profile else None
        vms = []
        for vm in a.vms.split(","):
            t = time.time()
            # VM ids are unique per node: one fleet may run several tree modes (images)
            result["paths"][vm] = tree.attach(a.image, origin, f"{vm}-{a.image}", profile=profile)
            result["attach_s"][vm] = round(time.time() - t, 3)
            result.setdefault("t_attached", {})[vm] = time.time()
            if a.replay_trace:  # the VM boots as soon as its disk is attached
                vms.append(
                    start_replay(
                        result["paths"][vm],
                        a.replay_trace,
                        os.path.join(a.replay_dir, f"{vm}.json"),
                        a.depth,
                        a.think,
                        a.replay_bin,
                    )
                )
        me = next((r for r in reg.peers(a.image) if r.get("host") == a.host), {})
        result["parents"] = me.get("parents")
        result["depth"] = me.get("depth")
        write_json(os.path.join(a.workdir, "attached.json"), result)
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        write_json(os.path.join(a.workdir, "attached.json"), result)
        reg.stop()
        raise
    tree.start_watch()  # the library default interval, as nova-compute would run it
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        time.sleep(0.3)
    tree.stop_watch()
    result["prefetch"] = tree.prefetch_report(a.image, wait_s=5.0)
    try:
        result["status"] = node.status()
    except vmthunder.Error as e:
        result["status"] = f"{type(e).__name__}: {e}"
    # tree events worth reporting (re-parenting in a healthy fleet, origin as last resort)
    try:
        with open(os.path.join(a.workdir, "log"), errors="replace") as fh:
            result["events"] = [
                ln.strip()[:300]
                for ln in fh
                if "re-parenting" in ln or "last resort" in ln or "origin alone" in ln or "WARNING" in ln or "ERROR" in ln
            ][:20]
    except OSError:
        pass
    write_json(os.path.join(a.workdir, "final.json"), result)
    # Leave the registry only when every member has stopped its upkeep (the host creates
    # DIR/exit then): a member leaving first would make the others re-parent at teardown.
    end = min(deadline, time.monotonic() + 60)
    while not os.path.exists(os.path.join(a.workdir, "exit")) and time.monotonic() < end:
        time.sleep(0.2)
    reg.stop()
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("member")
    m.add_argument("--registry", required=True)
    m.add_argument("--host", required=True)
    m.add_argument("--image", required=True)
    m.add_argument("--origin", required=True, help="JSON file: the origin's connection dict")
    m.add_argument("--vms", required=True, help="comma-separated VM ids to attach on this node")
    m.add_argument("--export-ip", required=True)
    m.add_argument("--fanout", type=int, default=3)
    m.add_argument("--expect-hosts", type=int, required=True)
    m.add_argument("--cache-device", default="/dev/ubdb")
    m.add_argument("--cache-mib", type=int, default=None)
    m.add_argument("--cow-mib", type=int, default=32)
    m.add_argument("--state-dir", default="/var/lib/vmthunder")
    m.add_argument("--workdir", required=True)
    m.add_argument("--max-seconds", type=float, default=1800)
    m.add_argument("--log-level", choices=("INFO", "DEBUG"), default="INFO")
    m.add_argument("--replay-trace", help="start a replay of this trace on each VM as soon as it is attached")
    m.add_argument("--replay-dir", help="where the replays write <vm>.json")
    m.add_argument("--replay-bin", help="bench/replay.c built: the replay it starts (else this script's)")
    m.add_argument("--depth", type=int, default=1)
    m.add_argument("--think", action="store_true")
    m.add_argument("--profile", help="boot profile (trace file) the tree prefetches when it builds the template")
    m.add_argument(
        "--prefetch-order",
        choices=PREFETCH_ORDERS,
        default="forward",
        help="walk the profile from its start (the library default) or from its end",
    )
    m.add_argument("--prefetch-depth", type=int, help="the prefetch's reads in flight (default: the library's)")
    b = sub.add_parser("boot")
    b.add_argument("--host", required=True)
    b.add_argument("--origin", required=True)
    b.add_argument("--vms", required=True)
    b.add_argument("--trace", required=True)
    b.add_argument("--out-dir", required=True)
    b.add_argument("--go", required=True)
    b.add_argument("--login-first", action="store_true", help="log in before the start signal")
    b.add_argument("--copy-to", help="copy the whole image here first (full copy), then boot from it")
    b.add_argument("--replay-bin", help="bench/replay.c built: the replay it starts (else this script's)")
    b.add_argument("--depth", type=int, default=1)
    b.add_argument("--think", action="store_true")
    lg = sub.add_parser("login")
    lg.add_argument("--origin", required=True)
    cp = sub.add_parser("copy")
    cp.add_argument("src")
    cp.add_argument("dst")
    cp.add_argument("--progress", required=True)
    cp.add_argument("--go", help="start when this file exists (default: at once)")
    rp = sub.add_parser("replay")
    rp.add_argument("dev")
    rp.add_argument("trace")
    rp.add_argument("--go", help="start when this file exists (default: at once)")
    rp.add_argument("--out", required=True)
    rp.add_argument("--depth", type=int, default=1)
    rp.add_argument("--think", action="store_true")
    sub.add_parser("counters")
    a = ap.parse_args()
    if a.cmd == "member":
        return member(a)
    if a.cmd == "boot":
        return boot(a)
    if a.cmd == "login":
        print(login(json.load(open(a.origin))))
        return 0
    if a.cmd == "copy":
        copy(a.src, a.dst, a.progress, a.go)
        return 0
    if a.cmd == "replay":
        replay(a.dev, a.trace, a.go, a.out, a.depth, a.think)
        return 0
    if a.cmd == "counters":
        print(json.dumps(counters()))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
