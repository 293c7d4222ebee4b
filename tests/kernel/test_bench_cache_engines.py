"""Smoke run of the cache-engines benchmark (bench/cache_engines.py --smoke): bcache only, a small
working set, the relay tree o -> r1 -> r2 -> r3 plus r1 -> r1b in UML nodes.

Checks the shape of the JSON it writes and that the working set reached every node, correct,
over every tree edge. No timing assertions: the benchmark measures, this only keeps it working.
"""

import json
import os
import subprocess
import sys

from tests.kernel._vmt import require_uml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EDGES = {("o", "r1"), ("r1", "r2"), ("r2", "r3"), ("r1", "r1b")}


def test_cache_engines_smoke(tmp_path):
    require_uml()
    out = tmp_path / "cache-engines.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cache_engines", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert "| bcache" in proc.stdout, proc.stdout  # the markdown table

    doc = json.loads(out.read_text())
    assert set(doc) >= {"default", "working_set_bytes", "engines"}
    w = doc["working_set_bytes"]
    assert isinstance(w, int) and w > 0
    assert list(doc["engines"]) == ["bcache"]
    assert doc["default"] == "bcache"

    r = doc["engines"]["bcache"]
    assert "error" not in r, r.get("error")
    assert isinstance(r["completion_s"], (int, float)) and r["completion_s"] > 0
    assert isinstance(r["origin_bytes"], int) and r["origin_bytes"] >= w, "the origin sent the working set"
    assert {(e["parent"], e["child"]) for e in r["edges"]} == EDGES
    for e in r["edges"]:
        assert set(e) >= {"parent", "child", "bytes", "ratio"}
        # (>= 0.95 W, not W: the kernel's partition scan of a node's local disk at attach reads
        # the image's head and tail before the counters start, and those blocks stay cached)
        assert e["bytes"] >= 0.95 * w, f"{e['parent']}->{e['child']}: the child read less than the working set from its parent"
        assert abs(e["ratio"] - e["bytes"] / w) < 1e-3
    assert set(r["reader_times_s"]) == {"r1", "r2", "r3", "r1b"}
    assert r["data_ok"] == {"r1": True, "r2": True, "r3": True, "r1b": True}, "every reader read the origin's data"
    # provenance inside, the summary in the history file beside the result (not bench/results)
    assert doc["provenance"]["date"] and doc["provenance"]["host"]["cores"] >= 1, doc["provenance"]
    hist = [json.loads(ln) for ln in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [(h["file"], h["bench"]) for h in hist] == [("cache-engines.json", "cache_engines")], hist
    assert hist[0]["engines"]["bcache"]["completion_s"] == round(r["completion_s"], 2)
