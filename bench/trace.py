"""The fleet's boot traces: the recorded one or a synthetic one, the reads a VM replays, and
the origin image that makes every read checkable (its digest known before the run)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = 4096
MIB = 1 << 20


def align(off: int, ln: int, image: int):
    a = off // PAGE * PAGE
    b = min(-(-(off + ln) // PAGE) * PAGE, image)
    return a, b - a


def load_trace(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    tr = json.loads(raw)
    image = int(tr["image_bytes"])
    reads = []
    for rec in tr["reads"]:
        t, off, ln = float(rec[0]), int(rec[1]), int(rec[2])
        if ln <= 0 or off >= image:
            continue
        a, n = align(off, ln, image)
        reads.append([round(t, 6), a, n])
    t0 = min((r[0] for r in reads), default=0.0)
    for r in reads:
        r[0] = round(r[0] - t0, 6)
    return {
        "image_bytes": image,
        "reads": reads,
        "sha1": hashlib.sha1(raw).hexdigest()[:12],
        "source": os.path.relpath(path, REPO) if path.startswith(REPO) else path,
    }


def synthetic_trace(image_bytes: int, ws_bytes: int, seed: int, span_s: float = 20.0) -> dict:
    """A deterministic boot-like trace: 'files' at random places of the image, each read from its
    start in 4-128 KiB requests (log-uniform), interleaved a little, with ~5 % re-reads of earlier
    extents; times spread over span_s. Union of the reads = ws_bytes (4 KiB granularity)."""
    rng = random.Random(seed)
    pages = image_bytes // PAGE
    want = ws_bytes // PAGE
    if want > pages // 2:
        raise SystemExit(f"synthetic working set {ws_bytes} too large for image {image_bytes} (at most half)")
    used = bytearray(pages)
    files = []
    have = 0
    while have < want:
        n = min(int(2 ** rng.uniform(2, 11)), want - have)  # 4 KiB .. 8 MiB files
        p = rng.randrange(0, pages - n + 1)
        if any(used[max(0, p - 1) : p + n + 1]):
            continue
        used[p : p + n] = b"\1" * n
        files.append([p, n])
        have += n
    reads, active, done = [], [], []
    rng.shuffle(files)
    it = iter(files)
    while True:
        while len(active) < 3:
            f = next(it, None)
            if f is None:
                break
            active.append(list(f))
        if not active:
            break
        f = active[rng.randrange(len(active))]
        n = min(f[1], rng.choice([1, 1, 2, 4, 4, 8, 16, 32]))
        reads.append([f[0] * PAGE, n * PAGE])
        done.append((f[0] * PAGE, n * PAGE))
        f[0] += n
        f[1] -= n
        if f[1] == 0:
            active.remove(f)
        if done and rng.random() < 0.05:
            reads.append(list(done[rng.randrange(len(done))]))
    step = span_s / max(1, len(reads))
    out = [[round(i * step, 6), off, ln] for i, (off, ln) in enumerate(reads)]
    return {
        "image_bytes": image_bytes,
        "reads": out,
        "source": f"synthetic (seed {seed}: {ws_bytes // MIB} MiB working set over {image_bytes // MIB} MiB)",
    }


def union_bytes(reads) -> int:
    total, end = 0, -1
    for a, n in sorted((r[1], r[2]) for r in reads):
        b = a + n
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def trace_bin(reads) -> bytes:
    """The trace as bench/replay.c reads it: u64 count, then {f64 t, u64 offset, u64 len} each."""
    return struct.pack("<Q", len(reads)) + b"".join(struct.pack("<dQQ", t, off, n) for t, off, n in reads)


def expected_digest(image_path: str, reads) -> str:
    acc = 0
    with open(image_path, "rb") as f:
        for _t, off, n in reads:
            f.seek(off)
            data = f.read(n)
            data += b"\0" * (n - len(data))
            acc = zlib.crc32(zlib.crc32(data).to_bytes(4, "little"), acc)
    return f"{acc:08x}"


def make_origin_image(path: str, image_bytes: int, reads) -> None:
    """Random data everywhere up to 1 GiB; above, random in every MiB the trace touches and
    zeros elsewhere (a full copy moves the zeros over iSCSI all the same)."""
    with open(path, "wb") as f:
        f.truncate(image_bytes)
        if image_bytes <= (1 << 30):
            chunks = range(0, -(-image_bytes // MIB))
        else:
            s = set()
            for _t, off, n in reads:
                s.update(range(off // MIB, (off + n - 1) // MIB + 1))
            chunks = sorted(s)
        for c in chunks:
            f.seek(c * MIB)
            f.write(os.urandom(min(MIB, image_bytes - c * MIB)))


# ============================================================================= guest helpers
