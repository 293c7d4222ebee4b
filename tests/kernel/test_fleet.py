"""The fleet benchmark end to end, short: origin + 3 compute nodes in UML, a small synthetic boot
trace, every mode (relay tree through the registry, direct reads from the origin, full copy).

Checks the pipeline, not the timings: the JSON, named by the run's parameters, has the
documented shape and its provenance, every VM finished its reads with the right data, the
timeline PNG exists, and the run's summary went to the history file beside them (the
temporary directory, not bench/results).
"""

import json
import os

from bench import fleet
from tests.kernel._vmt import require_uml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fleet_smoke(tmp_path, capsys):
    require_uml()
    try:
        import tooz  # noqa: F401

        import vmthunder.registry  # noqa: F401
    except ImportError as e:
        import pytest

        pytest.skip(f"the tree mode needs the registry: {e}")
    rc = fleet.main(["--nodes", "3", "--smoke", "--full-copy", "measure", "--out", str(tmp_path)])
    # by default the fleet runs at the lab's faithful rate for its size, and names its files by it
    scenario = f"fleet-3n-{fleet.faithful_rate(3)}-synthetic"
    doc = json.loads((tmp_path / f"{scenario}.json").read_text())
    assert doc["nodes"] == 3 and doc["vms"] == 3
    for k in ("rate_bps", "fanout", "working_set_bytes", "link_bound_s", "modes"):
        assert k in doc, k
    assert doc["working_set_bytes"] > 0 and doc["link_bound_s"] > 0
    assert set(doc["modes"]) == {"tree", "direct", "full_copy"}
    for mode, r in doc["modes"].items():
        assert "error" not in r, f"{mode}: {r.get('error')}"
        for k in ("completion_s", "origin_bytes", "edges", "vm_times_s"):
            assert k in r, (mode, k)
        assert sorted(r["vm_times_s"]) == ["vm01", "vm02", "vm03"], (mode, r["vm_times_s"])
        assert r["all_finished"], (mode, r.get("failed_vms"))
        assert r["data_ok"], (mode, r.get("wrong_digests"))
        assert r["origin_bytes"] > 0
        for e in r["edges"]:
            assert set(e) >= {"parent", "child", "bytes", "ratio"}, e
    tree = doc["modes"]["tree"]["tree"]
    assert sorted(tree["parents"]) == ["cn1", "cn2", "cn3"], tree
    # The origin is always a path: first when it is the primary, else the last resort.
    assert all(p[0] == "origin" or p[-1] == "origin" for p in tree["parents"].values()), tree
    # every node's data came over some tree edge (a peer or the origin)
    children = {e["child"] for e in doc["modes"]["tree"]["edges"] if e["bytes"] > 0}
    assert children == {"cn1", "cn2", "cn3"}, doc["modes"]["tree"]["edges"]
    png = tmp_path / f"{scenario}-timeline.png"
    assert png.stat().st_size > 10_000
    prov = doc["provenance"]
    assert prov["date"] and prov["commit"] and prov["host"]["cores"] >= 1, prov
    hist = [json.loads(ln) for ln in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [(h["file"], h["scenario"]) for h in hist] == [(f"{scenario}.json", scenario)]
    assert set(hist[0]["modes"]) == {"tree", "direct", "full_copy"}, hist
    # the table and the PNG's path come last
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1] == f"timeline: {png}", out[-3:]
    assert any(line.startswith("| full_copy |") for line in out), out
    assert rc == 0
