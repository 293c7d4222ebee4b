"""The kernel data path end to end, in three UML nodes with real iSCSI, LIO and device-mapper.

A exports an origin volume (the stand-in for Cinder); B attaches VM1 from A; C attaches VM2
with B as its parent. Every step runs in a new Python process on the node.
"""

import os
import time

import pytest

from lab import Fleet
from tests.kernel._vmt import GuestError, assert_clean, file_md5, leftovers, md5_of, node_ctor, py, random_disk, require_uml

IMAGE_MB = 64
IMAGE = IMAGE_MB << 20
VOLUME = "img1"
IMAGE_ID = "3f1c2a6e-8f7b-4c1d-9e2f-0a1b2c3d4e5f"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_uml()
    origin = tmp_path_factory.mktemp("origin") / "origin.img"
    random_disk(origin, IMAGE)
    nodes = {
        "a": {"disks": {"ubdb": str(origin)}},
        "b": {"disks": {"ubdb": 256 << 20, "ubdc": 24 << 20, "ubdd": 8 << 20}},
        "c": {"disks": {"ubdb": 256 << 20}},
    }
    with Fleet(nodes=nodes, name=f"dp{os.getpid()}", subnet="198.18.7.0/24") as f:
        a = f["a"]
        iqn = py(a, f"out(vmthunder.export_volume({VOLUME!r}, '/dev/ubdb', '{a.ip}:3260'))")
        f.origin_iqn = iqn
        f.origin_md5 = file_md5(origin, IMAGE)
        yield f


def origin_conn(fleet, node, lun=0):
    a = fleet["a"]
    conn = py(a, f"out(vmthunder.allow_initiator({VOLUME!r}, {node.initiator_iqn!r}, '{a.ip}:3260'))")
    conn["data"]["target_lun"] = lun
    return conn


def test_relay_chain_snapshots_and_teardown(fleet):
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    # B: VM1 straight from the origin; B relays.
    conn_b = origin_conn(fleet, b)
    vm1 = py(b, node_ctor(b, export_ip=b.ip) + f"out(node.attach({IMAGE_ID!r}, [{conn_b!r}], 'vm1'))")
    assert vm1.startswith("/dev/mapper/vmthunder-1_")
    assert md5_of(b, vm1, IMAGE) == fleet.origin_md5

    # C: VM2 with B as its parent, credentials from B's export_info.
    conn_c = py(b, node_ctor(b, export_ip=b.ip) + f"out(node.export_info({IMAGE_ID!r}, {c.initiator_iqn!r}))")
    assert conn_c["data"]["target_portal"] == f"{b.ip}:3260"
    assert conn_c["data"]["auth_method"] == "CHAP"
    vm2 = py(c, node_ctor(c) + f"out(node.attach({IMAGE_ID!r}, [{conn_c!r}], 'vm2'))")
    assert md5_of(c, vm2, IMAGE) == fleet.origin_md5

    # A write to VM1 is invisible to VM2 and to the origin.
    b.check(f"dd if=/dev/zero of={vm1} bs=1M count=2 seek=3 oflag=direct conv=notrunc 2>&1", timeout=60)
    assert md5_of(b, vm1, IMAGE) != fleet.origin_md5
    assert md5_of(c, vm2, IMAGE) == fleet.origin_md5
    assert md5_of(a, "/dev/ubdb", IMAGE) == fleet.origin_md5

    # A second VM on B reuses B's template: same devices, no new iSCSI session.
    before = py(b, node_ctor(b, export_ip=b.ip) + "out(node.status())")
    sessions_before = b.check("ls /sys/class/iscsi_session").split()
    vm3 = py(b, node_ctor(b, export_ip=b.ip) + f"out(node.attach({IMAGE_ID!r}, [], 'vm3'))")
    after = py(b, node_ctor(b, export_ip=b.ip) + "out(node.status())")
    assert b.check("ls /sys/class/iscsi_session").split() == sessions_before
    t_before, t_after = before["templates"][IMAGE_ID], after["templates"][IMAGE_ID]
    assert t_after["devices"] == t_before["devices"] and t_after["complete"]
    assert t_after["vms"] == ["vm1", "vm3"]
    assert t_after["children"] == [c.initiator_iqn], "C's session to B is visible"
    assert md5_of(b, vm3, IMAGE) == fleet.origin_md5, "VM3 does not see VM1's write"

    # A new process on C sees the state the attaching process left, and detaches cleanly.
    st = py(c, node_ctor(c) + "out(node.status())")
    assert st["templates"][IMAGE_ID]["vms"] == ["vm2"]
    py(c, node_ctor(c) + "node.detach('vm2')")
    assert_clean(c)

    # B keeps the template while a VM uses it; the last detach removes everything.
    py(b, node_ctor(b, export_ip=b.ip) + "node.detach('vm1')")
    st = py(b, node_ctor(b, export_ip=b.ip) + "out(node.status())")
    assert st["templates"][IMAGE_ID]["vms"] == ["vm3"]
    py(b, node_ctor(b, export_ip=b.ip) + "node.detach('vm3')")
    assert_clean(b)
    with pytest.raises(GuestError) as e:
        py(b, node_ctor(b, export_ip=b.ip) + "node.detach('vm3')")
    assert e.value.exc_type == "NotFound"


def test_template_kept_while_a_child_is_logged_in(fleet):
    b, c = fleet["b"], fleet["c"]
    vm = py(b, node_ctor(b, export_ip=b.ip) + f"out(node.attach({IMAGE_ID!r}, [{origin_conn(fleet, b)!r}], 'vm1'))")
    conn_c = py(b, node_ctor(b, export_ip=b.ip) + f"out(node.export_info({IMAGE_ID!r}, {c.initiator_iqn!r}))")
    py(c, node_ctor(c) + f"out(node.attach({IMAGE_ID!r}, [{conn_c!r}], 'vm2'))")
    py(b, node_ctor(b, export_ip=b.ip) + "node.detach('vm1')")
    st = py(b, node_ctor(b, export_ip=b.ip) + "out(node.status())")
    assert st["templates"][IMAGE_ID]["vms"] == [] and st["templates"][IMAGE_ID]["children"] == [c.initiator_iqn]
    assert md5_of(c, "/dev/mapper/vmthunder-1_%s_vm_vm2_snap" % IMAGE_ID, IMAGE) == fleet.origin_md5
    py(c, node_ctor(c) + "node.detach('vm2')")
    assert_clean(c)
    assert py(b, node_ctor(b, export_ip=b.ip) + "out(node.sweep())") == [IMAGE_ID]
    assert_clean(b)
    del vm


def test_a_child_logs_in_to_a_prepared_target_before_its_parent_builds(fleet):
    """B prepares its target for the image (no template yet) and grants C; C logs in at once
    (no LUN, no disk); B builds its template, which adds LUN 0 for C; C's attach then reuses
    that session and reads the origin's data. An abandoned preparation leaves nothing."""
    b, c = fleet["b"], fleet["c"]
    nb = node_ctor(b, export_ip=b.ip)
    assert py(b, nb + f"out(node.prepare_export({IMAGE_ID!r}))") is True
    assert py(b, nb + f"out(node.prepare_export({IMAGE_ID!r}))") is False  # idempotent
    conn_c = py(b, nb + f"out(node.export_info({IMAGE_ID!r}, {c.initiator_iqn!r}))")
    assert py(c, node_ctor(c) + f"out(node.prelogin({conn_c!r}))") == 1
    sessions = c.check("ls /sys/class/iscsi_session").split()
    assert len(sessions) == 1 and c.check("ls /sys/class/iscsi_session/*/device/ | grep -c target || true").strip() in ("0", "")
    assert py(b, nb + "out(node.status())")["templates"] == {}

    vm1 = py(b, nb + f"out(node.attach({IMAGE_ID!r}, [{origin_conn(fleet, b)!r}], 'vm1'))")
    out = c.check(
        f"python3 - <<'EOF'\nimport logging, vmthunder\nlogging.basicConfig(level=logging.INFO)\n"
        f"{node_ctor(c)}print(node.attach({IMAGE_ID!r}, [{conn_c!r}], 'vm2'))\nEOF",
        timeout=180,
    )
    assert "reusing iSCSI session" in out, out
    assert c.check("ls /sys/class/iscsi_session").split() == sessions
    vm2 = out.strip().splitlines()[-1]
    assert md5_of(c, vm2, IMAGE) == fleet.origin_md5 and md5_of(b, vm1, IMAGE) == fleet.origin_md5
    assert py(c, node_ctor(c) + f"out(node.logout_unused({conn_c!r}))") == 0  # in use: kept
    py(c, node_ctor(c) + "node.detach('vm2')")
    assert_clean(c)
    py(b, nb + "node.detach('vm1')")
    assert_clean(b)

    # Prepared, a child logged in, then the build is abandoned: drop_export removes it all.
    assert py(b, nb + f"out(node.prepare_export({IMAGE_ID!r}))") is True
    conn_c = py(b, nb + f"out(node.export_info({IMAGE_ID!r}, {c.initiator_iqn!r}))")
    assert py(c, node_ctor(c) + f"out(node.prelogin({conn_c!r}))") == 1
    assert py(b, nb + f"out(node.drop_export({IMAGE_ID!r}))") is True
    assert_clean(b)
    assert py(c, node_ctor(c) + f"out(node.logout_unused({conn_c!r}))") == 1
    assert_clean(c)


def test_recover_removes_what_a_crashed_join_left_and_leaves_a_join_in_flight_alone(fleet):
    """C's nova-compute dies (SIGKILL) in the middle of a join: its target prepared and granted,
    logged in to the origin and to its parent B's prepared target, no template yet. A restarted
    process's `recover` removes all of it, but not while another process marks a join of the
    image in flight."""
    b, c = fleet["b"], fleet["c"]
    nb, nc = node_ctor(b, export_ip=b.ip), node_ctor(c, export_ip=c.ip)
    origin = origin_conn(fleet, c)
    assert py(b, nb + f"out(node.prepare_export({IMAGE_ID!r}))") is True
    conn_b = py(b, nb + f"out(node.export_info({IMAGE_ID!r}, {c.initiator_iqn!r}))")
    with pytest.raises(GuestError) as crash:
        py(
            c,
            nc
            + f"""
import signal
mark = node.joining({IMAGE_ID!r})
node.prepare_export({IMAGE_ID!r})
node.export_info({IMAGE_ID!r}, {b.initiator_iqn!r})
node.prelogin({origin!r})
node.prelogin({conn_b!r})
os.kill(os.getpid(), signal.SIGKILL)""",
        )
    assert crash.value.exc_type == "exit"
    left = leftovers(c)
    assert len(left["sessions"]) == 2 and left["targets"] == [f"iqn.2026-11.org.vmthunder:c:{IMAGE_ID}"], left

    holder = c.spawn(
        f"python3 - <<'EOF'\nimport time, vmthunder\n{nc}mark = node.joining({IMAGE_ID!r})\n"
        f"print('held', flush=True)\ntime.sleep(120)\nEOF"
    )
    try:
        for _ in range(300):
            if "held" in holder.output() or holder.poll() is not None:
                break
            time.sleep(0.1)
        assert "held" in holder.output(), holder.output()
        with pytest.raises(GuestError) as busy:
            py(c, nc + f"out(node.recover({IMAGE_ID!r}, [{origin!r}]))")
        assert busy.value.exc_type == "Busy" and "in flight" in busy.value.message
        assert leftovers(c) == left  # untouched
    finally:
        holder.kill()
        holder.wait(30)

    removed = py(c, nc + f"out(node.recover({IMAGE_ID!r}, [{origin!r}]))")
    assert sorted(removed) == sorted(
        [
            f"prepared export of image {IMAGE_ID}",
            f"session to {fleet.origin_iqn} at {fleet['a'].ip}:3260",
            f"session to {conn_b['data']['target_iqn']} at {b.ip}:3260",
        ]
    ), removed
    assert_clean(c)
    assert py(c, nc + f"out(node.recover({IMAGE_ID!r}, [{origin!r}]))") == []  # nothing left
    assert py(b, nb + f"out(node.drop_export({IMAGE_ID!r}))") is True
    assert_clean(b)


def test_vmm_overlay(fleet):
    b = fleet["b"]
    ovl = py(b, node_ctor(b) + f"out(node.attach({IMAGE_ID!r}, [{origin_conn(fleet, b)!r}], 'vm9', snapshot='vmm'))")
    assert ovl == f"/var/lib/vmthunder/vmm/{IMAGE_ID}/vm9.qcow2"
    info = b.check(f"qemu-img info -U --output=json {ovl}")
    assert '"format": "qcow2"' in info and f"vmthunder-1_{IMAGE_ID}_origin" in info
    b.check(f"qemu-img convert -U -f qcow2 -O raw {ovl} /tmp/vm9.raw", timeout=120)
    assert md5_of(b, "/tmp/vm9.raw", IMAGE) == fleet.origin_md5
    b.check("rm -f /tmp/vm9.raw")
    py(b, node_ctor(b) + "node.detach('vm9')")
    assert_clean(b)


def test_wrong_lun_leaves_nothing(fleet):
    b = fleet["b"]
    bad = origin_conn(fleet, b, lun=5)
    with pytest.raises(GuestError) as e:
        py(b, node_ctor(b, export_ip=b.ip, scan_timeout_s=3.0) + f"node.attach({IMAGE_ID!r}, [{bad!r}], 'vm1')")
    assert e.value.exc_type == "IscsiError" and "LUN 5" in e.value.message
    assert_clean(b)


def test_cache_device_too_small_leaves_nothing(fleet):
    b = fleet["b"]
    # 24 MiB local device: the node accepts it, but a 64 MiB image's cache does not fit.
    with pytest.raises(GuestError) as e:
        py(
            b,
            node_ctor(b, cache_device="/dev/ubdc", export_ip=b.ip)
            + f"node.attach({IMAGE_ID!r}, [{origin_conn(fleet, b)!r}], 'vm1')",
        )
    assert e.value.exc_type == "CacheDeviceError"
    assert "no room" in e.value.message or "too small" in e.value.message, e.value.message
    assert_clean(b)
    # 8 MiB: refused when the node is made.
    with pytest.raises(GuestError) as e:
        py(b, node_ctor(b, cache_device="/dev/ubdd") + "pass")
    assert e.value.exc_type == "CacheDeviceError" and "/dev/ubdd" in e.value.message
    with pytest.raises(GuestError) as e:
        py(b, node_ctor(b, cache_device="/dev/ubdz") + "pass")
    assert e.value.exc_type == "CacheDeviceError" and "/dev/ubdz" in e.value.message
    assert_clean(b)


BAD_CONNS = [
    ({"driver_volume_type": "iscsi", "data": {"target_iqn": "iqn.2010-10.a:x", "target_lun": 0}}, "missing target_portal"),
    ({"target_portal": "198.18.7.1:3260", "target_iqn": "iqn.2010-10.a:x y", "target_lun": 0}, "x y"),
    ({"target_portal": "198.18.7.1:3260", "target_iqn": "iqn.2010-10.a:x\nz", "target_lun": 0}, "\\n"),
    ({"target_portal": "198.18.7.1:3260", "target_iqn": "IQN.bad", "target_lun": 0}, "IQN.bad"),
    ({"target_portal": "nohost", "target_iqn": "iqn.2010-10.a:x", "target_lun": 0}, "nohost"),
    ({"target_portal": "198.18.7.1:3260", "target_iqn": "iqn.2010-10.a:x", "target_lun": "zero"}, "zero"),
]


@pytest.mark.parametrize("conn,needle", BAD_CONNS)
def test_malformed_connection_info(fleet, conn, needle):
    b = fleet["b"]
    with pytest.raises(GuestError) as e:
        py(b, node_ctor(b) + f"node.attach({IMAGE_ID!r}, [{conn!r}], 'vm1')")
    assert e.value.exc_type == "InvalidArgument" and needle in e.value.message
    assert_clean(b)


@pytest.mark.parametrize(
    "image,vm",
    [
        ("a/b", "vm1"),
        ("..", "vm1"),
        ("img 1", "vm1"),
        ("img\n1", "vm1"),
        (IMAGE_ID, "../vm"),
        (IMAGE_ID, "vm 1"),
        (IMAGE_ID, "vm/1"),
    ],
)
def test_bad_names(fleet, image, vm):
    b = fleet["b"]
    with pytest.raises(GuestError) as e:
        py(b, node_ctor(b) + f"node.attach({image!r}, [{origin_conn(fleet, b)!r}], {vm!r})")
    assert e.value.exc_type == "InvalidArgument"
    assert_clean(b)


def test_failure_after_the_cache_set_leaves_nothing(fleet):
    """The VM's COW does not fit: the failure comes after the iSCSI session, the paths, the
    bcache cache set and the template exist; all of it is undone."""
    b = fleet["b"]
    with pytest.raises(GuestError) as e:
        py(
            b,
            node_ctor(b, export_ip=b.ip, cow_size_mib=100000) + f"node.attach({IMAGE_ID!r}, [{origin_conn(fleet, b)!r}], 'vm1')",
        )
    assert e.value.exc_type == "CacheDeviceError" and "COW" in e.value.message, e.value.message
    assert_clean(b)
