"""One UML node: process launch, console command protocol, guest processes, kill/halt."""

from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import threading
import time
import zlib
from typing import Dict, Optional, Tuple

from ._util import CommandTimeout, HarnessError, NodeDead, kill_uml_group, killpg_uml, log, parse_size, uml_binary, uml_group_pids

GUEST_SHARE = "/vmt-share"
GUEST_NIC = "vec0"
_RESERVED = {"env.sh", "ready", "cmd"}


def _ubd_index(name: str) -> int:
    if len(name) != 4 or not name.startswith("ubd") or not "a" <= name[3] <= "p":
        raise HarnessError(f"bad disk name {name!r}: use ubda .. ubdp (ubdb is the usual first)")
    return ord(name[3]) - ord("a")


class GuestProcess:
    """A script running in the background inside a guest (see UmlNode.spawn)."""

    def __init__(self, node: "UmlNode", cid: int, script: str):
        self.node = node
        self.id = cid
        self.script = script
        base = os.path.join(node.cmd_dir, str(cid))
        self._rc_path = base + ".rc"
        self._out_path = base + ".out"
        self._rc: Optional[int] = None

    def __repr__(self):
        return f"<GuestProcess {self.node.name}#{self.id} rc={self._rc}>"

    def output(self) -> str:
        """Output so far (stdout and stderr interleaved)."""
        try:
            with open(self._out_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace").replace("\r\n", "\n")

    def poll(self) -> Optional[int]:
        """Exit status if finished, else None."""
        if self._rc is None:
            try:
                with open(self._rc_path) as f:
                    text = f.read().strip()
            except FileNotFoundError:
                return None
            self._rc = int(text) if text.lstrip("-").isdigit() else 255
        return self._rc

    def wait(self, timeout: float = 60.0) -> Tuple[int, str]:
        """Wait for the script; returns (rc, output).  On timeout the guest script is killed
        and CommandTimeout is raised; if the node dies, NodeDead is raised."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            rc = self.poll()
            if rc is not None:
                return rc, self.output()
            if not self.node.alive():
                raise NodeDead(
                    f"node {self.node.name} died while running command #{self.id}"
                    f"\n--- output so far ---\n{self.output()}"
                    f"\n--- console tail ---\n{self.node.console_tail(15)}"
                )
            if time.monotonic() >= deadline:
                self.kill()
                out = self.output()
                raise CommandTimeout(
                    f"node {self.node.name}: command #{self.id} still running after {timeout}s "
                    f"(killed)\n--- script ---\n{self.script}\n--- output so far ---\n{out}",
                    out,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    def kill(self) -> None:
        """SIGTERM (then SIGKILL after 2 s) the script's whole session inside the guest."""
        if self.poll() is None and self.node.alive():
            self.node._send(f"kill {self.id}")


class UmlNode:
    """A UML guest.  Created and booted by Fleet; use fleet["name"]."""

    def __init__(self, fleet, name: str, index: int, ip: str, prefixlen: int, mem: str, disks: Dict[str, object], rate=None):
        self.fleet = fleet
        self.name = name
        self.index = index
        self.ip = ip
        self.prefixlen = prefixlen
        self.mem = mem
        self.rate = rate
        self.hostname = f"{fleet.name}-{name}"
        # iSCSI names: lowercase letters, digits, '-', '.', ':' only
        self.initiator_iqn = f"{fleet.iqn_prefix}:{fleet.name.lower().replace('_', '-')}-{name}"
        self.tap = f"tap{index}"
        h = zlib.crc32(fleet.name.encode()).to_bytes(4, "big")
        self.mac = f"02:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}:{h[3]:02x}:{index:02x}"
        self.dir = os.path.join(fleet.workdir, "nodes", name)
        self.share_dir = os.path.join(self.dir, "share")
        self.cmd_dir = os.path.join(self.share_dir, "cmd")
        self.console_path = os.path.join(self.dir, "console.log")
        self.fifo_path = os.path.join(self.dir, "console.fifo")
        self.pid_path = os.path.join(self.dir, "pid")
        for dname in disks:
            _ubd_index(dname)
        self._disk_specs = disks
        self._disks: Dict[str, str] = {}
        self._proc: Optional[subprocess.Popen] = None
        self._fifo_w: Optional[int] = None
        self._lock = threading.RLock()  # RLock: halt may be sent from a signal handler
        self._seq = 0
        self.boot_seconds: Optional[float] = None
        self._t_launch = 0.0

    def __repr__(self):
        return f"<UmlNode {self.name} ip={self.ip} pid={self.pid}>"

    # ------------------------------------------------------------------ properties
    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def disk_path(self, name: str) -> str:
        """Host path of the backing file of guest disk NAME (e.g. 'ubdb' -> /dev/ubdb)."""
        try:
            return self._disks[name]
        except KeyError:
            raise HarnessError(
                f"node {self.name} has no disk {name!r} (has: {', '.join(sorted(self._disks)) or 'none'})"
            ) from None

    @property
    def disks(self) -> Dict[str, str]:
        return dict(self._disks)

    def _dead(self, what: str) -> NodeDead:
        """NodeDead for this node, with how the UML process ended and its last console lines
        (a node that died between two commands otherwise leaves no clue in a test's report)."""
        rc = self._proc.poll() if self._proc is not None else None
        how = "" if rc is None else (f" (exit status {rc})" if rc >= 0 else f" (killed by signal {-rc})")
        return NodeDead(f"node {self.name} {what}{how}\n--- console tail ---\n{self.console_tail(25)}")

    def console_tail(self, lines: int = 40) -> str:
        try:
            with open(self.console_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                data = f.read()
        except OSError:
            return "(no console log)"
        text = data.decode("utf-8", "replace").replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ setup / launch
    def _prepare(self, guest_env: Dict[str, str]) -> None:
        os.makedirs(self.cmd_dir, exist_ok=True)
        os.makedirs(os.path.join(self.dir, "disks"), exist_ok=True)
        for dname, spec in sorted(self._disk_specs.items()):
            _ubd_index(dname)
            if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.startswith("/")):
                path = os.path.abspath(os.fspath(spec))
                if not os.path.isfile(path):
                    raise HarnessError(f"node {self.name}: disk image {path} does not exist")
            else:
                path = os.path.join(self.dir, "disks", f"{dname}.img")
                with open(path, "wb") as f:
                    f.truncate(parse_size(spec))  # sparse
            self._disks[dname] = path
        with open(os.path.join(self.share_dir, "env.sh"), "w") as f:
            for k, v in guest_env.items():
                f.write(f"export {k}={shlex.quote(v)}\n")

    def _cmdline(self) -> list:
        f = self.fleet
        args = [
            f"mem={self.mem}",
            "root=/dev/root",
            "rootfstype=hostfs",
            "rootflags=/",
            "ro",
            f"init={f.init_path}",
            "con=null",
            "con0=fd:0,fd:1",
            "ssl=null",
            f"uml_dir={f.uml_dir}",
            f"umid={f.name}-{self.name}",
        ]
        for dname, path in sorted(self._disks.items()):
            args.append(f"ubd{_ubd_index(dname)}={path}")
        # gro=1 is REQUIRED with the vector tap transport (see notes: without it the tap's GSO
        # super-frames are dropped by MTU-sized guest buffers and bulk TCP transfers hang).
        args.append(f"{GUEST_NIC}:transport=tap,ifname={self.tap},gro=1")
        args += [
            f"vmt_node={self.name}",
            f"vmt_host={self.hostname}",
            f"vmt_ip={self.ip}/{self.prefixlen}",
            f"vmt_if={GUEST_NIC}",
            f"vmt_share={self.share_dir}",
            f"vmt_iqn={self.initiator_iqn}",
            f"vmt_mac={self.mac}",
        ]
        return args

    def _launch(self) -> None:
        """Start the UML process (does not wait for boot)."""
        if self.alive():
            raise HarnessError(f"node {self.name} is already running")
        self._close_fifo()
        for p in (self.fifo_path, os.path.join(self.share_dir, "ready")):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        os.mkfifo(self.fifo_path, 0o600)
        # The guest console reads a FIFO.  UML gets a read-only end; the harness keeps the only
        # write end, so if this Python process dies the guest sees EOF and powers itself off.
        rw = os.open(self.fifo_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            rd = os.open(self.fifo_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            self._fifo_w = os.open(self.fifo_path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        finally:
            os.close(rw)
        os.set_blocking(rd, True)
        env = dict(os.environ, TMPDIR=self.fleet.shm_dir)  # guest RAM file goes to our tmpfs
        argv = ["ip", "netns", "exec", self.fleet.netns, uml_binary(), *self._cmdline()]
        log.debug("node %s: %s", self.name, " ".join(argv))
        try:
            with open(self.console_path, "ab") as console:
                self._t_launch = time.monotonic()
                self._proc = subprocess.Popen(
                    argv,
                    stdin=rd,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.dir,
                    start_new_session=True,
                    close_fds=True,
                )
        finally:
            os.close(rd)
        with open(self.pid_path, "w") as f:
            f.write(f"{self._proc.pid}\n")
        log.info(
            "node %s: launched UML pid %d (ip %s, mem %s, disks %s)",
            self.name,
            self._proc.pid,
            self.ip,
            self.mem,
            ",".join(sorted(self._disks)) or "-",
        )

    def _boot_status(self) -> Optional[str]:
        """None while booting, 'ready', or an error text."""
        if os.path.exists(os.path.join(self.share_dir, "ready")):
            if self.boot_seconds is None:
                self.boot_seconds = time.monotonic() - self._t_launch
            return "ready"
        if not self.alive():
            return f"UML process exited with status {self._proc.returncode if self._proc else '?'}"
        return None

    def restart(self, timeout: float = 60.0) -> None:
        """Boot the node again (after kill() or halt()) with the same disks and share."""
        if self.alive():
            raise HarnessError(f"node {self.name} is still running")
        self.boot_seconds = None
        self._launch()
        deadline = time.monotonic() + timeout
        while True:
            st = self._boot_status()
            if st == "ready":
                log.info("node %s: rebooted in %.1fs", self.name, self.boot_seconds)
                return
            if st is not None or time.monotonic() >= deadline:
                self.kill()
                raise HarnessError(
                    f"node {self.name} did not boot: {st or 'timeout'}\n--- console tail ---\n{self.console_tail()}"
                )
            time.sleep(0.05)

    # ------------------------------------------------------------------ commands
    def _send(self, line: str) -> None:
        data = (line + "\n").encode()
        with self._lock:
            if self._fifo_w is None or not self.alive():
                raise self._dead("is not running")
            deadline = time.monotonic() + 10
            while True:
                try:
                    os.write(self._fifo_w, data)  # < PIPE_BUF: atomic
                    return
                except OSError as e:
                    if e.errno != errno.EAGAIN:
                        raise NodeDead(f"node {self.name}: console write failed: {e}") from e
                if time.monotonic() >= deadline or not self.alive():
                    raise NodeDead(f"node {self.name}: console not draining")
                time.sleep(0.05)

    def spawn(self, script: str, shell: str = "/bin/sh") -> GuestProcess:
        """Start SCRIPT (shell text) in the background in the guest; returns a GuestProcess."""
        if not self.alive():
            raise self._dead("is not running")
        with self._lock:
            self._seq += 1
            cid = self._seq
        path = os.path.join(self.cmd_dir, f"{cid}.sh")
        if shell != "/bin/sh":
            body = path[:-3] + ".body"
            with open(body, "w") as f:
                f.write(script)
            text = f"exec {shell} {GUEST_SHARE}/cmd/{cid}.body\n"
        else:
            text = script if script.endswith("\n") else script + "\n"
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, path)
        proc = GuestProcess(self, cid, script)
        self._send(f"run {cid}")
        log.debug("node %s: #%d started: %s", self.name, cid, script.strip().splitlines()[:1])
        return proc

    def run(self, script: str, timeout: float = 60.0, shell: str = "/bin/sh") -> Tuple[int, str]:
        """Run SCRIPT in the guest; returns (exit status, output).  Thread-safe."""
        t0 = time.monotonic()
        proc = self.spawn(script, shell=shell)
        rc, out = proc.wait(timeout)
        log.debug("node %s: #%d rc=%d in %.2fs", self.name, proc.id, rc, time.monotonic() - t0)
        return rc, out

    def check(self, script: str, timeout: float = 60.0, shell: str = "/bin/sh") -> str:
        """Like run(), but raises HarnessError (with the output) if the exit status is not 0."""
        rc, out = self.run(script, timeout=timeout, shell=shell)
        if rc != 0:
            raise HarnessError(
                f"node {self.name}: command failed with rc={rc}\n--- script ---\n{script.strip()}\n--- output ---\n{out}"
            )
        return out

    # ------------------------------------------------------------------ files in the share
    def _share_path(self, name: str) -> str:
        norm = os.path.normpath(name)
        if norm.startswith(("/", "..")) or norm.split("/")[0] in _RESERVED:
            raise HarnessError(f"bad share file name {name!r}")
        return os.path.join(self.share_dir, norm)

    def write_file(self, name: str, data, mode: int = 0o644) -> str:
        """Write DATA (bytes or str) to the node's share dir; returns the path in the guest.
        The file is replaced by rename (a new inode), so the guest never sees stale cached data."""
        path = self._share_path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        tmp = f"{path}.vmt-tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
        return f"{GUEST_SHARE}/{os.path.relpath(path, self.share_dir)}"

    def read_file(self, name: str) -> bytes:
        """Read a file the guest wrote under /vmt-share (hostfs writes go straight through)."""
        with open(self._share_path(name), "rb") as f:
            return f.read()

    def host_path(self, name: str) -> str:
        """Host path of /vmt-share/NAME."""
        return self._share_path(name)

    # ------------------------------------------------------------------ network
    def _nic_counter(self, which: str) -> int:
        out = self.check(f"cat /sys/class/net/{GUEST_NIC}/statistics/{which}", timeout=30)
        return int(out.strip())

    def tx_bytes(self) -> int:
        """Bytes sent by the guest NIC (guest view)."""
        return self._nic_counter("tx_bytes")

    def rx_bytes(self) -> int:
        """Bytes received by the guest NIC (guest view)."""
        return self._nic_counter("rx_bytes")

    def shape(self, rate) -> None:
        """Limit this node's link to RATE ('100mbit', bits/s int) in both directions; None = off."""
        self.fleet.network.shape(self.index, rate)
        self.rate = rate

    # ------------------------------------------------------------------ stop
    def kill(self) -> None:
        """Kill the UML process group with SIGKILL (simulates sudden node death)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._close_fifo()
            return
        log.info("node %s: killing UML process group %d", self.name, proc.pid)
        killpg_uml(proc.pid, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("node %s: pid %d did not die after SIGKILL", self.name, proc.pid)
        self._close_fifo()

    def halt(self, timeout: float = 10.0) -> None:
        """Power off cleanly (console 'halt'); kill the process group if it takes too long."""
        self._request_halt()
        self._finish_halt(time.monotonic() + timeout)

    def _request_halt(self) -> None:
        if self.alive():
            try:
                self._send("halt")
            except HarnessError:
                pass

    def _finish_halt(self, deadline: float) -> None:
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
                log.debug("node %s: powered off (status %s)", self.name, proc.returncode)
            except subprocess.TimeoutExpired:
                log.warning("node %s: no power-off after halt; killing process group %d", self.name, proc.pid)
                kill_uml_group(proc.pid, grace=1.0)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    log.error("node %s: pid %d survives SIGKILL", self.name, proc.pid)
            # helper processes of the group may outlive the main one for a moment
            for p in uml_group_pids(proc.pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._close_fifo()
        try:
            os.unlink(self.pid_path)
        except FileNotFoundError:
            pass

    def _close_fifo(self) -> None:
        with self._lock:
            if self._fifo_w is not None:
                try:
                    os.close(self._fifo_w)
                except OSError:
                    pass
                self._fifo_w = None
