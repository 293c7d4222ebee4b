"""The boot-storm simulator (vmthunder.simulate, src/sim) and its command: properties that
must hold whatever the calibration, not timings."""

import json
import os
import subprocess
import sys

import pytest

import vmthunder
from vmthunder import plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRACE = os.path.join(ROOT, "bench", "traces", "debian12-boot.json")
W = 32 << 20


def sim(**kw):
    p = {"nodes": 6, "rate_bps": 100e6, "working_set_bytes": W}
    p.update(kw)
    return vmthunder.simulate(p)


def test_direct_boot_of_n_nodes_is_bound_below_by_n_w_over_u():
    out = sim(shape="direct")
    u = 100e6 * 0.95 / 8  # the default link efficiency: data bytes per second
    assert out["completion_s"] >= 6 * W / u
    assert out["origin_bytes"] == pytest.approx(6 * W, rel=0.01)


def test_a_chain_sends_about_w_from_the_origin_and_a_tree_k_times_w():
    chain = sim(shape="chain", nodes=8)
    assert 1.0 <= chain["origin_bytes"] / W <= 1.1
    assert chain["depth"] == 8
    tree = sim(shape="tree", fanout=3, nodes=8)
    assert 3.0 <= tree["origin_bytes"] / W <= 3.3
    assert tree["origin_children"] == 3


def test_more_bandwidth_is_never_slower():
    for shape in ("tree", "chain", "direct"):
        times = [sim(shape=shape, rate_bps=r)["completion_s"] for r in (25e6, 100e6, 1e9)]
        assert times == sorted(times, reverse=True), (shape, times)


def test_a_failed_relay_loses_its_vm_and_the_rest_finish():
    out = sim(shape="tree", nodes=12, fail={"node": "auto", "at_s": 2.0})
    assert out["failed_node"] is not None
    assert out["failed_vms"] == 1 and out["unfinished_vms"] == 0
    assert sum(t is None for t in out["vm_times_s"]) == 1


def test_a_relay_failing_with_its_children_half_fed_reports_what_they_owed(capsys):
    assert plan.parse_fail("auto@50%") == {"node": "auto", "children_have": 0.5}
    assert plan.main(["--nodes", "13", "--rate", "100mbit", "--working-set-bytes", str(W), "--fail", "auto@50%"]) == 0
    text = capsys.readouterr().out
    assert "relay cn1 failed at" in text and "3 children owed 1.50 x W" in text, text
    out = sim(nodes=13, fail={"node": "auto", "children_have": 0.5})
    f = out["failure"]
    assert f["node"] == "cn1" and f["at_s"] is not None and sorted(f["subtree"]) == ["cn10", "cn13", "cn4", "cn7"]
    with pytest.raises(vmthunder.InvalidArgument, match="exactly one"):
        sim(fail={"node": "auto", "at_s": 1.0, "children_have": 0.5})


@pytest.mark.skipif(not os.path.exists(TRACE), reason="no recorded boot trace")
def test_the_trace_is_replayed_and_direct_reads_include_its_re_reads():
    out = vmthunder.simulate({"nodes": 2, "rate_bps": 100e6, "shape": "direct", "trace": TRACE})
    assert out["working_set_bytes"] == 83603456
    # direct readers have no cache: widened reads and re-reads are 1.078 x W each
    assert out["origin_bytes"] / out["working_set_bytes"] == pytest.approx(2 * 1.078, rel=0.01)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"rate_bps": 0}, "rate_bps"),
        ({"nodes": 0}, "nodes"),
        ({"fanuot": 2}, "fanuot"),
        ({"fail": {"node": "cn99", "at_s": 1}}, "cn99"),
    ],
)
def test_bad_parameters_raise_invalid_argument_naming_them(bad, field):
    with pytest.raises(vmthunder.InvalidArgument, match=field):
        sim(**bad)


def test_plan_command_prints_json_and_plots(tmp_path, capsys):
    png = tmp_path / "t.png"
    rc = plan.main(
        ["--nodes", "4", "--rate", "100mbit", "--working-set-bytes", str(W), "--shape", "chain", "--json", "--png", str(png)]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nodes"] == 4 and len(out["vm_times_s"]) == 4
    assert png.stat().st_size > 1000
    assert plan.parse_rate("1gbit") == 1e9 and plan.parse_rate("25Mbit/s") == 25e6
    assert plan.main(["--nodes", "4", "--working-set-bytes", "1", "--rate", "1gbit"]) == 2


def test_validate_quick_writes_the_documented_fields(tmp_path):
    out = tmp_path / "v.json"
    repo_history = os.path.join(ROOT, "bench", "results", "history.jsonl")
    before = open(repo_history).read()
    subprocess.run(
        [sys.executable, "-m", "bench.simulate", "--validate", "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=ROOT,
    )
    doc = json.loads(out.read_text())
    keys = {"nodes", "rate_bps", "shape", "measured_s", "predicted_s", "error", "cpu_bound"}
    assert doc["cases"] and all(keys <= set(c) for c in doc["cases"])
    for c in doc["cases"]:
        assert c["error"] == pytest.approx(abs(c["predicted_s"] - c["measured_s"]) / c["measured_s"], abs=2e-3)
    assert all({"nodes", "rate_bps", "shape", "predicted_s", "sim_wall_s"} <= set(s) for s in doc["scale"])
    assert doc["provenance"]["date"] and doc["provenance"]["host"]["cores"]
    hist = [json.loads(ln) for ln in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [(h["file"], h["scenario"], h["cases"]) for h in hist] == [("v.json", "simulator-validation", len(doc["cases"]))]
    assert open(repo_history).read() == before, "a test run leaves bench/results alone"


def test_shapes_writes_provenance_a_summary_and_failures_that_hit_a_subtree_still_fetching(tmp_path):
    out = tmp_path / "s.json"
    subprocess.run(
        [sys.executable, "-m", "bench.simulate", "--shapes", "--sizes", "13:1e8", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=ROOT,
    )
    doc = json.loads(out.read_text())
    assert {"commit", "host", "date"} <= set(doc["provenance"]) and doc["host_load"]["load_avg_at_end"]
    assert {(s["working_set"], s["claims"]) for s in doc["summary"]} == {
        ("trace", "serial"),
        ("trace", "free"),
        ("424MB", "serial"),
        ("424MB", "free"),
    }
    failed = [r for r in doc["rows"] if r["fail"]]
    assert failed and all(r["shape"] != "direct" for r in failed)
    for r in failed:
        # an interior relay, dead while what it serves was still arriving
        assert r["failed_children"] >= 1 and r["failed_descendants"] >= r["failed_children"], r
        assert r["failed_at_s"] < r["healthy_subtree_completion_s"] and r["children_owed_w"] > 0, r
