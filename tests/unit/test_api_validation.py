"""Bad input to the Python API: a typed exception naming the value, and nothing created.

These run on any Linux host (no device-mapper needed): validation happens before any kernel
object is touched. A loop-free way to get a real block device node is mknod in a tmp dir.
"""

import json
import os
import stat

import pytest

import vmthunder


@pytest.fixture
def blockdev(tmp_path):
    """A block device node (major 7 = loop) to pass as cache device; never opened here."""
    p = tmp_path / "fakeblk"
    try:
        os.mknod(p, 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    except PermissionError:
        pytest.skip("needs root to mknod a block device node")
    return str(p)


def test_exception_hierarchy():
    kinds = [
        vmthunder.InvalidArgument,
        vmthunder.NotFound,
        vmthunder.Busy,
        vmthunder.CacheDeviceError,
        vmthunder.IscsiError,
        vmthunder.LioError,
        vmthunder.DeviceMapperError,
        vmthunder.SnapshotError,
        vmthunder.RollbackError,
        vmthunder.StateDirError,
    ]
    assert len(set(kinds)) == len(kinds)
    for k in kinds:
        assert issubclass(k, vmthunder.Error)
        assert k.__module__ == "vmthunder"


@pytest.mark.parametrize("host", ["b/x", "..", "a b", "a\nb", "", "UPPER", "a_b"])
def test_bad_host_names_the_value(host, tmp_path):
    with pytest.raises(vmthunder.InvalidArgument) as e:
        vmthunder.Node(host=host, cache_device="/dev/null", state_dir=str(tmp_path / "s"))
    assert json.dumps(host) in str(e.value), "the message names the bad value"
    assert not (tmp_path / "s").exists(), "nothing created"


def test_missing_cache_device(tmp_path):
    with pytest.raises(vmthunder.CacheDeviceError) as e:
        vmthunder.Node(host="b", cache_device="/dev/vmthunder-no-such-disk", state_dir=str(tmp_path / "s"))
    assert "/dev/vmthunder-no-such-disk" in str(e.value)
    assert not (tmp_path / "s").exists()


def test_cache_device_not_a_block_device(tmp_path):
    f = tmp_path / "plain"
    f.write_bytes(b"x")
    with pytest.raises(vmthunder.CacheDeviceError) as e:
        vmthunder.Node(host="b", cache_device=str(f), state_dir=str(tmp_path / "s"))
    assert "not a block device" in str(e.value)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("path", ["relative/dev", "/dev/../etc/passwd", "/dev/sd b", "/dev/sd\nb"])
def test_bad_paths(path, tmp_path):
    with pytest.raises(vmthunder.InvalidArgument):
        vmthunder.Node(host="b", cache_device=path, state_dir=str(tmp_path))
    with pytest.raises(vmthunder.InvalidArgument):
        vmthunder.Node(host="b", cache_device="/dev/null", state_dir=path)


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"export_ip": "not-an-ip"}, "not-an-ip"),
        ({"export_port": 0}, "port"),
        ({"engine": "flashcache"}, "flashcache"),
        ({"cache_block_kib": 48}, "48 KiB"),
        ({"cow_size_mib": 0}, "COW"),
        ({"scan_timeout_s": -1.0}, "scan_timeout_s"),
        ({"readahead_kib": 70000}, "readahead 70000 KiB"),
    ],
)
def test_bad_options(kw, needle, tmp_path):
    with pytest.raises(vmthunder.InvalidArgument) as e:
        vmthunder.Node(host="b", cache_device="/dev/null", state_dir=str(tmp_path / "s"), **kw)
    assert needle in str(e.value)


GOOD = {
    "driver_volume_type": "iscsi",
    "data": {"target_portal": "198.18.0.1:3260", "target_iqn": "iqn.2010-10.org.openstack:volume-1", "target_lun": 0},
}


def _node(blockdev, tmp_path):
    # A 16 MiB+ size check reads sysfs for the device; a fake node has none, so such a Node
    # cannot be built off the kernel test bed. Validation of attach() arguments is checked on
    # the kernel test bed instead (tests/kernel/test_data_path.py::test_bad_input_creates_nothing).
    return vmthunder.Node(host="b", cache_device=blockdev, state_dir=str(tmp_path / "s"))


def test_fake_block_device_without_sysfs_size_is_rejected_cleanly(blockdev, tmp_path):
    # 7:200 has no /sys/dev/block entry on a normal host: a clear NotFound-kind error naming it.
    if os.path.exists("/sys/dev/block/7:200"):
        pytest.skip("loop200 exists on this host")
    with pytest.raises(vmthunder.NotFound) as e:
        _node(blockdev, tmp_path)
    assert "7:200" in str(e.value)


def test_repr_and_signature_documented():
    assert "cache_device" in vmthunder.Node.__doc__ or vmthunder.Node.__init__.__doc__ is not None


@pytest.mark.parametrize(
    "raw,want", [("cn1", "cn1"), ("Compute_1.Example.COM", "compute-1.example.com"), ("-a..b_", "a.b"), ("__", "host")]
)
def test_host_name_from_nova(raw, want):
    assert vmthunder.host_name(raw) == want


def test_long_host_names_stay_valid_and_apart():
    a = vmthunder.host_name("rack12-compute-node-0042.dc1.example.org.internal")
    b = vmthunder.host_name("rack12-compute-node-0042.dc1.example.org.internal2")
    assert a != b
    for n in (a, b):
        assert len(n) <= 40 and vmthunder.template_iqn(n, "img")  # a valid host for an IQN


def test_initiator_name_is_read_or_named_missing():
    try:
        name = vmthunder.initiator_name()
    except vmthunder.IscsiError as e:
        assert "/etc/iscsi/initiatorname.iscsi" in str(e)
    else:
        assert name.startswith("iqn.") or name.startswith("eui.")
