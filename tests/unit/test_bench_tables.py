"""bench/fleet_report.py: the tables and goals of a fleet run; bench/fleet.py: its CPU figures and flags."""

import os

from bench import fleet, fleet_report


def row(nodes, modes):
    return {"nodes": nodes, "vms": nodes, "working_set_bytes": 80 << 20, "link_bound_s": 6.7, "modes": modes}


def test_the_scaling_table_takes_the_chain_as_the_tree():
    tree = {"completion_s": 14.8, "origin_ratio": 1.08, "max_edge_ratio": 1.06, "tree": {"joins_wall_s": 5.4}}
    table = fleet_report.scaling_table([row(4, {"tree-f1": tree, "direct": {"completion_s": 32.0, "origin_ratio": 4.38}})])
    last = table.splitlines()[-1]
    assert "| 14.8 (tree-f1) |" in last and "| 2.16x |" in last and "| 1.08 | 4.38 | 1.06 | 5.4 |" in last


def test_goals_judge_every_tree_mode_against_its_own_fanout():
    W = 80 << 20
    tree = lambda s, k, origin, busy=0.4: {
        "completion_s": s,
        "fanout": k,
        "origin_bytes": origin * W,  # noqa: E731
        "origin_data_bytes": origin * W,
        "max_edge_ratio": 1.05,
        "cpu": {"host_busy": busy},
    }
    doc = {
        "working_set_bytes": W,
        "fanout": 3,
        "rate_bps": 100e6,
        "link_bound_s": W * 8 / 100e6,
        "modes": {"tree-f1": tree(8.0, 1, 1.04), "tree": tree(25.0, 3, 3.17, busy=0.85), "direct": {"completion_s": 62.0}},
    }
    g = fleet_report.goals(doc)
    assert sorted(g) == ["tree", "tree-f1"]
    assert g["tree-f1"]["tree >= 5x faster than direct"] == "7.75x -> met"
    assert g["tree"]["tree >= 5x faster than direct"] == "2.48x -> NOT met"
    assert g["tree-f1"]["origin sends <= fan-out x W x 1.05 (84.0 MiB)"].endswith("-> met")
    assert g["tree"]["origin sends <= fan-out x W x 1.05 (252.0 MiB)"].endswith("-> NOT met")  # 3.17 W > 3.15 W
    assert g["tree-f1"]["tree within 1.3x its shape's bound (k x W / rate = 6.7 s)"] == "1.19x -> met"
    assert g["tree-f1"]["host link-bound (busy < 70 %)"].startswith("40% busy -> yes")
    assert g["tree"]["host link-bound (busy < 70 %)"].startswith("85% busy -> NO")


def test_node_load_finds_the_node_that_ran_out_of_its_cpu():
    hz = os.sysconf("SC_CLK_TCK")
    # cn1 busy 1.0 core for 2 s in the middle, idle otherwise; o at 0.25 core throughout
    ticks = {0.0: 0, 1.0: 0, 2.0: hz, 3.0: 2 * hz, 4.0: 2 * hz, 5.0: 2 * hz}
    samples = [[t, {"cn1": c, "o": int(hz * t / 4)}] for t, c in ticks.items()]
    load = fleet.node_load(samples)
    assert load["node_cpu_s"] == {"cn1": 2.0, "o": round(int(hz * 5 / 4) / hz, 1)}
    assert load["node_peak_cores"]["cn1"] == 1.0
    assert 0.2 <= load["node_peak_cores"]["o"] <= 0.3
    assert fleet.node_load(samples[:1]) == {}


def test_cpu_until_sums_every_node_up_to_the_last_attach():
    hz = os.sysconf("SC_CLK_TCK")
    samples = [[t, {"cn1": int(hz * t), "cn2": int(hz * t / 2)}] for t in (0.0, 0.5, 1.0, 1.5, 2.0)]
    load = fleet.node_load(samples)
    # by 1.2 s the last sample is at 1.0 s: cn1 1.0 + cn2 0.5 core-s
    assert fleet.cpu_until(load["node_samples"], 1.2) == 1.5
    assert fleet.cpu_until(load["node_samples"], 5.0) == 3.0
    assert fleet.cpu_until(load["node_samples"], -1.0) == 0.0


def test_by_default_the_full_copy_is_its_link_bound_and_measure_measures_it():
    assert fleet.parse_args([]).modes == ["tree", "direct"]
    assert fleet.parse_args(["--full-copy", "measure"]).modes == ["tree", "direct", "full_copy"]
    W = 80 << 20
    tree = {
        "completion_s": 27.3,
        "fanout": 3,
        "origin_bytes": 3.1 * W,
        "origin_data_bytes": 3.1 * W,
        "origin_ratio": 3.1,
        "max_edge_ratio": 1.03,
        "vm_min_s": 26.2,
        "vm_median_s": 26.9,
        "all_finished": True,
        "data_ok": True,
        "cpu": {"fleet_cores": 1.1, "host_busy": 0.9},
        "tree": {"joins_wall_s": 9.5},
    }
    doc = {
        "nodes": 8,
        "vms": 8,
        "working_set_bytes": W,
        "image_bytes": 2 << 30,
        "fanout": 3,
        "rate_bps": 100e6,
        "link_bound_s": 6.7,
        "tree_bound_s": 20.1,
        "direct_bound_s": 53.5,
        "full_copy_bound_s": 1374.4,
        "modes": {"tree": tree},
    }
    assert fleet_report.goals(doc)["tree"]["tree vs full copy"].startswith(">= 50.34x faster (against the full copy's link bound")
    table = fleet_report.table(doc)
    row = next(line for line in table.splitlines() if line.startswith("| full_copy"))
    assert "LINK BOUND, not measured (--full-copy measure)" in row and ">= 1374.4 (bound)" in row, row


def test_by_default_a_fleet_runs_at_the_labs_faithful_rate_for_its_largest_size():
    assert fleet.parse_args([]).rate == fleet.faithful_rate(8) == "15mbit"
    assert fleet.parse_args(["--nodes", "2"]).rate == "100mbit"
    assert fleet.parse_args(["--nodes", "3"]).rate == fleet.parse_args(["--scaling", "2,4"]).rate == "50mbit"
    assert fleet.parse_args(["--scaling", "2,4,16"]).rate == "10mbit", "the largest size decides"
    assert fleet.faithful_rate(60) == fleet.FAITHFUL_RATES[-1][1], "beyond the table: its largest size's rate"
    assert fleet.parse_args(["--rate", "25mbit"]).rate == "25mbit"
