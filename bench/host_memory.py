"""Keep the benchmark host's memory backed while a fleet runs.

A test host that is itself a VM with virtio-balloon *free page reporting* hands every free
2 MiB block back to its hypervisor, and the next touch of that memory faults it in again from
the hypervisor. Measured on such a host (2026-12-02): writing 16 GiB to tmpfs took 62 s the
first time and 7.6 s right after with reporting paused (about 4 s per GiB of first touch). A
fleet touches several GiB (the nodes' RAM files, the page cache of their disk files), and
the relay trees touch more than direct reads (every node caches W and pages it), so the
artifact weighs on the modes unequally: an 8-node chain took 22.0 s (39.4 core-s) as-is and
15.6 s (27.3 core-s) with memory kept. A compute node on bare metal has no such cost.

`kept_memory()` pauses the reporting for the run (page_reporting_order above the largest buddy
order: no free block qualifies), restores the old order on exit, and faults in the memory the
fleet will use once beforehand, so that the first run on a fresh host is not the slow one.
A run killed with SIGKILL cannot restore it: `cat` the parameter, and write back the kernel's
default (9, pageblock order on x86-64) if it still says 11.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

log = logging.getLogger("bench.host_memory")

ORDER_PARAM = "/sys/module/page_reporting/parameters/page_reporting_order"
NO_REPORTING_ORDER = 11  # above MAX_PAGE_ORDER (10 on x86-64): no free block is reported
PREFAULT_DIR = "/dev/shm"
CHUNK = 64 << 20
GIB = 1 << 30


def _mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def prefault(nbytes: int) -> float:
    """Write `nbytes` of zeros to a tmpfs file and remove it (its pages return to the free
    lists, backed). Returns the seconds it took."""
    path = os.path.join(PREFAULT_DIR, f"vmt-prefault-{os.getpid()}")
    zeros = bytes(CHUNK)
    t0 = time.monotonic()
    try:
        with open(path, "wb", buffering=0) as fh:
            done = 0
            while done < nbytes:
                done += fh.write(zeros[: min(CHUNK, nbytes - done)])
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return time.monotonic() - t0


@contextlib.contextmanager
def kept_memory(want_bytes: int, reserve_bytes: int = 3 * GIB):
    """Pause free page reporting and prefault `want_bytes` (at most MemAvailable minus
    `reserve_bytes`) for the duration of the block. Yields what was done, for the results'
    provenance; on a host without page reporting it only says so."""
    info = {"page_reporting": "absent"}
    old = None
    if os.path.exists(ORDER_PARAM):
        with open(ORDER_PARAM) as fh:
            old = fh.read().strip()
        try:
            with open(ORDER_PARAM, "w") as fh:
                fh.write(str(NO_REPORTING_ORDER))
        except OSError as e:
            info["page_reporting"] = f"on (order {old}; could not pause it: {e})"
            old = None
        else:
            info["page_reporting"] = f"paused for the run (page_reporting_order {old} -> {NO_REPORTING_ORDER})"
            log.info("host: free page reporting paused for the run (page_reporting_order %s -> %s)", old, NO_REPORTING_ORDER)
    try:
        if old is not None:
            n = max(0, min(want_bytes, _mem_available() - reserve_bytes))
            n -= n % CHUNK
            if n:
                log.info("host: faulting in %.1f GiB of memory for the fleet ...", n / GIB)
                secs = prefault(n)
                info.update(prefault_gib=round(n / GIB, 2), prefault_s=round(secs, 1))
                log.info("host: %.1f GiB in %.1f s", n / GIB, secs)
        yield info
    finally:
        if old is not None:
            try:
                with open(ORDER_PARAM, "w") as fh:
                    fh.write(old)
                log.info("host: free page reporting restored (page_reporting_order %s)", old)
            except OSError as e:
                log.error("host: could not restore page_reporting_order %s: %s (write it to %s)", old, e, ORDER_PARAM)


HELP = (
    "keep: on a host that is a VM returning free memory to its hypervisor (virtio-balloon free page "
    "reporting), pause that for the run and fault the nodes' memory in first (first touches cost ~4 s/GiB "
    "there, and unequally per mode; see bench/host_memory.py); the old setting is restored at exit. "
    "as-is: leave the host alone (default: keep; as-is with --smoke)"
)


def add_option(ap) -> None:
    """The benchmarks' --host-memory option (resolve it with `choice`)."""
    ap.add_argument("--host-memory", choices=("keep", "as-is"), default=None, help=HELP)


def choice(value, smoke: bool) -> str:
    return value or ("as-is" if smoke else "keep")


def enter(stack: contextlib.ExitStack, value: str, want_bytes: int) -> dict:
    """Apply --host-memory for the rest of `stack`'s life; returns what was done (provenance)."""
    if value == "keep":
        return stack.enter_context(kept_memory(want_bytes))
    return {"page_reporting": "left as it was (--host-memory as-is)"}


def want_for(nodes: int, mem_bytes: int, image_bytes: int) -> int:
    """What a run touches: every node's RAM file and its disk files' page cache, the image."""
    return nodes * (mem_bytes + (768 << 20)) + image_bytes + GIB
