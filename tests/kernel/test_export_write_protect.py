"""Every export is read-only for the nodes that read it, in three UML nodes.

A exports an origin volume (`export_volume`); B attaches VM1 from A and relays; C attaches VM2
from B's export. A child that writes to the disk of its session to a parent (with dd, and with
a raw SCSI WRITE(10) through SG_IO, which skips the child kernel's own read-only check) gets a
write-protect error from the parent's target, and nothing above changes: B's VM, C's VM and the
origin volume still read as the origin file.
"""

import json
import os

import pytest

from lab import Fleet
from tests.kernel._vmt import assert_clean, file_md5, node_ctor, py, random_disk, require_uml

IMAGE_MB = 32
IMAGE = IMAGE_MB << 20
VOLUME = "wpvol"
IMAGE_ID = "7a0e4c2b-1d3f-4e5a-8b6c-9d0e1f2a3b4c"
CONFIGFS = "/sys/kernel/config/target/iscsi"

# A SCSI WRITE(10) of one block of zeros at LBA 0 through SG_IO; prints what came back.
SG_WRITE = r"""
import ctypes, fcntl, json, os, sys
class Hdr(ctypes.Structure):
    _fields_ = [("interface_id", ctypes.c_int), ("dxfer_direction", ctypes.c_int),
                ("cmd_len", ctypes.c_ubyte), ("mx_sb_len", ctypes.c_ubyte), ("iovec_count", ctypes.c_ushort),
                ("dxfer_len", ctypes.c_uint), ("dxferp", ctypes.c_void_p), ("cmdp", ctypes.c_void_p),
                ("sbp", ctypes.c_void_p), ("timeout", ctypes.c_uint), ("flags", ctypes.c_uint),
                ("pack_id", ctypes.c_int), ("usr_ptr", ctypes.c_void_p), ("status", ctypes.c_ubyte),
                ("masked_status", ctypes.c_ubyte), ("msg_status", ctypes.c_ubyte), ("sb_len_wr", ctypes.c_ubyte),
                ("host_status", ctypes.c_ushort), ("driver_status", ctypes.c_ushort), ("resid", ctypes.c_int),
                ("duration", ctypes.c_uint), ("info", ctypes.c_uint)]
dev = sys.argv[1]
bs = int(open(f"/sys/block/{os.path.basename(dev)}/queue/logical_block_size").read())
cdb = (ctypes.c_ubyte * 10)(0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0)
data = ctypes.create_string_buffer(bs)
sense = (ctypes.c_ubyte * 32)()
h = Hdr(interface_id=ord("S"), dxfer_direction=-2, cmd_len=10, mx_sb_len=32, dxfer_len=bs,
        dxferp=ctypes.addressof(data), cmdp=ctypes.addressof(cdb), sbp=ctypes.addressof(sense), timeout=30000)
fd = os.open(dev, os.O_RDONLY)
fcntl.ioctl(fd, 0x2285, h)
s = bytes(sense)[:h.sb_len_wr]
key, asc = (s[1] & 0xF, s[2]) if s and (s[0] & 0x7F) in (0x72, 0x73) else ((s[2] & 0xF, s[12]) if len(s) > 12 else (None, None))
print(json.dumps({"status": h.status, "sense_key": key, "asc": asc}))
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_uml()
    origin = tmp_path_factory.mktemp("origin") / "origin.img"
    random_disk(origin, IMAGE)
    nodes = {
        "a": {"disks": {"ubdb": str(origin)}},
        "b": {"disks": {"ubdb": 192 << 20}},
        "c": {"disks": {"ubdb": 192 << 20}},
    }
    with Fleet(nodes=nodes, name=f"wp{os.getpid()}", subnet="198.18.9.0/24") as f:
        a = f["a"]
        f.origin_iqn = py(a, f"out(vmthunder.export_volume({VOLUME!r}, '/dev/ubdb', '{a.ip}:3260'))")
        f.origin_md5 = file_md5(origin, IMAGE)
        yield f


def session_disk(node, iqn):
    """The SCSI disk (sdX) of NODE's iSCSI session to target IQN."""
    out = node.check(
        f"""for s in /sys/class/iscsi_session/*; do
  [ "$(cat $s/targetname)" = "{iqn}" ] && ls $s/device/target*/*/block/
done; true""",
        timeout=30,
    )
    disks = out.split()
    assert len(disks) == 1, f"{node.name}: disks of the session to {iqn}: {out!r}"
    return "/dev/" + disks[0]


def write_attempts(node, dev):
    """Try to write to DEV on NODE: dd, then a raw SCSI WRITE(10)."""
    rc, dd_out = node.run(f"dd if=/dev/zero of={dev} bs=1M count=2 oflag=direct conv=notrunc 2>&1", timeout=60)
    node.write_file("sg_write.py", SG_WRITE.encode())
    sg = json.loads(node.check(f"python3 /vmt-share/sg_write.py {dev}", timeout=60).strip().splitlines()[-1])
    return rc, dd_out.strip(), sg


def md5_direct(node, path):
    node.check("sync; echo 3 > /proc/sys/vm/drop_caches", timeout=30)
    return node.check(f"dd if={path} bs=1M count={IMAGE_MB} iflag=direct 2>/dev/null | md5sum", timeout=120).split()[0]


def test_write_protect_a_childs_write_to_its_parents_export_fails_and_changes_nothing(fleet):
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    nb = node_ctor(b, export_ip=b.ip)
    conn_b = py(a, f"out(vmthunder.allow_initiator({VOLUME!r}, {b.initiator_iqn!r}, '{a.ip}:3260'))")
    vm1 = py(b, nb + f"out(node.attach({IMAGE_ID!r}, [{conn_b!r}], 'vm1'))")
    conn_c = py(b, nb + f"out(node.export_info({IMAGE_ID!r}, {c.initiator_iqn!r}))")
    b_iqn = conn_c["data"]["target_iqn"]
    vm2 = py(c, node_ctor(c) + f"out(node.attach({IMAGE_ID!r}, [{conn_c!r}], 'vm2'))")

    # Every mapped LUN is write-protected in configfs.
    wp = {
        "a: B's LUN": a.check(f"cat {CONFIGFS}/{fleet.origin_iqn}/tpgt_1/acls/{b.initiator_iqn}/lun_0/write_protect").strip(),
        "b: C's LUN": b.check(f"cat {CONFIGFS}/{b_iqn}/tpgt_1/acls/{c.initiator_iqn}/lun_0/write_protect").strip(),
    }

    # C writes to its disk of B's export; B writes to its disk of A's (export_volume).
    c_disk, b_disk = session_disk(c, b_iqn), session_disk(b, fleet.origin_iqn)
    c_rc, c_dd, c_sg = write_attempts(c, c_disk)
    b_rc, b_dd, b_sg = write_attempts(b, b_disk)
    print(f"C dd to {c_disk}: rc={c_rc}: {c_dd!r}; SG_IO WRITE(10): {c_sg}")
    print(f"B dd to {b_disk}: rc={b_rc}: {b_dd!r}; SG_IO WRITE(10): {b_sg}")
    protected = {"status": 2, "sense_key": 7, "asc": 0x27}  # CHECK CONDITION, DATA PROTECT, WRITE PROTECTED
    seen = {
        "write_protect": wp,
        "C's dd to B fails": c_rc != 0,
        "C's SCSI write to B": c_sg,
        "B's dd to A fails": b_rc != 0,
        "B's SCSI write to A": b_sg,
        "C's disk is read-only": c.check(f"cat /sys/block/{os.path.basename(c_disk)}/ro").strip(),
        "B's VM": md5_direct(b, vm1),
        "C's VM": md5_direct(c, vm2),
        "origin volume on A": md5_direct(a, "/dev/ubdb"),
    }
    assert seen == {
        "write_protect": {"a: B's LUN": "1", "b: C's LUN": "1"},
        "C's dd to B fails": True,
        "C's SCSI write to B": protected,
        "B's dd to A fails": True,
        "B's SCSI write to A": protected,
        "C's disk is read-only": "1",
        "B's VM": fleet.origin_md5,
        "C's VM": fleet.origin_md5,
        "origin volume on A": fleet.origin_md5,
    }

    # Nothing else changed: both nodes detach cleanly.
    py(c, node_ctor(c) + "node.detach('vm2')")
    assert_clean(c)
    py(b, nb + "node.detach('vm1')")
    assert_clean(b)
