"""bench/record.py: results named by their scenario, provenance inside, one history line per run
written beside the result (a temporary directory in tests, never bench/results)."""

import json
import os
import subprocess

import pytest

from bench import record, simulate

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")

W = 80 << 20


def fleet_doc(nodes=8):
    mode = {
        "completion_s": 16.0333,
        "vm_min_s": 12.24,
        "vm_median_s": 15.19,
        "origin_bytes": int(1.08 * W),
        "origin_data_bytes": int(1.06 * W),
        "origin_ratio": 1.0799,
        "max_edge_ratio": 1.0583,
        "all_finished": True,
        "data_ok": True,
        "tree": {"joins_wall_s": 5.766},
        "cpu": {"fleet_cpu_s": 25.7, "host_busy": 0.91},
    }
    return {
        "nodes": nodes,
        "vms": nodes,
        "rate_bps": 100e6,
        "working_set_bytes": W,
        "link_bound_s": 6.71,
        "start": "attach",
        "command": "python3 -m bench.fleet --modes tree-f1,direct",
        "provenance": {
            "date": "2026-12-03T10:00:00Z",
            "commit": "0421ba3",
            "trace_sha1": "cacecce15295",
            "host": {"cpu_model": "AMD EPYC", "cores": 2},
            "host_speed": {"python_loop_2e6_s": 0.044},
        },
        "modes": {"tree-f1": mode, "direct": {"error": "RuntimeError: boom"}},
    }


def test_results_are_named_by_their_parameters():
    assert record.fleet_scenario(8, 100e6) == "fleet-8n-100mbit"
    assert record.fleet_scenario(8, 25e6, "sync") == "fleet-8n-25mbit-sync"
    assert record.fleet_scenario(3, 100e6, synthetic=True) == "fleet-3n-100mbit-synthetic"
    assert record.fleet_scenario(None, 1e9) == "fleet-scaling-1gbit"
    readers = ["r1", "r2", "r3", "r1b"]
    assert record.cache_engines_name(False, None, "200mbit", True, False, readers, readers) == "cache-engines"
    assert record.cache_engines_name(True, 0, "200mbit", True, False, readers, readers) == "cache-engines-prefetch-readahead0"
    assert (
        record.cache_engines_name(False, None, "100mbit", False, False, ["r3"], readers)
        == "cache-engines-100mbit-readers-r3-synthetic"
    )
    assert record.cache_engines_name(False, None, "200mbit", False, True, readers, readers) == "cache-engines-smoke"


def test_provenance_names_date_commit_and_host():
    p = record.provenance()
    assert p["date"].endswith("Z") and len(p["date"]) == 20
    assert p["commit"]  # the tests run in a git checkout
    assert p["host"]["cores"] == os.cpu_count() and p["host"]["cpu_model"]


def test_history_goes_beside_the_result(tmp_path):
    out = tmp_path / "fleet-8n-100mbit.json"
    record.write_result(str(out), fleet_doc())
    path = record.append_history(str(out), record.fleet_summary(fleet_doc(), "fleet-8n-100mbit"))
    record.append_history(str(out), {"bench": "x"})
    assert path == str(tmp_path / "history.jsonl")
    lines = [json.loads(ln) for ln in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["file"] == "fleet-8n-100mbit.json"
    h = lines[0]
    assert (h["date"], h["commit"], h["scenario"], h["trace_sha1"]) == (
        "2026-12-03",
        "0421ba3",
        "fleet-8n-100mbit",
        "cacecce15295",
    )
    assert h["host"] == {"cpu_model": "AMD EPYC", "cores": 2, "python_loop_2e6_s": 0.044}
    assert h["modes"]["tree-f1"] == {
        "completion_s": 16.033,
        "vm_min_s": 12.2,
        "vm_median_s": 15.2,
        "origin_w": 1.08,
        "origin_data_w": 1.06,
        "max_edge_w": 1.058,
        "slowest_join_s": 5.8,
        "fleet_cpu_s": 25.7,
        "host_busy": 0.91,
    }
    assert h["modes"]["direct"] == {"error": "RuntimeError: boom"}
    assert json.loads(out.read_text())["provenance"]["commit"] == "0421ba3"
    assert not (tmp_path / "fleet-8n-100mbit.json.tmp").exists()


def test_the_simulator_finds_each_lab_run_once_in_the_history():
    history = record.read_history()
    for scenario, commit, nodes, mode, _shape, _k, _prefetch in simulate.CASES:
        run, m = simulate.lab_run(scenario, commit, nodes, mode, history)
        assert run["rate_bps"] > 0 and m["completion_s"] > 0 and m["origin_data_w"] > 0
    with pytest.raises(SystemExit, match="0 runs of fleet-8n-100mbit at nope"):
        simulate.lab_run("fleet-8n-100mbit", "nope", 8, "direct", history)


def test_every_kept_result_carries_its_provenance():
    res = os.path.join(BENCH, "results")
    for f in sorted(os.listdir(res)):
        if f.endswith(".json"):
            prov = json.load(open(os.path.join(res, f)))["provenance"]
            assert prov["date"] and "commit" in prov and prov["host"]["cores"], (f, prov)
    # A fleet run draws its PNG beside the JSON; .gitignore keeps it out of the repository.
    tracked = subprocess.run(["git", "ls-files", "*.png"], cwd=res, capture_output=True, text=True, check=True).stdout
    assert not tracked.split(), "PNGs are drawn on demand (bench/plot.py), never kept"


def test_plot_draws_a_fleet_result_from_its_json(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plot

    doc = fleet_doc(2)
    tl = {
        "t": [0.0, 1.0, 2.0],
        "tx": {"o": [0, 5 << 20, 9 << 20], "cn1": [0, 0, 1 << 20]},
        "vm_bytes": 100,
        "vm_progress": {"vm01": [[0.5, 10], [1.5, 100]], "vm02": [[0.7, 50], [1.9, 100]]},
    }
    doc["modes"] = {"tree-f1": {"completion_s": 1.9, "vm_times_s": {"vm01": 1.5, "vm02": 1.9}, "timeline": tl}}
    doc["fanout"] = 1
    src = tmp_path / "fleet-2n-100mbit.json"
    src.write_text(json.dumps(doc))
    png = tmp_path / "t.png"
    assert plot.main([str(src), "-o", str(png)]) == 0
    assert png.stat().st_size > 10_000
    no_tl = tmp_path / "fleet-scaling-100mbit.json"
    no_tl.write_text(json.dumps({"runs": [], "modes": {}}))
    assert plot.main([str(no_tl)]) == 2


def test_a_fleet_run_names_its_result_and_writes_history_only_into_its_out_dir(tmp_path, monkeypatch):
    """bench/fleet.py's output, with its UML fleet stood in for: the result named by the run's
    parameters, provenance inside, the PNG beside it, one history line per fleet size, all under
    --out; bench/results untouched."""
    from bench import fleet

    class Run:
        def __init__(self, a, trace, image_path, W, digest, n, m):
            self.n, self.W, self.rate = n, W, fleet.parse_rate(a.rate)

        def run(self):
            doc = fleet_doc(self.n)
            doc["working_set_bytes"], doc["rate_bps"] = self.W, self.rate
            doc["modes"]["tree-f1"]["timeline"] = {
                "t": [0.0, 1.0],
                "tx": {"o": [0, 1 << 20]},
                "vm_bytes": 1,
                "vm_progress": {"vm01": [[0.5, 1]]},
            }
            doc["modes"]["tree-f1"]["vm_times_s"] = {"vm01": 0.5}
            doc.update(fanout=1, image_bytes=32 << 20)
            del doc["provenance"], doc["command"]
            return doc

    monkeypatch.setattr(fleet.os, "geteuid", lambda: 0)
    monkeypatch.setattr(fleet, "uml_available", lambda: (True, ""))
    monkeypatch.setattr(fleet, "FleetRun", Run)
    monkeypatch.setattr(fleet, "table", lambda doc: "")
    monkeypatch.setattr(fleet, "host_speed", lambda: {"python_loop_2e6_s": 0.05, "cpu_model": "x", "cores": 2})
    repo_history = os.path.join(BENCH, "results", "history.jsonl")
    before = open(repo_history).read()
    fleet.main(["--nodes", "2", "--smoke", "--modes", "tree-f1,direct", "--out", str(tmp_path)])
    fleet.main(["--scaling", "2,3", "--smoke", "--rate", "25mbit", "--modes", "tree-f1,direct", "--out", str(tmp_path)])
    names = sorted(os.listdir(tmp_path))
    assert names == [
        "fleet-2n-100mbit-synthetic-timeline.png",
        "fleet-2n-100mbit-synthetic.json",
        "fleet-scaling-25mbit-synthetic.json",
        "history.jsonl",
    ], names
    doc = json.loads((tmp_path / "fleet-2n-100mbit-synthetic.json").read_text())
    assert doc["provenance"]["commit"] and doc["provenance"]["date"].endswith("Z")
    assert doc["png"] == "fleet-2n-100mbit-synthetic-timeline.png"
    hist = [json.loads(ln) for ln in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [(h["file"], h["nodes"]) for h in hist] == [
        ("fleet-2n-100mbit-synthetic.json", 2),
        ("fleet-scaling-25mbit-synthetic.json", 2),
        ("fleet-scaling-25mbit-synthetic.json", 3),
    ]
    assert hist[0]["host"]["python_loop_2e6_s"] == 0.05 and hist[0]["modes"]["tree-f1"]["completion_s"] == 16.033
    assert open(repo_history).read() == before
