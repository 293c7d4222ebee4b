"""The fleet benchmark end to end, short: origin + 3 compute nodes in UML, a small synthetic boot
trace, every mode (relay tree through the registry, direct reads from the origin, full copy).

Checks the pipeline, not the timings: the JSON has the documented shape, every VM finished its
reads with the right data, and the timeline PNG exists.
"""
import json
import os
import sys

from tests.kernel._vmt import require_uml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "bench"))

import fleet  # noqa: E402  (bench/fleet.py)


def test_fleet_smoke(tmp_path, capsys):
    require_uml()
    try:
        import tooz  # noqa: F401
        import vmthunder.registry  # noqa: F401
    except ImportError as e:
        import pytest
        pytest.skip(f"the tree mode needs the registry: {e}")
    rc = fleet.main(["--nodes", "3", "--smoke", "--full-copy", "measure", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "fleet.json").read_text())
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
    assert (tmp_path / "fleet-timeline.png").stat().st_size > 10_000
    # the table and the PNG's path come last
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1] == f"timeline: {tmp_path / 'fleet-timeline.png'}", out[-3:]
    assert any(line.startswith("| full_copy |") for line in out), out
    assert rc == 0
