"""python/vmthunder/conf.py: the [vmthunder] options as Nova registers them (oslo.config), as
the config generator lists them, and as the `vmthunder` command reads nova.conf without
oslo.config: both readings of one file agree. Needs oslo.config (the patched Nova's venv:
nova_patch/run-nova-tests.sh runs this); skipped without it.
"""

import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stdout
from importlib import metadata

try:
    from oslo_config import cfg
except ImportError:  # pragma: no cover - the system Python of the kernel tests
    cfg = None

CONF_PY = os.path.join(os.path.dirname(__file__), "..", "..", "python", "vmthunder", "conf.py")


def load_conf_module():
    spec = importlib.util.spec_from_file_location("vmthunder_conf_under_test", CONF_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NOVA_CONF = """
[DEFAULT]
state_path = /srv/nova
host = cn7
my_ip = 198.18.0.5

[vmthunder]
enabled = true
cache_device = /dev/vdb
snapshot_mode = vmm
coordination_url = etcd3+https://ctl:2379?ca_cert=/etc/vmthunder/ca.pem
fanout = 4
cow_size_mib = 2048
"""


@unittest.skipIf(cfg is None, "oslo.config is not installed in this Python")
class OsloTest(unittest.TestCase):
    def setUp(self):
        self.vconf = load_conf_module()
        self.conf = cfg.ConfigOpts()
        self.conf.register_opts(
            [
                cfg.StrOpt("state_path", default="/var/lib/nova"),
                cfg.StrOpt("host"),
                cfg.StrOpt("my_ip"),
                cfg.StrOpt("my_block_storage_ip", default="$my_ip"),
            ]
        )
        self.vconf.register_opts(self.conf)

    def parse(self, text):
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        path = os.path.join(d.name, "nova.conf")
        with open(path, "w") as f:
            f.write(text)
        self.conf([], project="nova", default_config_files=[path])
        return path

    def test_defaults_as_nova_sees_them(self):
        self.parse("")
        v = self.conf.vmthunder
        self.assertFalse(v.enabled)
        self.assertEqual("dm", v.snapshot_mode)
        self.assertEqual("/var/lib/nova/vmthunder", v.state_dir)
        for name in ("cache_device", "coordination_url", "fanout", "cow_size_mib"):
            self.assertIsNone(v[name], name)

    def test_bad_values_are_refused(self):
        self.assertRaises(ValueError, self.conf.set_override, "snapshot_mode", "lvm", "vmthunder")
        self.assertRaises(ValueError, self.conf.set_override, "fanout", 0, "vmthunder")

    def test_the_command_reads_nova_conf_as_nova_does(self):
        path = self.parse(NOVA_CONF)
        mine = self.vconf.load([path])
        self.assertEqual({o.name: self.conf.vmthunder[o.name] for o in self.vconf.OPTIONS}, mine.vmthunder)
        self.assertEqual(("cn7", "198.18.0.5"), (mine.host, mine.export_ip))
        self.assertEqual("/srv/nova/vmthunder", mine.vmthunder["state_dir"])

    def test_listed_for_the_generator(self):
        [(group, opts)] = self.vconf.list_opts()
        self.assertEqual("vmthunder", group.name)
        self.assertEqual([o.name for o in self.vconf.OPTIONS], [o.name for o in opts])

    def test_the_generator_shows_them_where_vmthunder_is_installed(self):
        points = [e for e in metadata.entry_points(group="oslo.config.opts") if e.name == "vmthunder"]
        if not points:
            self.skipTest("vmthunder is not installed in this Python (no oslo.config.opts entry point)")
        self.assertEqual("vmthunder.conf:list_opts", points[0].value)
        out = subprocess.run(
            [sys.executable, "-m", "oslo_config.generator", "--namespace", "vmthunder"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        self.assertIn("[vmthunder]", out)
        self.assertIn("#cache_device = <None>", out)


class WithoutOsloTest(unittest.TestCase):
    """The command's reader needs only the standard library."""

    def setUp(self):
        self.vconf = load_conf_module()
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)

    def write(self, text, name="nova.conf"):
        path = os.path.join(self.dir.name, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_later_files_and_overrides_win(self):
        a = self.write(NOVA_CONF)
        b = self.write("[vmthunder]\ncache_device = /dev/vdc\n", "nova-compute.conf")
        s = self.vconf.load([a, b], {"state_dir": "/tmp/x", "host": None, "export_ip": "198.18.0.9"})
        self.assertEqual("/dev/vdc", s.vmthunder["cache_device"])
        self.assertEqual("/tmp/x", s.vmthunder["state_dir"])
        self.assertEqual(("cn7", "198.18.0.9"), (s.host, s.export_ip))
        self.assertEqual((a, b), s.files)

    def test_errors_name_the_file_and_the_option(self):
        with self.assertRaisesRegex(self.vconf.ConfigError, r"\[vmthunder\] fanout: 'many' is not an integer"):
            self.vconf.load([self.write("[vmthunder]\nfanout = many\n")])
        with self.assertRaisesRegex(self.vconf.ConfigError, r"\[vmthunder\] snapshot_mode: 'lvm' is not one of dm, vmm"):
            self.vconf.load([self.write("[vmthunder]\nsnapshot_mode = lvm\n")])
        with self.assertRaisesRegex(self.vconf.ConfigError, "missing.conf"):
            self.vconf.load([os.path.join(self.dir.name, "missing.conf")])
        with self.assertRaisesRegex(self.vconf.ConfigError, r"\$nowhere"):
            self.vconf.load([self.write("[vmthunder]\nstate_dir = $nowhere/x\n")])

    def test_default_state_dir_without_state_path(self):
        with redirect_stdout(io.StringIO()):
            s = self.vconf.load([self.write("[vmthunder]\nenabled = yes\n")])
        self.assertTrue(s.vmthunder["enabled"])
        self.assertEqual("/var/lib/nova/vmthunder", s.vmthunder["state_dir"])


if __name__ == "__main__":
    unittest.main()
