"""The `vmthunder` command's Python side: its entry points, arguments, output, and the checks
that need the network or Nova (the registry, clock skew, the Nova patch). The kernel side:
tests/kernel/test_cli.py."""

import email.utils
import http.server
import json
import os
import sys
import threading
import time

import pytest

from tests.kernel._promtext import FormatError, parse
from vmthunder import cli, doctor

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


def test_the_wheel_installs_the_command_and_the_options_entry_point():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        pytest.skip("tomllib needs Python >= 3.11")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"] == {"vmthunder": "vmthunder.cli:main"}
    assert project["entry-points"]["oslo.config.opts"] == {"vmthunder": "vmthunder.conf:list_opts"}


def test_help_teaches_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("doctor", "status", "metrics", "recover", "plan", "nova.conf", "examples:"):
        assert word in out
    with pytest.raises(SystemExit):
        cli.main(["doctor", "--help"])
    assert "exit status: 0 nothing blocks attaches" in capsys.readouterr().out


def test_plan_is_the_simulators_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--help"])
    assert e.value.code == 0
    assert "usage: vmthunder plan" in capsys.readouterr().out


def test_a_bad_configuration_is_named_and_exits_2(tmp_path, capsys):
    conf = tmp_path / "nova.conf"
    conf.write_text("[vmthunder]\nfanout = lots\n")
    assert cli.main(["status", "--config-file", str(conf)]) == 2
    assert "[vmthunder] fanout: 'lots' is not an integer" in capsys.readouterr().err
    conf.write_text("[vmthunder]\nenabled = true\n")
    assert cli.main(["status", "--config-file", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "no cache device: set [vmthunder] cache_device" in err and str(conf) in err
    assert cli.main(["metrics", "--config-file", str(tmp_path / "missing.conf")]) == 2
    assert "missing.conf" in capsys.readouterr().err


def test_doctor_exits_1_only_when_a_blocking_check_fails(monkeypatch, capsys):
    checks = [
        doctor.check("module bcache", True, "loaded", blocking=True),
        doctor.check("registry", False, "ctl:2379 does not answer", "start etcd"),
    ]
    monkeypatch.setattr(doctor, "run", lambda settings, engine: list(checks))
    assert cli.main(["doctor", "--config-file", os.devnull]) == 0
    out = capsys.readouterr().out
    assert "PASS  module bcache" in out and "WARN  registry" in out and "fix: start etcd" in out
    assert "nothing blocks attaches" in out
    checks.append(doctor.check("cache device", False, "/dev/sdz: No such file", "set cache_device", blocking=True))
    assert cli.main(["doctor", "--config-file", os.devnull, "--json"]) == 1
    got = json.loads(capsys.readouterr().out)["checks"]
    assert [c["name"] for c in got] == ["module bcache", "registry", "cache device"]
    assert got[2] == {
        "name": "cache device",
        "ok": False,
        "blocking": True,
        "detail": "/dev/sdz: No such file",
        "fix": "set cache_device",
    }


def fake_nova(tmp_path, version="34.0.0", patched=True):
    from vmthunder.nova import PATCH_MARKERS

    for rel, marker in PATCH_MARKERS.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("# nova\n" + (marker + "\n" if patched else ""))
    (tmp_path / "nova" / "__init__.py").write_text("")
    meta = tmp_path / f"nova-{version}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nova\nVersion: {version}\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    "version,patched,ok,says",
    [
        ("34.0.0", True, True, "carries the vmthunder patch"),
        ("34.0.0", False, False, "lacks the patch in nova/conf/__init__.py, nova/compute/manager.py"),
        ("33.1.0", True, False, "Nova 33.1.0 in"),
    ],
)
def test_the_nova_patch_check_reads_the_nova_this_python_imports(tmp_path, monkeypatch, version, patched, ok, says):
    from vmthunder.nova import NOVA_VERSION, PATCH_MARKERS

    monkeypatch.syspath_prepend(fake_nova(tmp_path, version, patched))
    monkeypatch.delitem(sys.modules, "nova", raising=False)
    c = doctor.nova_check(True, PATCH_MARKERS, NOVA_VERSION)
    assert (c["ok"], c["blocking"]) == (ok, True), c
    assert says in c["detail"], c
    assert ok or "nova_patch/apply.sh" in c["fix"]


def test_without_nova_the_patch_is_not_checked_unless_nova_conf_enables_vmthunder():
    if __import__("importlib").util.find_spec("nova"):
        pytest.skip("this Python has Nova")
    assert doctor.nova_check(False, {}, "34.0.0")["ok"]
    c = doctor.nova_check(True, {}, "34.0.0")
    assert not c["ok"] and c["blocking"] and "has no Nova" in c["detail"]


class Etcd(http.server.BaseHTTPRequestHandler):
    skew_s = 0.0

    def date_time_string(self, timestamp=None):  # the Date header send_response adds
        return email.utils.formatdate(time.time() + self.skew_s, usegmt=True)

    def do_GET(self):
        body = b'{"etcdserver":"3.4.23","etcdcluster":"3.4.0"}' if self.path == "/version" else b"{}"
        self.send_response(200 if self.path == "/version" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def etcd():
    server = http.server.HTTPServer(("127.0.0.1", 0), Etcd)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()
    Etcd.skew_s = 0.0


def test_the_registry_answers_and_the_clocks_agree(etcd):
    reg, skew = doctor.registry_checks(f"etcd3+http://127.0.0.1:{etcd.server_port}?timeout=5")
    assert reg["ok"] and "3.4.23" in reg["detail"], reg
    assert skew["name"] == "clock skew" and skew["ok"], skew


def test_clock_skew_against_the_registry_is_a_warning(etcd):
    Etcd.skew_s = 30.0
    reg, skew = doctor.registry_checks(f"etcd3+http://127.0.0.1:{etcd.server_port}")
    assert reg["ok"] and not skew["ok"] and not skew["blocking"], skew
    assert "-30" in skew["detail"] or "-29" in skew["detail"], skew
    assert "chrony" in skew["fix"]


def test_an_unreachable_registry_is_a_warning_not_a_block():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    reg, skew = doctor.registry_checks(f"etcd3+http://127.0.0.1:{port}", timeout=2)
    assert not reg["ok"] and not reg["blocking"] and "does not answer" in reg["detail"], reg
    assert "origin" in reg["detail"]
    assert doctor.registry_checks(None)[0]["ok"]
    assert not doctor.registry_checks("etcd3+https://127.0.0.1:1?ca_cert=/nonexistent/ca.pem")[0]["ok"]


def test_status_output_for_people():
    st = {
        "host": "cn1",
        "cache_device": "/dev/vdb",
        "local_device_bytes": 256 << 20,
        "local_device_used_bytes": 161 << 20,
        "engine": "bcache",
        "templates": {
            "img": {
                "size_bytes": 32 << 20,
                "engine": "bcache",
                "complete": True,
                "export_iqn": "iqn.2026-11.org.vmthunder:cn1:img",
                "vms": ["vm1"],
                "paths": [
                    {"device": "8:0", "state": "A", "parent": "cn0", "portal": "198.18.0.1:3260", "read_bytes": 10 << 20},
                    {"device": "8:16", "state": "F", "parent": "origin", "portal": "198.18.0.9:3260", "read_bytes": 0},
                ],
                "cache": {"hits": 30, "misses": 10},
                "local_read_bytes": 4 << 20,
                "served": {"iqn.x:c": {"session": True, "bytes": 12 << 20}, "iqn.x:d": {"session": False, "bytes": None}},
            }
        },
        "vms": {
            "vm1": {
                "image": "img",
                "mode": "dm",
                "state": "attached",
                "cow": {"state": "valid", "used_sectors": 2048, "size_sectors": 65536},
            },
            "vm2": {"image": "img", "mode": "dm", "state": "attached", "cow": {"state": "invalid"}},
        },
    }
    out = cli.format_status(st)
    for line in (
        "template img: 32.0 MiB, bcache, complete",
        "0  cn0 198.18.0.1:3260",
        "active  read 10.0 MiB",
        "1  origin 198.18.0.9:3260",
        "FAILED",
        "cache: 30 hits, 10 misses (75 % hits)",
        "iqn.x:c  connected, served 12.0 MiB this session",
        "iqn.x:d  granted, not connected",
        "vm1  image img  dm  attached  COW 1.0 MiB of 32.0 MiB (3 %)",
        "vm2  image img  dm  attached  COW INVALID",
    ):
        assert line in out, (line, out)


def test_the_prometheus_reader_is_strict():
    good = '# HELP a_total A.\n# TYPE a_total counter\na_total{x="1",y="q\\""} 3\n# TYPE d summary\nd_sum 1.5\nd_count 2\n'
    fam = parse(good)
    assert fam["a_total"]["samples"] == [("a_total", {"x": "1", "y": 'q"'}, 3.0)]
    assert [s[0] for s in fam["d"]["samples"]] == ["d_sum", "d_count"]
    for bad in (
        "a 1",
        "a{x=1} 2\n",
        "a one\n",
        "# TYPE a counter\n# TYPE a gauge\n",
        "a 1\nb 2\na 3\n",
        "a 1\n# TYPE a counter\n",
        "# TYPE a weird\n",
    ):
        with pytest.raises(FormatError):
            parse(bad)
