"""Self-test of the UML kernel-test harness (lab)."""

import os
import subprocess
import sys
import threading
import time

import pytest

from lab import IQN_PREFIX, CommandTimeout, Fleet, HarnessError, NodeDead, uml_available

_OK, _REASON = uml_available()
needs_uml = pytest.mark.skipif(not _OK, reason=f"UML nodes cannot run here: {_REASON}")
pytestmark = [pytest.mark.kernel]

TAG = f"th{os.getpid()}"  # unique per pytest process: concurrent sessions do not collide
DISK_B = 64 * 2**20

# guest-side throughput probe: receiver prints how fast the bytes arrived
_RECV = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); n = 0; t = None
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    t = t or time.time()
    n += len(d)
print("BYTES %d SECS %.3f" % (n, time.time() - t))
"""
_SEND = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for _ in range(int(sys.argv[3])):
    c.sendall(b"x" * (1 << 20))
c.close()
"""


def _ping(src, dst_ip, count=2):
    rc, out = src.run(f"busybox ping -c {count} -W 2 {dst_ip}", timeout=30)
    return rc, out


def _leftovers(fleet_info):
    """What a torn-down fleet might have left behind on the host."""
    found = []
    ns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if fleet_info["netns"] in ns_list.split():
        found.append(f"netns {fleet_info['netns']}")
    for pid in fleet_info["pids"]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"linux.uml" in f.read():
                    found.append(f"process {pid}")
        except OSError:
            pass
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found += [
        f"process: {line.strip()[:100]}" for line in ps.splitlines() if "linux.uml" in line and fleet_info["workdir"] in line
    ]
    with open("/proc/self/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f if fleet_info["workdir"] in line]
    if os.path.exists(fleet_info["workdir"]):
        found.append(f"dir {fleet_info['workdir']}")
    return found


def _info(fleet):
    return {"netns": fleet.netns, "workdir": fleet.workdir, "pids": [n.pid for n in fleet if n.pid]}


# ------------------------------------------------------------------ no UML needed


def test_subnet_must_be_in_benchmark_range():
    with pytest.raises(HarnessError, match="198.18.0.0/15"):
        Fleet(nodes=["a"], name=TAG, subnet="10.1.2.0/24")
    with pytest.raises(HarnessError, match="198.18.0.0/15"):
        Fleet(nodes=["a"], name=TAG, subnet="198.20.0.0/24")
    with pytest.raises(HarnessError, match="too small"):
        Fleet(nodes=["a", "b", "c"], name=TAG, subnet="198.19.0.0/30")
    with pytest.raises(HarnessError):
        Fleet(nodes=["A b"], name=TAG)
    with pytest.raises(HarnessError, match="bad disk name"):
        Fleet(nodes={"a": {"disks": {"sda": 1}}}, name=TAG)
    with pytest.raises(HarnessError, match="unknown keys"):
        Fleet(nodes={"a": {"disk": {}}}, name=TAG)
    f = Fleet(nodes=["a", "b"], name=TAG, subnet="198.19.255.0/24")
    assert [n.ip for n in f] == ["198.19.255.1", "198.19.255.2"]
    assert f["b"].initiator_iqn == f"{IQN_PREFIX}:{TAG}-b"
    assert f.netns == f"vmt-{TAG}"


# ------------------------------------------------------------------ one fleet for most tests


@pytest.fixture(scope="module")
def fleet():
    if not _OK:
        pytest.skip(f"UML nodes cannot run here: {_REASON}")
    t0 = time.monotonic()
    with Fleet(
        nodes={"a": {"disks": {"ubdb": DISK_B, "ubdc": "16M"}}, "b": {}}, name=TAG, mem="256M", subnet="198.18.7.0/24"
    ) as f:
        print(f"\nfleet booted in {time.monotonic() - t0:.1f}s ({', '.join(f'{n.name}: {n.boot_seconds:.1f}s' for n in f)})")
        yield f
    left = _leftovers(_info(f))
    assert not left, f"teardown left: {left}"


@needs_uml
def test_nodes_identity(fleet):
    a, b = fleet["a"], fleet["b"]
    assert (a.ip, b.ip) == ("198.18.7.1", "198.18.7.2")
    assert a.initiator_iqn != b.initiator_iqn
    out = a.check(
        "hostname; cat /etc/iscsi/initiatorname.iscsi; ip -4 -br addr show vec0; "
        "blockdev --getsize64 /dev/ubdb /dev/ubdc; uname -r"
    )
    lines = out.splitlines()
    assert lines[0] == f"{TAG}-a"
    assert lines[1] == f"InitiatorName={a.initiator_iqn}"
    assert "198.18.7.1/24" in lines[2]
    assert lines[3:5] == [str(DISK_B), str(16 * 2**20)]
    assert os.path.getsize(a.disk_path("ubdb")) == DISK_B
    with pytest.raises(HarnessError):
        b.disk_path("ubdb")
    mods = a.check("lsmod")
    for m in ("dm_mod", "dm_cache", "dm_snapshot", "dm_multipath", "target_core_mod", "iscsi_target_mod", "iscsi_tcp", "sd_mod"):
        assert m in mods, f"module {m} not loaded:\n{mods}"
    env = a.check("echo $DM_DISABLE_UDEV $HOME; test -d /etc/target; mount")
    assert env.startswith("1 /root\n")
    for mnt in (" /sys/kernel/config ", " /vmt-share ", " /dev/pts "):
        assert mnt in env
    assert "iscsid" in a.check("ps -eo args")


@needs_uml
def test_run_returns_rc_and_output(fleet):
    a = fleet["a"]
    assert a.run("echo hello; echo err >&2; exit 3") == (3, "hello\nerr\n")
    assert a.run("true") == (0, "")
    rc, out = a.run("printf 'x\\r\\ny\\n'; ls /nonexistent")
    assert rc != 0 and out.startswith("x\ny\n") and "\r" not in out
    assert a.check("echo ok") == "ok\n"
    with pytest.raises(HarnessError, match="rc=7"):
        a.check("echo boom; exit 7")
    # bash is available too
    assert a.check("echo ${BASH_VERSION:+bash}; set -o pipefail", shell="/bin/bash") == "bash\n"


@needs_uml
def test_ping_between_nodes(fleet):
    a, b = fleet["a"], fleet["b"]
    rc, out = _ping(a, b.ip)
    assert rc == 0, out
    rc, out = _ping(b, a.ip)
    assert rc == 0, out


@needs_uml
def test_concurrent_runs_from_threads(fleet):
    """Commands sent from several threads run at the same time on each node: their intervals,
    measured by the node's own clock, overlap (no wall-clock threshold: a loaded host only
    stretches them)."""
    results, errors = {}, []

    def worker(node, i):
        try:
            results[(node.name, i)] = node.run(
                f"s=$(date +%s.%N); sleep 1; e=$(date +%s.%N); echo $(hostname) {i} $s $e", timeout=60
            )
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n, i)) for n in fleet for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 6
    spans = {}
    for (name, i), (rc, out) in results.items():
        host, idx, start, end = out.split()
        assert (rc, host, idx) == (0, f"{TAG}-{name}", str(i))
        spans.setdefault(name, []).append((float(start), float(end)))
    for name, iv in spans.items():
        assert max(s for s, _ in iv) < min(e for _, e in iv), f"{name}: the 3 commands did not overlap: {iv}"


@needs_uml
def test_spawn_poll_timeout(fleet):
    a = fleet["a"]
    p = a.spawn("echo started; sleep 3; echo finished; exit 5")
    time.sleep(0.5)
    assert p.poll() is None
    assert a.check("echo meanwhile") == "meanwhile\n"  # the node is not blocked
    assert p.wait(30) == (5, "started\nfinished\n")
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as ei:
        a.run("echo begin; sleep 60; echo never", timeout=2)
    assert time.monotonic() - t0 < 5
    assert ei.value.output == "begin\n"
    deadline = time.monotonic() + 10
    while "sleep 60" in a.check("ps -eo args") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "sleep 60" not in a.check("ps -eo args"), "timed-out command still running"
    p = a.spawn("sleep 60")
    p.kill()
    rc, _ = p.wait(10)
    assert rc == 143


@needs_uml
def test_files_and_python_in_guest(fleet):
    a = fleet["a"]
    gpath = a.write_file("sub/data.bin", b"\x00\x01binary" * 1000)
    assert gpath == "/vmt-share/sub/data.bin"
    assert a.check(f"md5sum < {gpath}").split()[0] == __import__("hashlib").md5(b"\x00\x01binary" * 1000).hexdigest()
    a.write_file("sub/data.bin", b"second version")  # rewritten: no stale guest cache
    assert a.check(f"cat {gpath}") == "second version"
    a.check("echo from-guest > /vmt-share/out.txt")
    assert a.read_file("out.txt") == b"from-guest\n"
    # the host's python and its site-packages work inside the guest
    out = a.check("python3 -c 'import sys, pytest; print(sys.version); print(pytest.__file__)'", timeout=120)
    version, pytest_file = out.splitlines()
    assert version == sys.version
    assert pytest_file == pytest.__file__
    with pytest.raises(HarnessError):
        a.write_file("../escape", b"")


@needs_uml
def test_nic_counters(fleet):
    a, b = fleet["a"], fleet["b"]
    tx0, rx0 = a.tx_bytes(), a.rx_bytes()
    assert _ping(a, b.ip, count=3)[0] == 0
    assert a.tx_bytes() >= tx0 + 3 * 84
    assert a.rx_bytes() >= rx0 + 3 * 84


@needs_uml
def test_kill_makes_node_unreachable_and_restart(fleet):
    a, b = fleet["a"], fleet["b"]
    pid = b.pid
    p = b.spawn("sleep 60")
    b.kill()
    assert not b.alive()
    assert not os.path.exists(f"/proc/{pid}") or b"linux.uml" not in open(f"/proc/{pid}/cmdline", "rb").read()
    with pytest.raises(NodeDead):
        p.wait(5)
    with pytest.raises(NodeDead):
        b.run("true")
    rc, out = _ping(a, b.ip, count=2)
    assert rc != 0, f"killed node still answers ping:\n{out}"
    b.restart(timeout=60)
    assert b.pid != pid
    assert _ping(a, b.ip)[0] == 0
    assert b.check("hostname") == f"{TAG}-b\n"


# ------------------------------------------------------------------ teardown, shaping


@needs_uml
def test_shaping_and_teardown_leave_nothing():
    info = None
    with pytest.raises(RuntimeError, match="inside the with block"):
        with Fleet(nodes={"x": {"rate": "20mbit"}, "y": {}}, name=f"{TAG}s", mem="256M", subnet="198.18.8.0/24") as f:
            info = _info(f)
            x, y = f["x"], f["y"]
            for n in (x, y):
                n.write_file("recv.py", _RECV)
                n.write_file("send.py", _SEND)
            for src, dst, port in ((x, y, 5001), (y, x, 5002)):  # x upload, x download
                recv = dst.spawn(f"python3 /vmt-share/recv.py {port}")
                deadline = time.monotonic() + 60
                while "listening" not in recv.output() and time.monotonic() < deadline:
                    time.sleep(0.1)
                src.check(f"python3 /vmt-share/send.py {dst.ip} {port} 4", timeout=120)
                out = recv.wait(60)[1].split()
                nbytes, secs = int(out[-3]), float(out[-1])
                mbit = nbytes * 8 / secs / 1e6
                print(f"\n{src.name}->{dst.name}: {mbit:.1f} Mbit/s (limit 20 on x)")
                assert nbytes == 4 * 2**20
                assert 10 < mbit < 24, f"{src.name}->{dst.name}: {mbit:.1f} Mbit/s"
            x.kill()  # a dead node must not disturb teardown
            raise RuntimeError("inside the with block")
    assert info is not None
    left = _leftovers(info)
    assert not left, f"teardown left: {left}"


@needs_uml
def test_boot_failure_reports_console_and_cleans_up():
    f = Fleet(nodes=["z"], name=f"{TAG}f", mem="128M", subnet="198.18.9.0/24", boot_timeout=0.3)
    with pytest.raises(HarnessError, match="not ready within") as ei:
        f.start()
    msg = str(ei.value)
    assert "--- console tail" in msg and len(msg.split("---")[-1].strip()) > 0, msg
    left = _leftovers({"netns": f.netns, "workdir": f.workdir, "pids": [f["z"].pid]})
    assert not left, f"failed boot left: {left}"


@needs_uml
def test_host_service_is_reachable_from_nodes_and_stopped_at_teardown(tmp_path):
    """A native process in the fleet's namespace (how the fleet bench runs etcd) answers the
    nodes at host_ip, the nodes keep their addresses, and close() ends it by PID."""
    (tmp_path / "hello.txt").write_text("from the host side\n")
    with Fleet(nodes=["x"], name=f"{TAG}h", mem="256M", subnet="198.18.9.0/24") as f:
        info = _info(f)
        assert f["x"].ip == "198.18.9.1" and f.host_ip == "198.18.9.254"
        proc = f.host_service(
            "web", [sys.executable, "-m", "http.server", "--bind", f.host_ip, "--directory", str(tmp_path), "8000"]
        )
        with pytest.raises(HarnessError, match="duplicate"):
            f.host_service("web", ["true"])
        code = f"import urllib.request; print(urllib.request.urlopen('http://{f.host_ip}:8000/hello.txt', timeout=3).read().decode())"
        out = ""
        for _ in range(50):  # the server needs a moment to bind
            rc, out = f["x"].run(f'python3 -c "{code}"', timeout=30)
            if rc == 0:
                break
            time.sleep(0.2)
        assert "from the host side" in out, out
    assert proc.poll() is not None, "host service still running after teardown"
    left = _leftovers(info)
    assert not left, f"teardown left: {left}"
