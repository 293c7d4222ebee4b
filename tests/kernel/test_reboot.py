"""A host reboot or power loss loses nothing: in UML nodes with real device-mapper, bcache, LIO
and iSCSI, a node's process is killed by its PID (power loss) and booted again with the same
disk files; nova-compute's start-up path (`vmthunder.nova.get_node`) then rebuilds every VM
disk from the layout recorded on the local device.

A exports the origin volume (the stand-in for Cinder); B is the compute node. B's local device
(ubdb) and its state dir (ext4 on ubdc: the qcow2 overlays live there) persist across its
reboots; everything else on B (its tmpfs root, /etc/iscsi, the dm tables, configfs) is lost, as
on a real host.
"""

import hashlib
import json
import os
import random
import re
import textwrap
import time
import uuid

import pytest

from lab import Fleet
from lab.guestpy import PRELUDE
from tests.kernel._vmt import file_md5, md5_of, py, random_disk, require_uml, start_etcd, wait_json

IMAGE_MB = 64
IMAGE = IMAGE_MB << 20
VOLUME = "rbimg"
IMAGE_ID = "5e0c1a2b-7d3f-4a9e-8b1c-2f3e4d5c6b7a"
# The overlays live in the state dir, which must persist for VMM mode.
STATE_DIR = "/var/lib/vmthunder"
COW_MIB = 32
# bcache writes a dirty btree node 30 s after its first change (drivers/md/bcache/btree.c).
BCACHE_BTREE_WRITE_S = 35


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_uml()
    work = tmp_path_factory.mktemp("reboot")
    origin = work / "origin.img"
    random_disk(origin, IMAGE)
    nodes = {"a": {"disks": {"ubdb": str(origin)}}, "b": {"disks": {"ubdb": 512 << 20, "ubdc": 128 << 20}}}
    with Fleet(nodes=nodes, name=f"rb{os.getpid()}", subnet="198.18.9.0/24") as f:
        a = f["a"]
        f["b"].check(f"mkfs.ext4 -q /dev/ubdc && mkdir -p {STATE_DIR} && mount /dev/ubdc {STATE_DIR}", timeout=60)
        py(a, f"out(vmthunder.export_volume({VOLUME!r}, '/dev/ubdb', '{a.ip}:3260'))")
        f.origin_path = str(origin)
        f.work = work
        yield f


@pytest.fixture(autouse=True)
def no_vm_left_behind(request):
    """The tests share node B: a failed one must not leave VMs that make the next ones fail.
    Runs after each test of `fleet` (its own assertions came first), detaching whatever is left."""
    yield
    if "fleet" not in request.fixturenames:
        return
    b = request.getfixturevalue("fleet")["b"]
    b.run("ip route flush type blackhole", timeout=30)  # the unreachable-image test's
    rc, out = b.run(
        "python3 - <<'EOF'\nimport vmthunder\n" + node_ctor(b) + "for vm in sorted(node.status()['vms']):\n"
        "    try:\n        node.detach(vm); print('detached', vm)\n"
        "    except vmthunder.Error as e:\n        print('left', vm, e)\nEOF",
        timeout=300,
    )
    if out.strip():
        print(f"after the test, on B: {out.strip()}")


def origin_conn(fleet, node):
    a = fleet["a"]
    return py(a, f"out(vmthunder.allow_initiator({VOLUME!r}, {node.initiator_iqn!r}, '{a.ip}:3260'))")


def node_ctor(node):
    return (
        f"node = vmthunder.Node(host={node.name!r}, cache_device='/dev/ubdb', state_dir={STATE_DIR!r}, cow_size_mib={COW_MIB})\n"
    )


def attach_code(fleet, node, vm, mode="dm"):
    return node_ctor(node) + f"out(node.attach({IMAGE_ID!r}, [{origin_conn(fleet, node)!r}], {vm!r}, {mode!r}))"


def start_up(node):
    """What nova-compute runs when it starts (before Nova resumes instances)."""
    return py(
        node,
        f"""
        import types, vmthunder.nova
        conf = types.SimpleNamespace(cache_device='/dev/ubdb', state_dir={STATE_DIR!r}, cow_size_mib={COW_MIB})
        import io
        log = io.StringIO()
        logging.getLogger("vmthunder").addHandler(logging.StreamHandler(log))
        tree = vmthunder.nova.get_node(conf, {node.name!r})
        out(dict(tree.node.status(), start_up_log=log.getvalue()))
    """,
        timeout=300,
    )


def power_cycle(node):
    """Power loss: the node's UML process group is killed, then booted with the same disks."""
    node.kill()
    node.restart(timeout=120)
    node.check(f"mkdir -p {STATE_DIR} && mount /dev/ubdc {STATE_DIR}", timeout=60)  # the host's fstab


def spawn_py(node, code):
    body = PRELUDE + textwrap.dedent(code)
    path = node.write_file(f"bg-{uuid.uuid4().hex[:10]}.py", body.encode())
    return node.spawn(f"python3 {path}")


def write_pattern(node, dev, offset_mib, data, tag):
    """Write `data` at `offset_mib` MiB of `dev` with O_DIRECT, then fsync: acknowledged."""
    src = node.write_file(f"pat-{tag}.bin", data)
    node.check(f"dd if={src} of={dev} bs=1M seek={offset_mib} oflag=direct conv=notrunc,fsync 2>&1", timeout=60)


def expected_image(fleet, patches, name):
    """The origin with `patches` [(offset_mib, bytes)] applied, written beside it; its md5."""
    with open(fleet.origin_path, "rb") as f:
        img = bytearray(f.read())
    for off, data in patches:
        img[off << 20 : (off << 20) + len(data)] = data
    path = fleet.work / name
    path.write_bytes(bytes(img))
    return path, file_md5(path, IMAGE)


def ubdb_linear_starts(node):
    """Start sectors of every dm-linear line of ours on the local device."""
    devno = node.check("cat /sys/block/ubdb/dev").strip()
    starts = set()
    for line in node.check("dmsetup table 2>/dev/null || true").splitlines():
        m = re.match(r"(vmthunder-1_\S+): \d+ \d+ linear (\S+) (\d+)", line)
        if m and m.group(2) == devno:
            starts.add(int(m.group(3)))
    return starts


def reread_fetch(origin, node, dev):
    """Bytes the origin sent while `node` read all of `dev` with O_DIRECT (no page cache)."""
    tx0 = origin.tx_bytes()
    node.check(f"dd if={dev} of=/dev/null bs=1M iflag=direct 2>&1", timeout=120)
    return origin.tx_bytes() - tx0


def assert_converged(node, status):
    """Nothing leaked: the dm devices, configfs objects and sessions are exactly those of the
    recorded VMs' disks, and the local device's live slices are exactly the recorded ones."""
    slices = status["layout"]["slices"]
    assert all(s["state"] == "ready" for s in slices.values()), slices
    assert ubdb_linear_starts(node) == {s["start"] for s in slices.values()}, (ubdb_linear_starts(node), slices)
    vms = status["vms"]
    assert all(v["state"] == "attached" for v in vms.values()), vms
    dm_vms = sorted(vm for vm, v in vms.items() if v["mode"] == "dm")
    names = node.check("dmsetup ls 2>/dev/null | awk '/^vmthunder/{print $1}' || true").split()
    live_vms = sorted({n.split("_vm_")[1].rsplit("_", 1)[0] for n in names if "_vm_" in n})
    assert live_vms == dm_vms, (names, vms)
    for vm in dm_vms:
        assert f"vmthunder-1_{IMAGE_ID}_vm_{vm}_snap" in names and f"vmthunder-1_{IMAGE_ID}_vm_{vm}_cow" in names
    for n in names:
        assert n.startswith(f"vmthunder-1_{IMAGE_ID}_") or n == "vmthunder-1_node_cset", n
    want_cow = {f"vmthunder-1_{IMAGE_ID}_vm_{vm}_cow" for vm in dm_vms}
    assert {n for n in slices if n.endswith("_cow")} == want_cow, slices
    sessions = node.check("ls /sys/class/iscsi_session 2>/dev/null || true").split()
    local_disks = node.check("ls /sys/kernel/config/target/loopback 2>/dev/null | grep '^naa' || true").split()
    if vms:
        assert len(sessions) == 1 and len(local_disks) == 1, (sessions, local_disks)
        assert status["templates"][IMAGE_ID]["complete"]
    else:
        assert sessions == [] and local_disks == [] and status["templates"] == {}, (sessions, local_disks, status)
        assert [n for n in names if n != "vmthunder-1_node_cset"] == []


def test_reboot_brings_back_every_vm_disk_with_its_writes(fleet):
    a, b = fleet["a"], fleet["b"]
    b.check(f"mkdir -p {STATE_DIR}")
    paths = {
        vm: py(b, attach_code(fleet, b, vm, mode), timeout=240) for vm, mode in (("vm1", "dm"), ("vm2", "dm"), ("vm3", "vmm"))
    }
    assert paths["vm3"].endswith(".qcow2")
    rnd = random.Random(19)
    patches = {
        "vm1": [(1, rnd.randbytes(1 << 20)), (20, rnd.randbytes(2 << 20)), (63, rnd.randbytes(1 << 20))],
        "vm2": [(0, rnd.randbytes(1 << 20)), (20, rnd.randbytes(1 << 20)), (40, rnd.randbytes(1 << 20))],
    }
    for vm, ps in patches.items():
        for i, (off, data) in enumerate(ps):
            write_pattern(b, paths[vm], off, data, f"{vm}-{i}")
    # The qcow2 overlay: written through qemu with cache=none (O_DIRECT) and flushed.
    b.check(f"qemu-io -f qcow2 -t none -c 'write -P 0x5a 8M 2M' -c 'write -P 0xa5 33M 1M' -c flush {paths['vm3']}", timeout=60)
    vm3_patches = [(8, b"\x5a" * (2 << 20)), (33, b"\xa5" * (1 << 20))]
    expected = {vm: expected_image(fleet, ps, f"{vm}.img") for vm, ps in patches.items()}
    expected["vm3"] = expected_image(fleet, vm3_patches, "vm3.img")
    # Each VM reads its whole disk (the whole image through the template: the cache fills).
    for vm in ("vm1", "vm2"):
        assert md5_of(b, paths[vm], IMAGE) == expected[vm][1]
    shared = b.write_file("vm3-expected.img", expected["vm3"][0].read_bytes())
    b.check(f"qemu-img compare -f qcow2 -F raw {paths['vm3']} {shared}", timeout=120)
    before = py(b, node_ctor(b) + "out(node.status())")
    # bcache drops some inserts of misses that come faster than it frees buckets: re-read
    # until a pass fetches (almost) nothing, so that the cache is known warm before the reboot.
    origin_dev = before["templates"][IMAGE_ID]["devices"]["origin"]
    passes = [reread_fetch(a, b, origin_dev) for _ in range(2)]
    while passes[-1] > IMAGE // 50 and len(passes) < 6:
        passes.append(reread_fetch(a, b, origin_dev))
    print(f"re-reads before the reboot fetched {passes} bytes")
    assert passes[-1] <= IMAGE // 50, passes
    # The guest's writes were fsynced: they survive whenever the power goes. bcache journals
    # no cache-miss fills; it writes the btree nodes that hold them within 30 s, and fills
    # younger than that are lost with the power (cache only, never data): wait that long.
    b.check(f"sync; sleep {BCACHE_BTREE_WRITE_S}", timeout=BCACHE_BTREE_WRITE_S + 30)

    power_cycle(b)
    # Nothing of it is in the kernel any more; the device holds the layout.
    assert b.check("dmsetup ls 2>/dev/null | grep -c vmthunder || true").strip() == "0"
    # The state dir's locks and records go too: the device alone is enough for dm disks.
    b.check(f"find {STATE_DIR} -mindepth 1 -maxdepth 1 ! -name vmm ! -name lost+found -exec rm -rf {{}} +")
    # bcache-tools' udev rule registers every bcache device as it appears: emulated, so that
    # reassembly meets devices registered before it reaches them.
    udev = b.spawn(
        "for i in $(seq 1200); do for d in /dev/mapper/vmthunder-1_*; do "
        '[ -b "$d" ] && echo "$d" > /sys/fs/bcache/register 2>/dev/null; done; sleep 0.05; done'
    )
    try:
        status = start_up(b)
    finally:
        udev.kill()
    print(status["start_up_log"])
    assert sorted(status["vms"]) == ["vm1", "vm2", "vm3"]
    for vm in ("vm1", "vm2"):
        assert os.path.basename(paths[vm]) in b.check("ls /dev/mapper"), vm
    assert_converged(b, status)
    assert status["templates"][IMAGE_ID]["devices"]["origin"] == before["templates"][IMAGE_ID]["devices"]["origin"]

    # The cache survived: a full re-read of the image through the template (O_DIRECT, so the
    # page cache plays no part) fetches under 10 % of it from the origin.
    fetched = reread_fetch(a, b, status["templates"][IMAGE_ID]["devices"]["origin"])
    print(f"re-read after reassembly: {fetched} bytes from the origin for a {IMAGE}-byte image")
    assert fetched < IMAGE // 10, f"re-read fetched {fetched} bytes of {IMAGE} from the origin"

    # Every VM reads back its own writes, and the image elsewhere.
    for vm in ("vm1", "vm2"):
        assert md5_of(b, paths[vm], IMAGE) == expected[vm][1], vm
    b.check(f"qemu-img compare -f qcow2 -F raw {paths['vm3']} {shared}", timeout=120)

    # Idempotent: a second start-up changes nothing.
    again = py(b, node_ctor(b) + "out(node.reassemble())")
    assert sorted(again["disks"]) == ["vm1", "vm2", "vm3"] and again["failed"] == {} and again["removed"] == []
    # A re-attach of a recorded VM returns its disk with its data, never a pristine one.
    assert py(b, attach_code(fleet, b, "vm1")) == paths["vm1"]
    assert md5_of(b, paths["vm1"], IMAGE) == expected["vm1"][1]

    for vm in ("vm1", "vm2", "vm3"):
        py(b, node_ctor(b) + f"node.detach({vm!r})")
    final = py(b, node_ctor(b) + "out(node.status())")
    assert final["vms"] == {} and final["layout"]["slices"] == {}, final
    assert b.check("dmsetup ls 2>/dev/null | grep -c vmthunder || true").strip() == "0"


def test_a_vm_whose_image_is_unreachable_is_named_and_its_cow_kept(fleet):
    a, b = fleet["a"], fleet["b"]
    b.check(f"mkdir -p {STATE_DIR}")
    path = py(b, attach_code(fleet, b, "vmx"), timeout=240)
    data = random.Random(7).randbytes(1 << 20)
    write_pattern(b, path, 5, data, "vmx")
    cow_before = py(b, node_ctor(b) + "out(node.status())")["layout"]["slices"]
    power_cycle(b)
    # The origin cannot be reached when B comes back.
    b.check(f"ip route add blackhole {a.ip}/32")
    try:
        report = py(b, node_ctor(b) + "out(node.reassemble())", timeout=300)
        assert "vmx" in report["failed"], report
        why = report["failed"]["vmx"]
        print(f"reassembly with the origin unreachable: {why}")
        assert "vmx" in why and IMAGE_ID in why, why
        st = py(b, node_ctor(b) + "out(node.status())")
        assert st["layout"]["slices"] == cow_before, "the COW is kept, not reused"
        assert st["vms"]["vmx"]["state"] == "attached"
        cow_start = cow_before[f"vmthunder-1_{IMAGE_ID}_vm_vmx_cow"]["start"]
    finally:
        b.check(f"ip route del blackhole {a.ip}/32")
    report = py(b, node_ctor(b) + "out(node.reassemble())", timeout=300)
    assert report["disks"] == {"vmx": path} and report["failed"] == {}, report
    expected = expected_image(fleet, [(5, data)], "vmx.img")[1]
    assert md5_of(b, path, IMAGE) == expected
    # A new VM gets its own COW elsewhere, never the kept one.
    py(b, attach_code(fleet, b, "vmy"))
    st = py(b, node_ctor(b) + "out(node.status())")
    assert st["layout"]["slices"][f"vmthunder-1_{IMAGE_ID}_vm_vmy_cow"]["start"] != cow_start
    for vm in ("vmx", "vmy"):
        print(
            b.check(
                "python3 - <<'EOF'\nimport logging, vmthunder\nlogging.basicConfig(level=logging.INFO)\n"
                + node_ctor(b)
                + f"node.detach({vm!r})\nEOF",
                timeout=120,
            )
        )
    final = py(b, node_ctor(b) + "out(node.status())")
    assert final["layout"]["slices"] == {}, (final, b.check("dmsetup ls; dmsetup table"))


def test_start_up_deletes_our_node_records_that_a_killed_login_left(fleet):
    """A kill inside `iscsiadm -o update` (or a logout) leaves our node record without a
    session: start-up deletes it, spares a record young enough to be a login in flight, and
    never touches another interface's record."""
    b = fleet["b"]
    b.check(f"mkdir -p {STATE_DIR}")
    portal = "198.18.9.77:3260"
    gone, young, other = (f"iqn.2026-11.org.vmthunder.test:{n}" for n in ("gone", "young", "other"))
    b.check("iscsiadm -m iface -I vmthunder >/dev/null 2>&1 || iscsiadm -m iface -I vmthunder -o new")
    for iqn, iface in ((gone, "vmthunder"), (young, "vmthunder"), (other, "default")):
        b.check(f"iscsiadm -m node -o new -T {iqn} -p {portal} -I {iface}")
    for iqn in (gone, other):
        b.check(f"find /etc/iscsi/nodes/{iqn} -type f -exec touch -d '2 hours ago' {{}} +")
    report = py(b, node_ctor(b) + "out(node.reassemble())")
    assert f"iSCSI node record of {gone} at {portal} (no session)" in report["removed"], report
    assert not any(young in r or other in r for r in report["removed"]), report
    listed = b.check("iscsiadm -m node 2>/dev/null || true")
    assert gone not in listed and young in listed and other in listed, listed
    for iqn, iface in ((young, "vmthunder"), (other, "default")):
        b.check(f"iscsiadm -m node -o delete -T {iqn} -p {portal} -I {iface}")


def _measure(node, code):
    t0 = time.monotonic()
    p = spawn_py(node, code)
    rc, out = p.wait(300)
    assert rc == 0, out
    return time.monotonic() - t0


def test_power_loss_at_random_instants_of_attach_and_detach_converges(fleet):
    """Power loss at random instants of an attach and of a detach (seed printed): after the
    reboot and start-up the node holds exactly what its layout records, and the VM attached
    before the interrupted step reads back its writes."""
    b = fleet["b"]
    seed = int(os.environ.get("VMT_REBOOT_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"power-loss instants: seed {seed} (VMT_REBOOT_SEED={seed} repeats them)")
    rnd = random.Random(seed)
    b.check(f"mkdir -p {STATE_DIR}")
    keep = py(b, attach_code(fleet, b, "keep"), timeout=240)
    data = rnd.randbytes(1 << 20)
    write_pattern(b, keep, 7, data, "keep")
    keep_md5 = expected_image(fleet, [(7, data)], "keep.img")[1]
    # How long each step takes here (the instants are drawn over it).
    t_attach = _measure(b, attach_code(fleet, b, "probe"))
    t_detach = _measure(b, node_ctor(b) + "node.detach('probe')")
    print(f"attach {t_attach:.2f} s, detach {t_detach:.2f} s (host CPU: {os.cpu_count()} cores)")
    steps = [("attach", i) for i in range(5)] + [("detach", i) for i in range(5)]
    rnd.shuffle(steps)
    for kind, i in steps:
        vm = f"{kind[0]}{i}"
        if kind == "attach":
            code, span = attach_code(fleet, b, vm), t_attach
        else:
            py(b, attach_code(fleet, b, vm))
            code, span = node_ctor(b) + f"node.detach({vm!r})", t_detach
        at = rnd.uniform(0, span)
        p = spawn_py(b, code)
        time.sleep(at)
        finished = p.poll() is not None
        print(f"{kind} of {vm}: power lost {at:.2f} s in{' (it had finished)' if finished else ''}")
        power_cycle(b)
        status = start_up(b)
        assert_converged(b, status)
        assert "keep" in status["vms"] and md5_of(b, keep, IMAGE) == keep_md5, f"{kind} of {vm} at {at:.2f} s"
        if vm in status["vms"]:
            path = py(b, attach_code(fleet, b, vm))
            assert md5_of(b, path, IMAGE) == file_md5(fleet.origin_path, IMAGE)
            py(b, node_ctor(b) + f"node.detach({vm!r})")
    print(
        b.check(
            "python3 - <<'EOF'\nimport logging, vmthunder\nlogging.basicConfig(level=logging.INFO)\n"
            + node_ctor(b)
            + "node.detach('keep')\nEOF",
            timeout=120,
        )
    )
    st = py(b, node_ctor(b) + "out(node.status())")
    assert st["vms"] == {} and st["layout"]["slices"] == {}, (st, b.check("dmsetup ls"))


def test_a_full_cow_fails_only_its_own_vm(fleet):
    """A guest that writes more than its COW holds gets I/O errors; the host, the template and
    the other VMs go on. A warning is logged once the COW passes 90 %."""
    b = fleet["b"]
    b.check(f"mkdir -p {STATE_DIR}")
    full = py(b, attach_code(fleet, b, "full"), timeout=240)
    other = py(b, attach_code(fleet, b, "other"), timeout=240)
    # 30 of 32 MiB (the exception store takes its share too): past the warning threshold.
    b.check(f"dd if=/dev/urandom of={full} bs=1M count=30 oflag=direct conv=notrunc 2>&1", timeout=120)
    out = b.check(
        "python3 - <<'EOF'\nimport logging, vmthunder\nlogging.basicConfig(level=logging.WARNING)\n"
        f"{node_ctor(b)}print(node.status()['vms']['full']['cow'])\nEOF",
        timeout=60,
    )
    assert "VM full: its copy-on-write space is" in out, out
    # Past the end of the COW: the guest's writes fail.
    rc, out = b.run(f"dd if=/dev/urandom of={full} bs=1M count=8 seek=30 oflag=direct conv=notrunc 2>&1", timeout=120)
    assert rc != 0 and ("Input/output error" in out or "No space" in out), out
    st = py(b, node_ctor(b) + "out(node.status())")
    assert st["vms"]["full"]["cow"]["state"] in ("invalid", "overflow"), st["vms"]["full"]
    assert st["vms"]["other"]["cow"]["state"] == "valid"
    rc, _ = b.run(f"dd if={full} of=/dev/null bs=1M count=1 iflag=direct 2>&1", timeout=60)
    assert rc != 0, "an invalidated snapshot returns errors"
    # The other VM, the template and the origin are untouched.
    origin_md5 = file_md5(fleet.origin_path, IMAGE)
    assert md5_of(b, other, IMAGE) == origin_md5
    data = random.Random(3).randbytes(1 << 20)
    write_pattern(b, other, 2, data, "other")
    assert md5_of(b, other, IMAGE) == expected_image(fleet, [(2, data)], "other.img")[1]
    origin_dev = st["templates"][IMAGE_ID]["devices"]["origin"]
    assert md5_of(b, origin_dev, IMAGE) == origin_md5
    for vm in ("full", "other"):
        py(b, node_ctor(b) + f"node.detach({vm!r})")
    assert py(b, node_ctor(b) + "out(node.status())")["layout"]["slices"] == {}


# -- a relay reboots under its children (relay tree with a real etcd) ---------------------------
TREE_IMAGE = "img-rtree"
TREE_IMAGE_BYTES = 32 << 20
MEMBER = os.path.join(os.path.dirname(__file__), "tree_member.py")


@pytest.fixture(scope="module")
def tree_fleet(tmp_path_factory):
    require_uml()
    origin = tmp_path_factory.mktemp("rtree") / "origin.img"
    random_disk(origin, TREE_IMAGE_BYTES)
    nodes = {
        "o": {"disks": {"ubdb": str(origin)}},
        "r1": {"disks": {"ubdb": 160 << 20, "ubdc": 64 << 20}},
        "r2": {"disks": {"ubdb": 160 << 20}},
        "r3": {"disks": {"ubdb": 160 << 20}},
    }
    with Fleet(nodes=nodes, name=f"rt{os.getpid()}", subnet="198.18.11.0/24", mem="320M") as f:
        o = f["o"]
        f.registry = start_etcd(o)
        py(o, f"vmthunder.export_volume('rtree', '/dev/ubdb', '{o.ip}:3260')")
        f.origin_path = str(origin)
        with open(origin, "rb") as fh:
            f.chunks = [hashlib.md5(fh.read(64 << 10)).hexdigest() for _ in range(TREE_IMAGE_BYTES // (64 << 10))]
        # r1's state dir (its saved origin, as Nova's state_path) persists: ext4 on ubdc.
        f["r1"].check("mkfs.ext4 -q /dev/ubdc && mkdir -p /var/lib/vmthunder && mount /dev/ubdc /var/lib/vmthunder")
        member = open(MEMBER, "rb").read()
        for n in ("r1", "r2", "r3"):
            node = f[n]
            conn = py(o, f"out(vmthunder.allow_initiator('rtree', {node.initiator_iqn!r}, '{o.ip}:3260'))")
            node.write_file("origin.json", json.dumps(conn).encode())
            node.write_file("expect.json", json.dumps(f.chunks).encode())
            node.write_file("tree_member.py", member)
        yield f


def tree_peers(fleet):
    o = fleet["o"]
    return {
        r["host"]: r
        for r in py(
            o,
            f"""
from vmthunder.registry import Registry
r = Registry({fleet.registry!r}, "probe-{uuid.uuid4().hex[:8]}")
r.start()
out(r.peers({TREE_IMAGE!r}))
r.stop()
""",
        )
    }


def member(fleet, name, workdir, extra=""):
    node = fleet[name]
    return node.spawn(
        f"python3 /vmt-share/tree_member.py --registry {fleet.registry} --host {name} --image {TREE_IMAGE} "
        f"--origin /vmt-share/origin.json --vm vm-{name} --export-ip {node.ip} --fanout 1 "
        f"--workdir /vmt-share/{workdir} --max-seconds 900 {extra}"
    )


def test_a_relay_reboots_under_its_children_rejoins_and_serves_again(tree_fleet):
    f = tree_fleet
    r1, r2, r3 = f["r1"], f["r2"], f["r3"]
    origin_md5 = file_md5(f.origin_path, TREE_IMAGE_BYTES)
    member(f, "r1", "member")
    att1 = wait_json(r1, "/vmt-share/member/attached.json", 240)
    assert "error" not in att1, att1
    data = random.Random(11).randbytes(1 << 20)
    write_pattern(r1, att1["path"], 3, data, "r1")
    member(f, "r2", "member")
    att2 = wait_json(r2, "/vmt-share/member/attached.json", 240)
    assert "error" not in att2, att2
    recs = tree_peers(f)
    assert recs["r2"]["parents"][0] == "r1", recs
    r2.spawn(
        f"python3 /vmt-share/tree_member.py --reader-only {att2['path']} --read-expect /vmt-share/expect.json "
        f"--workdir /vmt-share/reader --max-seconds 600"
    )
    wait_json(r2, "/vmt-share/reader/reader.json", 60)
    r1.check("sync; sleep 2")

    # r1 loses power; r2 keeps reading (failover to the origin) and re-parents away from it.
    r1.kill()
    killed = time.monotonic()
    while time.monotonic() - killed < 90:
        recs = tree_peers(f)
        if "r1" not in recs and "r1" not in recs["r2"]["parents"]:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"r2 did not re-parent away from the dead r1: {recs}")
    print(f"r2 re-parented to {recs['r2']['parents']} {time.monotonic() - killed:.1f} s after r1 lost power")

    # r1 boots, nova-compute starts: its VM disk comes back and it relays again.
    r1.restart(timeout=120)
    r1.check("mkdir -p /var/lib/vmthunder && mount /dev/ubdc /var/lib/vmthunder")
    member(f, "r1", "member-after", "--start-up")
    back = wait_json(r1, "/vmt-share/member-after/attached.json", 300)
    assert back["path"] == att1["path"] and back["report"]["failed"] == {}, back
    assert back["rejoined"] == [TREE_IMAGE], back
    recs = tree_peers(f)
    assert recs["r1"]["state"] == "ready" and recs["r1"]["parents"] == ["origin"], recs["r1"]
    expected = bytearray(open(f.origin_path, "rb").read())
    expected[3 << 20 : 4 << 20] = data
    assert md5_of(r1, att1["path"], TREE_IMAGE_BYTES) == hashlib.md5(expected).hexdigest(), "r1's VM kept its write"

    # It serves again: a newcomer takes it as a parent (fan-out 1: the origin's slot is r2's or
    # r1's, so r3 reads from a relay, its two parents r1 and r2) and reads the image.
    wait_json(r1, "/vmt-share/member-after/status.json", 30)
    member(f, "r3", "member", "--wait-grant-from r1")  # r1's upkeep grants r3 first
    att3 = wait_json(r3, "/vmt-share/member/attached.json", 240)
    assert "error" not in att3, att3
    assert "r1" in tree_peers(f)["r3"]["parents"], tree_peers(f)
    tx0 = r1.tx_bytes()
    assert md5_of(r3, att3["path"], TREE_IMAGE_BYTES) == origin_md5
    status = wait_json(
        r1, "/vmt-share/member-after/status.json", 30, lambda s: r3.initiator_iqn in s["templates"][TREE_IMAGE]["children"]
    )
    assert r3.initiator_iqn in status["templates"][TREE_IMAGE]["children"]
    print(f"r1 sent {r1.tx_bytes() - tx0} bytes while r3 read the image")

    r2.write_file("reader/stop", b"")
    res = wait_json(r2, "/vmt-share/reader/reader.json", 60, lambda v: v.get("done"))
    print(f"r2's reader through r1's power loss and return: {res}")
    assert res["errors"] == 0 and res["mismatches"] == 0 and res["reads"] > len(f.chunks), res
    for n, wd in (("r1", "member-after"), ("r2", "member"), ("r3", "member")):
        f[n].write_file(f"{wd}/stop", b"")


def test_reboot_with_the_dm_cache_engine_keeps_the_vm_and_its_cache_metadata(fleet):
    """The other cache engine: dm-cache's metadata and data slices are recorded, so after a
    power loss the image's cache device is loaded over the same metadata (not re-zeroed) and
    the VM's disk comes back with its write."""
    b = fleet["b"]
    ctor = node_ctor(b).replace("cow_size_mib", "engine='dm-cache', cow_size_mib")
    conn = origin_conn(fleet, b)
    path = py(b, ctor + f"out(node.attach({IMAGE_ID!r}, [{conn!r}], 'dmc'))", timeout=240)
    data = random.Random(5).randbytes(1 << 20)
    write_pattern(b, path, 9, data, "dmc")
    expected = expected_image(fleet, [(9, data)], "dmc.img")[1]
    assert md5_of(b, path, IMAGE) == expected
    before = py(b, ctor + "out(node.status())")
    assert before["templates"][IMAGE_ID]["engine"] == "dm-cache"
    b.check("sync; sleep 2")
    power_cycle(b)
    # A node configured for bcache now: the recorded template keeps its own engine.
    st = start_up(b)
    assert st["templates"][IMAGE_ID]["engine"] == "dm-cache", st["templates"]
    assert_converged(b, st)
    cset = "vmthunder-1_node_cset"  # start-up prepares a bcache set: the node's engine
    assert {k: v for k, v in st["layout"]["slices"].items() if k != cset} == before["layout"]["slices"]
    assert md5_of(b, path, IMAGE) == expected
    py(b, ctor + "node.detach('dmc')")
    assert py(b, ctor + "out(node.status())")["layout"]["slices"] == {}
