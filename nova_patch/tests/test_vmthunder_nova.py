"""Unit tests of python/vmthunder/nova.py, the helpers the Nova patch calls.

The native vmthunder package (and its tree and registry modules) is replaced by fakes in
sys.modules, so these tests run without the extension being built:
``python -m unittest discover -s nova_patch/tests``.
"""

import importlib.util
import os
import sys
import tempfile
import types
import unittest
from unittest import mock

HELPERS = os.path.join(os.path.dirname(__file__), "..", "..", "python", "vmthunder", "nova.py")


class Error(Exception):
    pass


class NotFound(Error):
    pass


def load_helpers():
    """vmthunder/nova.py, importing fake vmthunder, vmthunder.tree and vmthunder.registry."""
    fake = types.ModuleType("vmthunder")
    fake.Node = mock.Mock(name="Node")
    fake.Node.return_value.reassemble.return_value = {"disks": {}, "failed": {}, "failed_images": {}, "removed": []}
    fake.Error, fake.NotFound = Error, NotFound
    fake.host_name = lambda host: host.lower()  # the rule itself: tests/unit (Rust)
    fake.initiator_name = mock.Mock(name="initiator_name", return_value="iqn.1993-08.org.debian:01:abc")
    tree = types.ModuleType("vmthunder.tree")
    tree.Tree = mock.Mock(name="Tree")
    tree.Tree.return_value.registry = None
    tree.Tree.return_value.recover.return_value = {}
    tree.Tree.return_value.rejoin.return_value = []
    tree.load_profile = mock.Mock(name="load_profile", return_value=[[0, 4096]])
    registry = types.ModuleType("vmthunder.registry")
    registry.Registry = mock.Mock(name="Registry")
    registry.Registry.return_value.started = False
    tree.Tree.return_value.rejoin.return_value = []  # nothing a reboot rebuilt relays again
    fake.tree, fake.registry = tree, registry
    modules = {"vmthunder": fake, "vmthunder.tree": tree, "vmthunder.registry": registry}
    patcher = mock.patch.dict(sys.modules, modules)
    patcher.start()
    spec = importlib.util.spec_from_file_location("vmthunder_nova_under_test", HELPERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, fake, patcher


class Conf:
    def __init__(self, **kw):
        self.cache_device = "/dev/vdb"
        self.state_dir = "/var/lib/nova/vmthunder"
        self.coordination_url = None
        self.fanout = None
        self.cow_size_mib = None
        self.__dict__.update(kw)


class HelperTestCase(unittest.TestCase):
    def setUp(self):
        self.helpers, self.vmthunder, patcher = load_helpers()
        self.addCleanup(patcher.stop)
        self.Node = self.vmthunder.Node
        self.Tree = self.vmthunder.tree.Tree
        self.Registry = self.vmthunder.registry.Registry
        initiator = mock.patch.object(self.helpers, "_initiator", return_value="iqn.2004-10.com.ubuntu:01:cn1")
        initiator.start()
        self.addCleanup(initiator.stop)


class GetNodeTest(HelperTestCase):
    def test_one_tree_per_configuration_without_registry(self):
        tree = self.helpers.get_node(Conf(), "cn1", "198.18.0.2")
        self.assertIs(tree, self.helpers.get_node(Conf(), "cn1", "198.18.0.2"))
        self.Node.assert_called_once_with(
            host="cn1", cache_device="/dev/vdb", state_dir="/var/lib/nova/vmthunder", export_ip="198.18.0.2"
        )
        self.Tree.assert_called_once_with(
            self.Node.return_value,
            None,
            initiator="iqn.2004-10.com.ubuntu:01:cn1",
            export_ip="198.18.0.2",
            state_dir="/var/lib/nova/vmthunder",
        )
        self.Registry.assert_not_called()
        tree.start_watch.assert_called_once_with()  # upkeep heals parent paths without a registry too
        self.helpers.get_node(Conf(cache_device="/dev/vdc"), "cn1", "198.18.0.2")
        self.assertEqual(2, self.Node.call_count)

    def test_a_new_tree_recovers_before_its_first_attach(self):
        tree = self.helpers.get_node(Conf(), "cn1")
        tree.recover.assert_called_once_with()
        self.helpers.get_node(Conf(), "cn1")  # the same tree again: nothing to recover
        tree.recover.assert_called_once_with()
        tree.recover.return_value = {"img": ["prepared export of image img"]}
        with self.assertLogs("vmthunder.nova", "WARNING") as logs:
            self.helpers.get_node(Conf(state_dir="/srv/vmthunder"), "cn1")
        self.assertIn("prepared export of image img", logs.output[0])

    def test_cow_size_passed_only_when_configured(self):
        self.helpers.get_node(Conf(cow_size_mib=4096), "cn1")
        self.Node.assert_called_once_with(
            host="cn1", cache_device="/dev/vdb", state_dir="/var/lib/nova/vmthunder", export_ip=None, cow_size_mib=4096
        )
        self.helpers.get_node(Conf(cow_size_mib=None), "cn1")  # unset: the library's default
        self.assertEqual(
            mock.call(host="cn1", cache_device="/dev/vdb", state_dir="/var/lib/nova/vmthunder", export_ip=None),
            self.Node.call_args,
        )

    def test_registry_joined_when_configured(self):
        self.Tree.return_value.registry = self.Registry.return_value
        tree = self.helpers.get_node(Conf(coordination_url="etcd3+http://ctl:2379", fanout=3), "CN1")
        self.Registry.assert_called_once_with("etcd3+http://ctl:2379", "cn1")
        self.Tree.assert_called_once_with(
            self.Node.return_value,
            self.Registry.return_value,
            initiator=mock.ANY,
            export_ip=None,
            state_dir="/var/lib/nova/vmthunder",
            fanout=3,
        )
        tree.start_watch.assert_called_once_with()
        self.Registry.return_value.start.assert_called_once_with()

    def test_unreachable_registry_is_retried_on_next_use(self):
        self.Tree.return_value.registry = registry = self.Registry.return_value
        registry.start.side_effect = [Error("etcd unreachable"), None]
        conf = Conf(coordination_url="etcd3+http://ctl:2379")
        with self.assertLogs("vmthunder.nova", "WARNING"):
            tree = self.helpers.get_node(conf, "cn1")
        self.assertIs(tree, self.helpers.get_node(conf, "cn1"))
        self.assertEqual(2, registry.start.call_count)
        self.assertEqual(1, self.Node.call_count)

    def test_node_errors_propagate_and_nothing_is_cached(self):
        node = mock.Mock(name="node")
        node.reassemble.return_value = {"disks": {}, "failed": {}, "failed_images": {}, "removed": []}
        self.Node.side_effect = [Error("no cache device"), node]
        self.assertRaises(Error, self.helpers.get_node, Conf(), "cn1")
        self.helpers.get_node(Conf(), "cn1")
        self.assertEqual(node, self.Tree.call_args.args[0])

    def test_the_cache_and_the_initiator_are_prepared_at_start_and_a_failure_is_not_fatal(self):
        self.helpers.get_node(Conf(), "cn1")
        self.Node.return_value.prepare_cache.assert_called_once_with()
        self.Node.return_value.prepare_initiator.assert_called_once_with()
        self.Node.return_value.prepare_cache.side_effect = Error("cache device busy")
        self.Node.return_value.prepare_initiator.side_effect = Error("iscsiadm: iface not created")
        with self.assertLogs("vmthunder.nova", "WARNING") as logs:
            self.helpers.get_node(Conf(state_dir="/srv/vmthunder"), "cn1")
        self.assertIn("cache device busy", logs.output[0])
        self.assertIn("iface not created", logs.output[1])
        self.assertEqual(2, self.Tree.call_count)

    def test_the_disks_are_rebuilt_first_and_a_vm_that_cannot_be_is_logged(self):
        calls = []
        node = self.Node.return_value
        node.reassemble.side_effect = lambda: (
            calls.append("reassemble")
            or {
                "disks": {"vm1": "/dev/mapper/x"},
                "failed": {"vm2": 'VM "vm2" of image "img": unreachable'},
                "failed_images": {},
                "removed": [],
            }
        )
        node.prepare_cache.side_effect = lambda: calls.append("prepare_cache")
        node.prepare_initiator.side_effect = lambda: calls.append("prepare_initiator")
        self.Tree.return_value.recover.side_effect = lambda: calls.append("recover") or {}
        with self.assertLogs("vmthunder.nova", "INFO") as logs:
            self.helpers.get_node(Conf(), "cn1")
        self.assertEqual(["reassemble", "prepare_cache", "prepare_initiator", "recover"], calls)
        errors = [line for line in logs.output if line.startswith("ERROR")]
        self.assertEqual(1, len(errors))
        self.assertIn("vm2", errors[0])
        self.assertIn('image "img"', errors[0])

    def test_host_name_is_the_librarys(self):
        self.assertEqual("compute-1", self.helpers.host_name("Compute-1"))

    def test_initiator_name(self):
        self.helpers.__dict__.pop("_initiator", None)
        spec = importlib.util.spec_from_file_location("h2", HELPERS)
        fresh = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fresh)
        self.assertEqual("iqn.1993-08.org.debian:01:abc", fresh._initiator())
        self.vmthunder.initiator_name.side_effect = Error("/etc/iscsi/initiatorname.iscsi: no such file")
        with self.assertLogs("vmthunder.nova", "WARNING"):
            self.assertIsNone(fresh._initiator())


class AttachDetachTest(HelperTestCase):
    def setUp(self):
        super().setUp()
        self.tree = mock.Mock()
        state_dir = tempfile.TemporaryDirectory()
        self.addCleanup(state_dir.cleanup)
        self.tree.state_dir = state_dir.name
        self.cinder = {"driver_volume_type": "iscsi", "data": {"target_lun": 1}}

    def _write_profile(self, image_id):
        os.makedirs(os.path.join(self.tree.state_dir, "profiles"))
        path = os.path.join(self.tree.state_dir, "profiles", f"{image_id}.json")
        with open(path, "w") as f:
            f.write('{"reads": [[0.0, 0, 4096]]}')
        return path

    def test_a_recorded_boot_profile_is_passed_for_prefetch(self):
        path = self._write_profile("vol1")
        self.tree.attach.return_value = "/dev/vmthunder-test-nonexistent"
        self.helpers.attach(self.tree, self.cinder, "vm1", "vol1")
        self.vmthunder.tree.load_profile.assert_called_once_with(path)
        self.tree.attach.assert_called_once_with("vol1", self.cinder, "vm1", "dm", profile=[[0, 4096]])

    def test_a_broken_boot_profile_is_skipped_with_a_warning(self):
        self._write_profile("vol1")
        self.vmthunder.tree.load_profile.side_effect = ValueError("not a trace")
        self.tree.attach.return_value = "/dev/vmthunder-test-nonexistent"
        with self.assertLogs(self.helpers.LOG, "WARNING") as logs:
            self.helpers.attach(self.tree, self.cinder, "vm1", "vol1")
        self.assertIn("not a trace", logs.output[0])
        self.tree.attach.assert_called_once_with("vol1", self.cinder, "vm1", "dm", profile=None)

    def test_dm_snapshot_is_a_local_block_device(self):
        self.tree.attach.return_value = "/dev/vmthunder-test-nonexistent"
        info = self.helpers.attach(self.tree, self.cinder, "vm1", "vol1")
        self.tree.attach.assert_called_once_with("vol1", self.cinder, "vm1", "dm", profile=None)
        self.assertEqual(
            {
                "driver_volume_type": "local",
                "serial": "vol1",
                "data": {
                    "device_path": "/dev/vmthunder-test-nonexistent",
                    "vmthunder": {"image_id": "vol1", "vm_id": "vm1", "snapshot": "dm"},
                },
            },
            info,
        )

    def test_vmm_snapshot_is_a_qcow2_file(self):
        self.tree.attach.return_value = "/var/lib/nova/vmthunder/vm1.qcow2"
        info = self.helpers.attach(self.tree, self.cinder, "vm1", "vol1", "vmm")
        self.assertEqual("qcow2", info["data"]["format"])
        self.assertEqual("/var/lib/nova/vmthunder/vm1.qcow2", info["data"]["device_path"])

    def test_attach_errors_propagate(self):
        self.tree.attach.side_effect = Error("iSCSI login failed")
        self.assertRaises(Error, self.helpers.attach, self.tree, self.cinder, "vm1", "vol1")

    def test_detach(self):
        self.assertTrue(self.helpers.detach(self.tree, "vm1"))
        self.tree.detach.assert_called_once_with("vm1")

    def test_detach_of_unknown_vm_is_not_an_error(self):
        self.tree.detach.side_effect = NotFound("vm1")
        self.assertFalse(self.helpers.detach(self.tree, "vm1"))

    def test_other_errors_propagate(self):
        self.tree.detach.side_effect = Error("busy")
        self.assertRaises(Error, self.helpers.detach, self.tree, "vm1")


class NovaCallsTest(HelperTestCase):
    """The four calls the Nova patch makes, with Nova's whole CONF."""

    def setUp(self):
        super().setUp()
        self.conf = types.SimpleNamespace(vmthunder=Conf(snapshot_mode="vmm"), host="CN1", my_block_storage_ip="198.18.0.2")
        self.tree = self.Tree.return_value
        self.tree.state_dir = "/nonexistent"

    def test_start_up_builds_the_tree_once(self):
        self.assertIs(self.tree, self.helpers.start_up(self.conf))
        self.Node.assert_called_once_with(
            host="cn1", cache_device="/dev/vdb", state_dir="/var/lib/nova/vmthunder", export_ip="198.18.0.2"
        )
        self.Node.return_value.reassemble.assert_called_once_with()
        self.tree.recover.assert_called_once_with()

    def test_start_up_logs_and_never_raises(self):
        self.Node.side_effect = Error("layout damaged")
        with self.assertLogs("vmthunder.nova", "ERROR") as logs:
            self.assertIsNone(self.helpers.start_up(self.conf))
        self.assertIn("layout damaged", "\n".join(logs.output))

    def test_attach_volume_takes_the_configured_snapshot_mode(self):
        self.tree.attach.return_value = "/var/lib/nova/vmthunder/vm1.qcow2"
        info = self.helpers.attach_volume(self.conf, {"data": {}}, "vm1", "vol1")
        self.tree.attach.assert_called_once_with("vol1", {"data": {}}, "vm1", "vmm", profile=None)
        self.assertEqual("qcow2", info["data"]["format"])

    def test_detach_volume_raises_and_instance_left_logs(self):
        self.tree.detach.side_effect = Error("busy")
        self.assertRaises(Error, self.helpers.detach_volume, self.conf, "vm1")
        with self.assertLogs("vmthunder.nova", "ERROR") as logs:
            self.assertFalse(self.helpers.instance_left(self.conf, "vm1"))
        self.assertIn("vm1 behind: busy", logs.output[0])
        self.tree.detach.side_effect = NotFound("vm2")  # not one of ours: nothing to say
        self.assertFalse(self.helpers.instance_left(self.conf, "vm2"))
        self.tree.detach.side_effect = None
        self.assertTrue(self.helpers.instance_left(self.conf, "vm3"))

    def test_the_patch_markers_are_lines_the_patch_adds(self):
        patch = os.path.join(os.path.dirname(__file__), "..", "vmthunder-nova-34.0.0.patch")
        with open(patch) as f:
            added = {}
            path = None
            for line in f:
                if line.startswith("+++ b/"):
                    path = line[6:].split("\t")[0].strip()
                elif line.startswith("+") and path:
                    added.setdefault(path, []).append(line[1:].strip())
        for path, marker in self.helpers.PATCH_MARKERS.items():
            self.assertIn(marker, added[path], path)


class WithTheRealTreeTest(unittest.TestCase):
    """nova.py over the project's own vmthunder/tree.py (only the extension is faked)."""

    def setUp(self):
        ext = types.ModuleType("vmthunder._vmthunder")
        ext.Error, ext.NotFound, ext.Busy = Error, NotFound, type("Busy", (Error,), {})
        ext.InvalidArgument = type("InvalidArgument", (Error,), {})
        ext.Node = mock.MagicMock(name="Node")
        ext.StateDirError = type("StateDirError", (Error,), {})
        for name in (
            "choose_parents",
            "check_grant",
            "grant_key",
            "parse_host_record",
            "parse_image_record",
            "seal_grant",
            "validate_id",
            "own_record",
            "parents_progress",
            "HostRecord",
            "ImageRecord",
            "JoinState",
            "Placement",
            "Policy",
        ):
            setattr(ext, name, mock.Mock(name=name))
        ext.validate_id.side_effect = lambda what, value: value
        fake = types.ModuleType("vmthunder")
        fake.Node, fake.Error, fake.NotFound = ext.Node, Error, NotFound
        fake.host_name = lambda host: host.lower()
        fake.initiator_name = mock.Mock(name="initiator_name", return_value="iqn.1993-08.org.debian:01:cn1")
        patcher = mock.patch.dict(sys.modules, {"vmthunder": fake, "vmthunder._vmthunder": ext})
        patcher.start()
        self.addCleanup(patcher.stop)
        for name in ("tree", "nova"):
            spec = importlib.util.spec_from_file_location(
                "vmthunder." + name, os.path.join(os.path.dirname(HELPERS), name + ".py")
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules["vmthunder." + name] = module
            setattr(fake, name, module)
            spec.loader.exec_module(module)
        self.helpers = fake.nova
        self.node = ext.Node.return_value
        self.node.reassemble.return_value = {"disks": {}, "failed": {}, "failed_images": {}, "removed": []}
        self.node.host = "cn1"
        self.templates = {}  # image -> what Node.template returns, as far as the tree reads it
        self.node.templates.side_effect = lambda: dict(self.templates)
        self.node.template.side_effect = self.templates.get
        self.node.image_of.side_effect = lambda vm: next((i for i, t in self.templates.items() if vm in t.vms), None)

    def test_attach_and_detach_without_registry(self):
        import tempfile

        with tempfile.TemporaryDirectory() as state_dir:
            tree = self.helpers.get_node(Conf(state_dir=state_dir), "cn1", "198.18.0.2")
            self.node.attach.return_value = "/dev/vmthunder-nonexistent"
            cinder = {"driver_volume_type": "iscsi", "data": {"target_lun": 1}}
            info = self.helpers.attach(tree, cinder, "vm1", "vol1", "dm")
            self.node.attach.assert_called_once_with("vol1", [cinder], "vm1", "dm")
            self.node.joining.assert_called_once_with("vol1")  # marked in flight (recover skips it)
            self.node.joining.return_value.__exit__.assert_called_once()
            self.assertEqual("/dev/vmthunder-nonexistent", info["data"]["device_path"])
            self.templates["vol1"] = types.SimpleNamespace(vms=["vm1"], children=[])
            self.assertTrue(self.helpers.detach(tree, "vm1"))
            self.node.detach.assert_called_once_with("vm1")
            self.node.detach.side_effect = NotFound("vm1")
            self.assertFalse(self.helpers.detach(tree, "vm1"))


if __name__ == "__main__":
    unittest.main()
