"""bench/fleet.py's scaling table reports whichever tree mode the run used."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import fleet  # noqa: E402  (bench/fleet.py)


def row(nodes, modes):
    return {"nodes": nodes, "vms": nodes, "working_set_bytes": 80 << 20, "link_bound_s": 6.7, "modes": modes}


def test_the_scaling_table_takes_the_chain_as_the_tree():
    tree = {"completion_s": 14.8, "origin_ratio": 1.08, "max_edge_ratio": 1.06, "tree": {"joins_wall_s": 5.4}}
    table = fleet.scaling_table([row(4, {"tree-f1": tree, "direct": {"completion_s": 32.0, "origin_ratio": 4.38}})])
    last = table.splitlines()[-1]
    assert "| 14.8 (tree-f1) |" in last and "| 2.16x |" in last and "| 1.08 | 4.38 | 1.06 | 5.4 |" in last
