"""Process bodies for the registry tests (run in forked children: multiprocessing "fork").

`joiner` is the protocol a compute node follows to join an image's relay tree: take the image
lock, read the peers, publish its own record, release. Tests with many processes on one
coordination service (the placement property test) can reuse it.
"""

import os
import signal
import time
import traceback

from vmthunder.registry import Registry

FORK = "fork"


def prewarm():
    """Import the tooz drivers in the parent: forked children inherit them instead of each
    spending ~0.5 s of CPU importing them (8 at once on 2 cores: seconds)."""
    import tooz.drivers.etcd3gw  # noqa: F401
    import tooz.drivers.file  # noqa: F401


def member(url, host, image_id, lease_s, ready, hold_lock=False):
    """Publish `host` in the image's group (and take the image lock if asked), signal `ready`,
    then wait to be killed. Never leaves on its own: liveness must come from the lease."""
    reg = Registry(url, host, lease_s=lease_s, timeout_s=5)
    reg.start()
    reg.publish(image_id, {"state": "ready", "pid": os.getpid()})
    held = reg.lock(image_id, timeout_s=10) if hold_lock else None
    if held is not None:
        held.__enter__()  # kept referenced: never released, the process dies holding it
    ready.set()
    while True:
        time.sleep(60)


def joiner(url, host, image_id, lease_s, start_barrier, done, results, holder_path, work_s=0.05):
    """One joiner: under the image lock, read peers, publish {"seq": max seq seen + 1}.

    `holder_path` is created with O_EXCL while the lock is held (and removed before release):
    a second holder at the same time finds it and reports a violation. Puts a dict on
    `results`; then stays a member until `done` is set, so the parent can read every record."""
    out = {"host": host, "pid": os.getpid()}
    reg = Registry(url, host, lease_s=lease_s, timeout_s=10)
    try:
        t_start = time.monotonic()
        reg.start()
        out["start_s"] = time.monotonic() - t_start
        start_barrier.wait(60)
        t0 = time.monotonic()
        with reg.lock(image_id, timeout_s=120):
            enter = time.monotonic()
            try:
                fd = os.open(holder_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                os.write(fd, host.encode())
                os.close(fd)
                out["violation"] = None
            except FileExistsError:
                with open(holder_path) as f:
                    out["violation"] = f"{host} entered while {f.read()!r} held the lock"
            peers = reg.peers(image_id)
            seq = max([p.get("seq", 0) for p in peers], default=0) + 1
            reg.publish(image_id, {"seq": seq, "state": "ready", "saw": sorted(p["host"] for p in peers)})
            time.sleep(work_s)
            if out["violation"] is None:
                os.unlink(holder_path)
            leave = time.monotonic()
        out.update(enter=enter, exit=leave, waited=enter - t0, seq=seq, peers_seen=len(peers))
    except BaseException:
        out["error"] = traceback.format_exc()
    results.put(out)
    done.wait(120)
    reg.stop()


def kill(proc):
    """SIGKILL a multiprocessing child by its PID and reap it."""
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
