"""Small host-side helpers shared by the harness modules (stdlib only)."""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from typing import Optional, Sequence, Tuple

log = logging.getLogger("vmthunder.harness")

UML_BINARY = "linux.uml"
UML_MODULES_ROOT = "/usr/lib/uml/modules"
DEFAULT_WORKROOT = "/tmp/vmt-uml"
STATE_FILE = "fleet.json"  # marks a directory as a harness workdir (cleanup relies on it)


class HarnessError(RuntimeError):
    """Anything that goes wrong while setting up, driving or tearing down UML nodes."""


class NodeDead(HarnessError):
    """The node's UML process is not running (killed, crashed or powered off)."""


class CommandTimeout(HarnessError):
    """A guest command did not finish in time (it has been killed in the guest)."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


def sh(argv: Sequence[str], timeout: float = 30.0, check: bool = True, input: Optional[bytes] = None) -> Tuple[int, str]:
    """Run a host command; returns (rc, stdout+stderr).  Raises HarnessError if check and rc!=0."""
    try:
        p = subprocess.run(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, input=input, close_fds=True
        )
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"host command timed out after {timeout}s: {' '.join(argv)}") from e
    except OSError as e:
        raise HarnessError(f"cannot run host command {' '.join(argv)}: {e}") from e
    out = p.stdout.decode("utf-8", "replace")
    if check and p.returncode != 0:
        raise HarnessError(f"host command failed (rc={p.returncode}): {' '.join(argv)}\n{out}")
    return p.returncode, out


def uml_binary() -> Optional[str]:
    return shutil.which(UML_BINARY) or (f"/usr/bin/{UML_BINARY}" if os.access(f"/usr/bin/{UML_BINARY}", os.X_OK) else None)


def uml_modules_dir() -> Optional[str]:
    try:
        versions = sorted(os.listdir(UML_MODULES_ROOT))
    except OSError:
        return None
    return os.path.join(UML_MODULES_ROOT, versions[-1]) if versions else None


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/run/netns", name))


@functools.lru_cache(maxsize=1)
def uml_available() -> Tuple[bool, str]:
    """Can this host run UML nodes?  Returns (ok, reason)."""
    if not os.uname().sysname == "Linux":
        return False, "not Linux"
    if uml_binary() is None:
        return False, "linux.uml not found (apt-get install user-mode-linux)"
    mod = uml_modules_dir()
    if mod is None or not os.path.exists(os.path.join(mod, "kernel/fs/overlayfs/overlay.ko")):
        return False, f"UML modules (overlay.ko) not found under {UML_MODULES_ROOT}"
    if os.geteuid() != 0:
        return False, "must run as root (netns, tap devices, tmpfs mounts)"
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return False, f"/dev/net/tun not usable: {e}"
    if shutil.which("ip") is None:
        return False, "iproute2 'ip' not found"
    probe = f"vmt-probe-{os.getpid()}"
    try:
        rc, out = sh(["ip", "netns", "add", probe], timeout=15, check=False)
        if rc != 0:
            return False, f"'ip netns add' does not work: {out.strip()}"
        rc, out = sh(["ip", "-n", probe, "link", "add", "vmtprobebr", "type", "bridge"], timeout=15, check=False)
        if rc != 0:
            return False, f"cannot create a bridge in a netns: {out.strip()}"
    except HarnessError as e:
        return False, str(e)
    finally:
        sh(["ip", "netns", "del", probe], timeout=15, check=False)
    return True, "ok"


# ---------------------------------------------------------------- process control (by PID only)


def pid_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def is_our_uml(pid: int) -> bool:
    """True if PID is alive, runs linux.uml, and leads its own process group."""
    if pid <= 1:
        return False
    if UML_BINARY not in pid_cmdline(pid):
        return False
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not "alive" for our purposes
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return False


def killpg_uml(pid: int, sig: int) -> bool:
    """Signal the process group led by PID, only if PID is one of our linux.uml processes."""
    if not is_our_uml(pid):
        return False
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False


def uml_group_pids(pgid: int) -> list:
    """Live linux.uml processes in process group PGID (found by PID, never by name)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and int(fields[3]) == pgid and fields[0] != b"Z" and UML_BINARY in pid_cmdline(int(entry)):
            pids.append(int(entry))
    return pids


def kill_uml_group(pid: int, grace: float = 1.0) -> None:
    """SIGTERM then SIGKILL the process group of a recorded linux.uml PID; afterwards SIGKILL
    any straggler of that group that is still a linux.uml process."""
    if killpg_uml(pid, signal.SIGTERM):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)
        killpg_uml(pid, signal.SIGKILL)
    for p in uml_group_pids(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def is_mountpoint(path: str) -> bool:
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


def umount(path: str) -> None:
    if not is_mountpoint(path):
        return
    rc, out = sh(["umount", path], timeout=30, check=False)
    if rc != 0:
        log.warning("umount %s failed (%s); lazy unmount", path, out.strip())
        sh(["umount", "-l", path], timeout=30, check=False)


# ---------------------------------------------------------------- value parsing

_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(value) -> int:
    """Bytes from an int or a string like '384M', '1G', '512k'."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", str(value).lower())
    if not m:
        raise HarnessError(f"bad size: {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_rate(value) -> int:
    """Bits per second from an int (bit/s) or a tc-style string ('100mbit', '20mbps')."""
    if isinstance(value, (int, float)):
        bits = int(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(value).lower())
        if not m or m.group(2) not in _RATE_UNITS:
            raise HarnessError(f"bad rate: {value!r} (use e.g. '100mbit', '20mbps')")
        bits = int(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if bits < 8000:
        raise HarnessError(f"rate too low: {value!r}")
    return bits
