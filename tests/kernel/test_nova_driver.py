"""The patched Nova driver class boots two instances on two nodes from one origin, in UML nodes.

A exports the image volume (Cinder's stand-in); on B and on C a new process of the patched
Nova venv (nova_patch/run-nova-tests.sh --setup-only) builds Nova's own objects (Instance,
BlockDeviceMapping, nova.conf with [vmthunder]) and calls
`nova.virt.block_device.DriverVMThunderVolumeBlockDevice.attach` then `.detach`. Cinder and the
virt driver are fakes; vmthunder is real (iSCSI, LIO, device-mapper in the node's kernel).
"""

import glob
import hashlib
import json
import os
import subprocess
import uuid

import pytest

from lab import Fleet
from tests.kernel._vmt import assert_clean, file_md5, md5_of, py, random_disk, require_uml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.environ.get("NOVA_TEST_VENV") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vmthunder", "nova-34.0.0-venv"
)
VPY = os.path.join(VENV, "bin", "python")
IMAGE = 48 << 20
VOLUME_NAME = "img1"
VOLUME_ID = "6c0b3a52-1f7e-4d2a-9b8e-5a4f3e2d1c0b"  # the Cinder volume (vmthunder's image id)


def _wheel():
    """The newest vmthunder wheel that has the Nova helpers (vmthunder/nova.py)."""
    import zipfile

    found = []
    for w in glob.glob(os.path.join(REPO, "target/wheels/vmthunder-*.whl")) + glob.glob("/tmp/wheels-dev/vmthunder-*.whl"):
        try:
            if "vmthunder/nova.py" in zipfile.ZipFile(w).namelist():
                found.append((os.path.getmtime(w), w))
        except (OSError, zipfile.BadZipFile):
            pass
    return max(found)[1] if found else None


def _patched_nova_venv():
    """The patched Nova venv with vmthunder installed in it, or pytest.skip."""
    r = subprocess.run(
        ["bash", os.path.join(REPO, "nova_patch/run-nova-tests.sh"), "--setup-only"], capture_output=True, text=True, timeout=3600
    )
    if r.returncode != 0 or not os.access(VPY, os.X_OK):
        pytest.skip(f"no patched Nova venv ({VENV}): {(r.stdout + r.stderr)[-800:]}")
    wheel = _wheel()
    if wheel is None:
        pytest.skip("no vmthunder wheel with vmthunder/nova.py in target/wheels or /tmp/wheels-dev")
    with open(wheel, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    stamp = os.path.join(VENV, ".vmthunder-wheel")
    installed = open(stamp).read() if os.path.exists(stamp) else None
    if installed != digest:
        subprocess.run(
            [VPY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--force-reinstall", wheel],
            check=True,
            timeout=600,
        )
        with open(stamp, "w") as f:
            f.write(digest)
    subprocess.run(
        [VPY, "-c", "import vmthunder.nova, nova.virt.block_device as b; b.DriverVMThunderVolumeBlockDevice"],
        check=True,
        timeout=300,
    )
    return VPY


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_uml()
    _patched_nova_venv()
    origin = tmp_path_factory.mktemp("origin") / "origin.img"
    random_disk(origin, IMAGE)
    nodes = {
        "a": {"disks": {"ubdb": str(origin)}},
        # Nova's path takes vmthunder's default COW size (1024 MiB) per instance: the cache
        # disk (a sparse file) must hold it next to the cache set (about half the disk).
        "b": {"disks": {"ubdb": 3 << 30}},
        "c": {"disks": {"ubdb": 3 << 30}},
    }
    with Fleet(nodes=nodes, name=f"nv{os.getpid()}", subnet="198.18.40.0/24") as f:
        a = f["a"]
        py(a, f"out(vmthunder.export_volume({VOLUME_NAME!r}, '/dev/ubdb', '{a.ip}:3260'))")
        f.origin_md5 = file_md5(origin, IMAGE)
        yield f


# Runs on a compute node with the patched Nova venv's python. Nova's objects and nova.conf as
# nova-compute has them; Cinder and the virt driver are fakes; vmthunder is the real package.
NOVA_SCRIPT = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
P = json.loads(sys.argv[1])

import nova.conf
from nova import block_device, context, objects
objects.register_all()
CONF = nova.conf.CONF
CONF([], project="nova", default_config_files=[])
CONF.set_override("host", P["host"])
CONF.set_override("my_ip", P["ip"])
CONF.set_override("my_block_storage_ip", P["ip"])
for k, v in {"enabled": True, "cache_device": "/dev/ubdb", "state_dir": "/var/lib/vmthunder",
             "snapshot_mode": "dm"}.items():
    CONF.set_override(k, v, group="vmthunder")

from oslo_serialization import jsonutils
from nova.tests.unit import fake_block_device, fake_instance
from nova.virt import block_device as driver_block_device

saved = []
objects.BlockDeviceMapping.save = lambda self: saved.append(self.connection_info)  # no database


class FakeCinder:
    calls = []

    def get(self, ctx, volume_id, microversion=None):
        return {"id": volume_id, "multiattach": True, "attach_status": "attached",
                "status": "in-use", "size": 1}

    def check_availability_zone(self, *a, **k):
        pass

    def attachment_update(self, ctx, attachment_id, connector, mountpoint):
        self.calls.append(("attachment_update", connector["initiator"]))
        return {"connection_info": json.loads(json.dumps(P["cinder_info"]))}

    def attachment_complete(self, ctx, attachment_id):
        self.calls.append(("attachment_complete",))

    def attachment_delete(self, ctx, attachment_id):
        self.calls.append(("attachment_delete",))

    def get_volume_encryption_metadata(self, ctx, volume_id):
        return {}

    def roll_detaching(self, ctx, volume_id):
        self.calls.append(("roll_detaching",))


class FakeVirtDriver:
    capabilities = {"supports_multiattach": True}
    calls = []

    def get_volume_connector(self, instance):
        return {"initiator": P["initiator"], "ip": P["ip"], "host": P["host"]}

    def instance_exists(self, instance):
        return True

    def attach_volume(self, *a, **k):
        self.calls.append("attach_volume")

    def detach_volume(self, ctx, connection_info, instance, mountpoint, encryption=None):
        self.calls.append(("detach_volume", connection_info.get("driver_volume_type")))


ctx = context.RequestContext("fake_user", "fake_project")
instance = fake_instance.fake_instance_obj(ctx, uuid=P["instance"], host=P["host"])
bdm_obj = fake_block_device.fake_bdm_object(ctx, block_device.BlockDeviceDict({
    "id": 3, "instance_uuid": P["instance"], "device_name": "/dev/vda",
    "source_type": "volume", "destination_type": "volume", "disk_bus": "virtio",
    "device_type": "disk", "volume_size": 1, "volume_id": P["volume"],
    "attachment_id": P["attachment"], "connection_info": None,
    "delete_on_termination": False, "boot_index": 0}))
bdm = driver_block_device.convert_volume(bdm_obj)
assert type(bdm) is driver_block_device.DriverVMThunderVolumeBlockDevice, type(bdm)
cinder, virt = FakeCinder(), FakeVirtDriver()

if P["step"] == "attach":
    bdm.attach(ctx, instance, cinder, virt)
    print("@@JSON " + json.dumps({"connection_info": bdm["connection_info"],
                                  "saved": jsonutils.loads(bdm_obj.connection_info),
                                  "is_vmthunder": bdm.is_vmthunder,
                                  "cinder": cinder.calls, "virt": virt.calls}))
else:
    # A new nova-compute process: the BDM's connection info comes back from the database.
    bdm_obj.connection_info = jsonutils.dumps(P["connection_info"])
    bdm = driver_block_device.convert_volume(bdm_obj)
    assert bdm.is_vmthunder
    bdm.detach(ctx, instance, cinder, virt)
    print("@@JSON " + json.dumps({"cinder": cinder.calls, "virt": virt.calls}))
"""


def nova_run(node, params):
    path = node.write_file(f"nova-{uuid.uuid4().hex[:10]}.py", NOVA_SCRIPT.encode())
    arg = json.dumps(params).replace("'", "'\\''")
    rc, output = node.run(f"{VPY} {path} '{arg}'", timeout=600)
    assert rc == 0, f"{node.name}: rc={rc}\n{output[-4000:]}"
    result = [line[7:] for line in output.splitlines() if line.startswith("@@JSON ")]
    assert result, output[-4000:]
    return json.loads(result[-1])


def test_patched_driver_boots_two_instances_on_two_nodes(fleet):
    a = fleet["a"]
    done = {}
    for name in ("b", "c"):
        node = fleet[name]
        cinder_info = py(a, f"out(vmthunder.allow_initiator({VOLUME_NAME!r}, {node.initiator_iqn!r}, '{a.ip}:3260'))")
        cinder_info["data"]["target_lun"] = 0
        params = {
            "step": "attach",
            "host": f"compute-{name}",
            "ip": node.ip,
            "initiator": node.initiator_iqn,
            "instance": str(uuid.uuid4()),
            "volume": VOLUME_ID,
            "attachment": str(uuid.uuid4()),
            "cinder_info": cinder_info,
        }
        res = nova_run(node, params)
        info = res["connection_info"]
        assert info["driver_volume_type"] == "local", info
        path = info["data"]["device_path"]
        assert path == f"/dev/mapper/vmthunder-1_{VOLUME_ID}_vm_{params['instance']}_snap", info
        assert info["data"]["vmthunder"] == {"image_id": VOLUME_ID, "vm_id": params["instance"], "snapshot": "dm"}
        assert res["saved"] == info, "the BDM saved the snapshot, not Cinder's connection"
        assert res["is_vmthunder"]
        assert res["cinder"] == [["attachment_update", node.initiator_iqn], ["attachment_complete"]]
        assert res["virt"] == [], "nothing but vmthunder connected the volume"
        done[name] = (params, info)

    # Both instances read the origin back, each on its own node.
    for name, (params, info) in done.items():
        assert md5_of(fleet[name], info["data"]["device_path"], IMAGE) == fleet.origin_md5, name

    for name, (params, info) in done.items():
        node = fleet[name]
        res = nova_run(node, dict(params, step="detach", connection_info=info))
        assert res["virt"] == [["detach_volume", "local"]]
        assert res["cinder"] == [["attachment_delete"]]
        assert_clean(node)
