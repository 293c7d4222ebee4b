"""Tree upkeep logic with a fake node and registry (the kernel side is in tests/kernel)."""
import logging

import vmthunder
from vmthunder.tree import Tree


class FakeNode:
    host = "cn1"

    def __init__(self, unused=(), sweep_error=None):
        self.templates = {"img-a": {"vms": ["vm1"], "children": []}}
        self.templates.update({i: {"vms": [], "children": []} for i in unused})
        self.sweep_error = sweep_error

    def status(self):
        return {"templates": dict(self.templates)}

    def sweep(self):
        if self.sweep_error:
            raise self.sweep_error
        gone = [i for i, t in self.templates.items() if not t["vms"] and not t["children"]]
        for i in gone:
            del self.templates[i]
        return gone


class FakeRegistry:
    def __init__(self):
        self.left, self.hosts_published = [], 0

    def publish_host(self, record):
        self.hosts_published += 1

    def leave(self, image_id):
        self.left.append(image_id)

    def peers(self, image_id):
        return []


def tree(node, registry, tmp_path):
    return Tree(node, registry, initiator="iqn.2004-10.com.example:cn1", state_dir=str(tmp_path))


def test_upkeep_removes_an_unused_template_and_leaves_its_group(tmp_path, caplog):
    node, reg = FakeNode(unused=["img-b"]), FakeRegistry()
    with caplog.at_level(logging.INFO, logger="vmthunder.tree"):
        tree(node, reg, tmp_path).maintain()
    assert list(node.templates) == ["img-a"], "the template still used by vm1 stays"
    assert reg.left == ["img-b"]
    assert "image img-b: no VM and no child left; template removed" in caplog.text


def test_upkeep_sweeps_without_a_registry_and_survives_a_failed_sweep(tmp_path, caplog):
    node = FakeNode(unused=["img-b"])
    tree(node, None, tmp_path).maintain()
    assert list(node.templates) == ["img-a"]
    failing, reg = FakeNode(unused=["img-b"], sweep_error=vmthunder.Busy("img-b is held open")), FakeRegistry()
    with caplog.at_level(logging.WARNING, logger="vmthunder.tree"):
        tree(failing, reg, tmp_path).maintain()
    assert reg.left == [] and "img-b" in failing.templates
    assert "sweep of unused templates failed: img-b is held open" in caplog.text
    assert reg.hosts_published == 1, "the rest of the round still ran"
