"""Fixtures of the registry tests: a real etcd server per test module, and the `vmthunder.registry`
module of this checkout (the installed wheel may predate it).

They run on the host: no UML, no root needed. etcd is Debian's `etcd-server`
(`scripts/setup.sh` installs it); without the binary the etcd tests skip with the reason.
"""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import vmthunder

_SRC = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "python", "vmthunder", "registry.py"
)
# Test the checkout's registry.py (pure Python), not whatever copy the installed wheel holds:
# the wheel may predate it. Forked children (multiprocessing "fork") inherit this module.
if os.path.exists(_SRC) and "vmthunder.registry" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("vmthunder.registry", _SRC)
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["vmthunder.registry"] = _mod
    _spec.loader.exec_module(_mod)
    vmthunder.registry = _mod
import vmthunder.registry  # noqa: E402,F401

pytest.importorskip("tooz", reason="tooz not installed (pip install tooz etcd3gw)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(client_url: str) -> bool:
    try:
        with urllib.request.urlopen(client_url + "/health", timeout=1) as r:
            return b'"true"' in r.read()
    except OSError:
        return False


def etcd_argv(data_dir, client_url: str, peer_url: str, *extra: str) -> list:
    """The command line of a single-member etcd named "t" (extra: TLS files, tuning)."""
    return [
        shutil.which("etcd"),
        "--name",
        "t",
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        f"t={peer_url}",
        "--initial-cluster-state",
        "new",
        "--log-level",
        "warn",
        "--logger",
        "zap",
        *extra,
    ]


class Etcd:
    """One single-member etcd on 127.0.0.1, data in `data_dir`; stopped by PID."""

    def __init__(self, data_dir, log_path):
        self.client_port, self.peer_port = free_port(), free_port()
        self.client_url = f"http://127.0.0.1:{self.client_port}"
        self.url = f"etcd3+http://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            etcd_argv(data_dir, self.client_url, peer_url, "--snapshot-count", "10000"),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not _healthy(self.client_url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(log_path, "rb") as f:
                    tail = f.read()[-3000:].decode(errors="replace")
                pytest.fail(f"etcd did not become healthy at {self.client_url}:\n{tail}")
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # by PID, never by name
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary missing (apt-get install -y etcd-server)")
    d = tmp_path_factory.mktemp("etcd")
    srv = Etcd(d / "data", d / "etcd.log")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def etcd_url(etcd_server):
    """URL of a real, healthy etcd: "etcd3+http://127.0.0.1:<port>"."""
    if etcd_server.proc.poll() is not None:
        pytest.fail(f"etcd exited (log: {etcd_server.log_path})")
    return etcd_server.url


@pytest.fixture(params=["file", "etcd"])
def backend_url(request, tmp_path):
    """Each test that takes this runs with a file:// registry in tmp_path and with etcd."""
    if request.param == "file":
        return f"file://{tmp_path}/registry"
    return request.getfixturevalue("etcd_url")


def pytest_report_header(config):
    return f"vmthunder.registry from {vmthunder.registry.__file__}; python {sys.version.split()[0]}"
