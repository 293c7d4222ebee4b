"""Fleet: a set of UML nodes on a private bridge in their own network namespace."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import Dict, Iterator, Optional

from ._net import FleetNetwork, validate_subnet
from ._node import UmlNode
from ._util import (
    DEFAULT_WORKROOT,
    STATE_FILE,
    HarnessError,
    is_mountpoint,
    is_our_uml,
    kill_uml_group,
    log,
    netns_exists,
    parse_size,
    pid_alive,
    pid_cmdline,
    sh,
    uml_available,
    uml_group_pids,
    umount,
)

IQN_PREFIX = "iqn.2026-11.org.vmthunder.test"
INIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest_init.sh")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,19}")
_NODE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,15}")
_PATH_RE = re.compile(r"/[A-Za-z0-9._/+-]*")  # must survive the UML/kernel command line
_NODE_KEYS = {"disks", "mem", "rate"}

_live_fleets: "weakref.WeakSet[Fleet]" = weakref.WeakSet()
_hooks_lock = threading.Lock()
_hooks_installed = False
_prev_sigterm = None


def _close_all_live(*_):
    for fleet in list(_live_fleets):
        try:
            fleet.close()
        except Exception:  # pragma: no cover - best effort at exit
            log.exception("teardown of fleet %s failed", fleet.name)


def _on_sigterm(signum, frame):
    _close_all_live()
    prev = _prev_sigterm
    if callable(prev):
        prev(signum, frame)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _install_exit_hooks() -> None:
    global _hooks_installed, _prev_sigterm
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        atexit.register(_close_all_live)
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGTERM)
            if prev in (signal.SIG_DFL, None) or callable(prev):
                _prev_sigterm = prev if callable(prev) else None
                signal.signal(signal.SIGTERM, _on_sigterm)


class Fleet:
    """Boot a set of UML nodes; use as a context manager.

    nodes:   {"a": {"disks": {"ubdb": 512 * 2**20}, "mem": "256M", "rate": "100mbit"}, ...}
             (or a list of names).  Disk values: a size (bytes or "512M") for a new sparse file,
             or an absolute path (str or Path) of an existing image file (used in place).  Nodes get addresses in order.
    name:    fleet name; netns "vmt-<name>", workdir /tmp/vmt-uml/<name>, IQNs ...:<name>-<node>
    mem:     default guest RAM per node
    subnet:  IPv4 subnet inside 198.18.0.0/15
    rate:    default link limit per node in each direction (tc tbf on the host), None = unlimited
    env:     extra environment variables for guest commands
    keep_workdir: keep console logs etc. after teardown (also: env VMT_KEEP_WORKDIR=1)
    """

    def __init__(
        self,
        nodes,
        name: str = "vmt",
        mem: str = "384M",
        subnet: str = "198.18.7.0/24",
        workdir: Optional[str] = None,
        rate=None,
        env: Optional[Dict[str, str]] = None,
        boot_timeout: float = 60.0,
        halt_timeout: float = 10.0,
        keep_workdir: Optional[bool] = None,
    ):
        if not _NAME_RE.fullmatch(name):
            raise HarnessError(f"bad fleet name {name!r} (letters, digits, _ and -; max 20)")
        if isinstance(nodes, (list, tuple)):
            nodes = {n: {} for n in nodes}
        if not nodes:
            raise HarnessError("a fleet needs at least one node")
        self.name = name
        self.netns = f"vmt-{name}"
        self.iqn_prefix = IQN_PREFIX
        self.workdir = os.path.abspath(workdir or os.path.join(DEFAULT_WORKROOT, name))
        if not _PATH_RE.fullmatch(self.workdir) or self.workdir in ("/", "/tmp"):
            raise HarnessError(f"bad workdir {self.workdir!r} (plain path characters only)")
        self.shm_dir = os.path.join(self.workdir, "shm")
        self.uml_dir = os.path.join(self.workdir, "uml")
        self.init_path = os.path.join(self.workdir, "guest_init.sh")
        self.mem = mem
        self.rate = rate
        self.boot_timeout = boot_timeout
        self.halt_timeout = halt_timeout
        if keep_workdir is None:
            keep_workdir = os.environ.get("VMT_KEEP_WORKDIR", "") not in ("", "0")
        self.keep_workdir = keep_workdir
        self.network = FleetNetwork(self.netns)
        self.subnet = validate_subnet(subnet, len(nodes) + 1)
        # The host side of the bridge (host services such as a control plane's etcd): the
        # subnet's last address, so node addresses stay the same as without it.
        self.host_ip = str(self.subnet.broadcast_address - 1)
        self._services: Dict[str, subprocess.Popen] = {}
        hosts = self.subnet.hosts()
        self.nodes: Dict[str, UmlNode] = {}
        for index, (nname, spec) in enumerate(nodes.items()):
            spec = dict(spec or {})
            if not _NODE_RE.fullmatch(nname):
                raise HarnessError(f"bad node name {nname!r} (lowercase letters, digits, -)")
            unknown = set(spec) - _NODE_KEYS
            if unknown:
                raise HarnessError(f"node {nname}: unknown keys {sorted(unknown)}")
            parse_size(spec.get("mem", mem))
            self.nodes[nname] = UmlNode(
                self,
                nname,
                index,
                str(next(hosts)),
                self.subnet.prefixlen,
                spec.get("mem", mem),
                dict(spec.get("disks") or {}),
                spec.get("rate", rate),
            )
        self.guest_env = self._guest_env(env)
        self._started = False
        self._closed = False
        self._close_lock = threading.RLock()  # RLock: close() may run in a signal handler
        self.boot_seconds: Optional[float] = None

    # ------------------------------------------------------------------ access
    def __getitem__(self, name: str) -> UmlNode:
        return self.nodes[name]

    def __iter__(self) -> Iterator[UmlNode]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self):
        return f"<Fleet {self.name} nodes={list(self.nodes)} netns={self.netns}>"

    @staticmethod
    def _guest_env(extra) -> Dict[str, str]:
        pybin = os.path.dirname(sys.executable) if sys.executable else ""
        path = ":".join(p for p in [pybin, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] if p)
        env = {
            "PATH": path,
            "HOME": "/root",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "DM_DISABLE_UDEV": "1",
            "LC_ALL": "C.UTF-8",
        }
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        for k, v in (extra or {}).items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise HarnessError(f"bad environment variable name {k!r}")
            env[k] = str(v)
        return env

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Fleet":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def _write_state(self) -> None:
        state = {
            "name": self.name,
            "netns": self.netns,
            "shm": self.shm_dir,
            "owner_pid": os.getpid(),
            "nodes": {n.name: {"pid": n.pid, "ip": n.ip} for n in self},
            "services": {name: {"pid": p.pid, "argv0": p.args[4]} for name, p in self._services.items()},
        }
        tmp = os.path.join(self.workdir, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.rename(tmp, os.path.join(self.workdir, STATE_FILE))

    def start(self) -> None:
        if self._started:
            raise HarnessError("fleet already started")
        ok, reason = uml_available()
        if not ok:
            raise HarnessError(f"UML cannot run here: {reason}")
        self._started = True
        t0 = time.monotonic()
        if os.path.isdir(self.workdir):
            log.warning("fleet %s: removing leftovers in %s", self.name, self.workdir)
            if not cleanup_workdir(self.workdir) or os.path.exists(self.workdir):
                self._started = False
                raise HarnessError(
                    f"cannot clean up workdir {self.workdir} (in use by another process, or not a harness workdir)"
                )
        _live_fleets.add(self)
        _install_exit_hooks()
        try:
            os.makedirs(self.workdir)
            self._write_state()  # from here on, "cleanup" can undo what follows
            os.makedirs(self.shm_dir)
            os.makedirs(self.uml_dir)
            shm_size = sum(parse_size(n.mem) for n in self) + 256 * 2**20
            sh(["mount", "-t", "tmpfs", "-o", f"size={shm_size},mode=1777", f"vmt-shm-{self.name}", self.shm_dir])
            shutil.copyfile(INIT_SCRIPT, self.init_path)
            os.chmod(self.init_path, 0o755)
            self.network.create()
            for node in self:
                self.network.add_tap(node.tap)
                if node.rate is not None:
                    self.network.shape(node.index, node.rate)
                node._prepare(self.guest_env)
            for node in self:
                node._launch()
            self._write_state()
            self._wait_booted(t0)
        except BaseException:
            self.close()
            raise

    def _wait_booted(self, t0: float) -> None:
        deadline = time.monotonic() + self.boot_timeout
        pending = list(self)
        while pending:
            for node in list(pending):
                st = node._boot_status()
                if st == "ready":
                    pending.remove(node)
                    log.info("node %s: ready after %.1fs", node.name, node.boot_seconds)
                elif st is not None:
                    raise HarnessError(
                        f"node {node.name} failed to boot: {st}\n"
                        f"--- console tail ({node.console_path}) ---\n"
                        f"{node.console_tail()}"
                    )
            if not pending:
                break
            if time.monotonic() >= deadline:
                node = pending[0]
                raise HarnessError(
                    f"node {node.name} not ready within {self.boot_timeout}s\n"
                    f"--- console tail ({node.console_path}) ---\n"
                    f"{node.console_tail()}"
                )
            time.sleep(0.05)
        self.boot_seconds = time.monotonic() - t0
        log.info("fleet %s: %d node(s) up in %.1fs", self.name, len(self), self.boot_seconds)

    def host_service(self, name: str, argv, log_path: Optional[str] = None) -> subprocess.Popen:
        """Run ARGV natively on the host inside the fleet's network namespace, reachable from
        the nodes at `host_ip` (given to the bridge on first use): a service that is not part of
        the system under test, such as the registry's etcd, without paying UML's cost per
        syscall. Stopped by PID at close (and by `cleanup` after a crash)."""
        if not self._started or self._closed:
            raise HarnessError(f"fleet {self.name}: host_service({name!r}) needs a running fleet")
        if not _NODE_RE.fullmatch(name) or name in self._services:
            raise HarnessError(f"bad or duplicate host service name {name!r}")
        if not self._services:
            self.network.add_address(f"{self.host_ip}/{self.subnet.prefixlen}")
        out = open(log_path or os.path.join(self.workdir, f"{name}.log"), "ab")
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()
        self._services[name] = proc
        self._write_state()
        log.info("fleet %s: host service %s (pid %d) on %s", self.name, name, proc.pid, self.host_ip)
        return proc

    def _stop_services(self) -> None:
        for name, proc in self._services.items():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            log.debug("fleet %s: host service %s ended (rc %s)", self.name, name, proc.returncode)

    def close(self) -> None:
        """Halt every node (bounded), kill leftovers by PID, delete netns, tmpfs and workdir."""
        with self._close_lock:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
        t0 = time.monotonic()
        for node in self:
            node._request_halt()
        deadline = time.monotonic() + self.halt_timeout
        for node in self:
            try:
                node._finish_halt(deadline)
            except Exception:
                log.exception("node %s: halt failed", node.name)
        self._stop_services()
        self.network.destroy()
        umount(self.shm_dir)
        if self.keep_workdir:
            log.info("fleet %s: keeping %s", self.name, self.workdir)
            try:
                os.unlink(os.path.join(self.workdir, STATE_FILE))
            except FileNotFoundError:
                pass
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _live_fleets.discard(self)
        log.info("fleet %s: torn down in %.1fs", self.name, time.monotonic() - t0)


def _owner_alive(state: dict) -> Optional[int]:
    pid = state.get("owner_pid")
    if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid) and "python" in pid_cmdline(pid):
        return pid
    return None


def cleanup_workdir(workdir: str, force: bool = False) -> bool:
    """Undo what a (crashed) fleet left in WORKDIR, using only what it recorded there:
    kill recorded linux.uml PIDs (after checking /proc/PID/cmdline), delete the recorded netns,
    unmount the tmpfs, remove the directory.  Returns False if WORKDIR is not a harness dir."""
    state_path = os.path.join(workdir, STATE_FILE)
    node_dirs = os.path.join(workdir, "nodes")
    if not os.path.exists(state_path) and not os.path.isdir(node_dirs):
        log.warning("%s does not look like a harness workdir; left alone", workdir)
        return False
    state = {}
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        pass
    owner = _owner_alive(state)
    if owner and not force:
        log.warning("%s belongs to running process %d; left alone (use force)", workdir, owner)
        return False
    pids = set()
    for info in (state.get("nodes") or {}).values():
        if isinstance(info, dict) and isinstance(info.get("pid"), int):
            pids.add(info["pid"])
    if os.path.isdir(node_dirs):
        for n in os.listdir(node_dirs):
            try:
                with open(os.path.join(node_dirs, n, "pid")) as f:
                    pids.add(int(f.read().strip()))
            except (OSError, ValueError):
                pass
    for pid in sorted(pids):
        if is_our_uml(pid) or uml_group_pids(pid):
            log.info("cleanup: killing recorded UML process group %d", pid)
            kill_uml_group(pid, grace=1.0)
    for name, info in (state.get("services") or {}).items():
        pid, argv0 = (info or {}).get("pid"), (info or {}).get("argv0")
        if isinstance(pid, int) and isinstance(argv0, str) and pid_alive(pid) and os.path.basename(argv0) in pid_cmdline(pid):
            log.info("cleanup: killing recorded host service %s (pid %d)", name, pid)
            os.kill(pid, signal.SIGKILL)
    netns = state.get("netns")
    if netns and netns_exists(netns):
        log.info("cleanup: deleting netns %s", netns)
        sh(["ip", "netns", "del", netns], timeout=30, check=False)
    shm = os.path.join(workdir, "shm")
    if is_mountpoint(shm):
        log.info("cleanup: unmounting %s", shm)
        umount(shm)
    if is_mountpoint(shm):
        log.error("cleanup: %s is still mounted; not removing %s", shm, workdir)
        return False
    shutil.rmtree(workdir, ignore_errors=True)
    return True
