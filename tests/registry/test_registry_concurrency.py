"""Concurrent joiners: N processes race for one image. Each takes the image lock, reads the peers,
publishes itself with seq = max seen + 1. Mutual exclusion means no two held the lock at once
(an O_EXCL holder file and the (enter, exit) intervals both show it) and every joiner saw all
earlier ones (the seqs are exactly 1..N)."""

import multiprocessing
import time
import uuid

import registry_workers as W

from vmthunder.registry import Registry

N = 8


def test_concurrent_joiners(backend_url, tmp_path):
    img = "img-" + uuid.uuid4().hex[:12]
    ctx = multiprocessing.get_context(W.FORK)
    barrier, done, results = ctx.Barrier(N), ctx.Event(), ctx.Queue()
    holder = str(tmp_path / "holder")
    W.prewarm()
    procs = [
        ctx.Process(target=W.joiner, args=(backend_url, f"cn{i}", img, 5.0, barrier, done, results, holder), daemon=True)
        for i in range(N)
    ]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    try:
        outs = [results.get(timeout=180) for _ in procs]
        elapsed = time.monotonic() - t0
        errors = [o["error"] for o in outs if "error" in o]
        assert not errors, "\n".join(errors)
        assert [o["violation"] for o in outs if o["violation"]] == []

        by_enter = sorted(outs, key=lambda o: o["enter"])
        for prev, nxt in zip(by_enter, by_enter[1:]):
            assert prev["exit"] <= nxt["enter"], f"{prev['host']} and {nxt['host']} held the lock at once"
        assert [o["seq"] for o in by_enter] == list(range(1, N + 1))
        assert [o["peers_seen"] for o in by_enter] == list(range(N))

        with Registry(backend_url, "observer", lease_s=5.0) as obs:
            recs = obs.peers(img)
        assert sorted(r["host"] for r in recs) == sorted(f"cn{i}" for i in range(N))
        assert sorted(r["seq"] for r in recs) == list(range(1, N + 1))
        for r in recs:  # each saw exactly the ones before it
            assert len(r["saw"]) == r["seq"] - 1
        waits = sorted(o["waited"] for o in outs)
        print(
            f"\n[{backend_url.split(':')[0]}] {N} joiners in {elapsed:.2f}s; lock waits "
            f"min {waits[0]:.2f}s max {waits[-1]:.2f}s; start() max {max(o['start_s'] for o in outs):.2f}s; order {[o['host'] for o in by_enter]}"
        )
    finally:
        done.set()
        for p in procs:
            p.join(30)
            W.kill(p)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
