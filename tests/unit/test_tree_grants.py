"""Tree upkeep with a fake node and registry (logic only): grants are computed once per host and
template, not on every upkeep round, and a rebuilt template grants afresh."""
import contextlib

from vmthunder.tree import Tree


class FakeNode:
    host = "cn1"

    def __init__(self):
        self.templates = {}
        self.export_calls = []

    def status(self):
        return {"templates": {i: {"vms": list(v), "children": []} for i, v in self.templates.items()}}

    def attach(self, image, sources, vm, snapshot="dm"):
        self.templates.setdefault(image, []).append(vm)
        return f"/dev/mapper/{image}-{vm}"

    def detach(self, vm):
        for image, vms in list(self.templates.items()):
            if vm in vms:
                vms.remove(vm)
                if not vms:
                    del self.templates[image]

    def export_info(self, image, initiator):
        self.export_calls.append((image, initiator))
        return {"target_iqn": f"iqn.x:{image}", "auth_password": f"secret-{len(self.export_calls)}"}


class FakeRegistry:
    def __init__(self):
        self.host_records = {}
        self.records = {}

    def publish_host(self, rec):
        self.host_records[rec["host"]] = dict(rec)

    def hosts(self):
        return [self.host_records[h] for h in sorted(self.host_records)]

    @contextlib.contextmanager
    def lock(self, image, timeout_s):
        yield

    def peers(self, image):
        return [dict(r, host=h) for h, r in sorted(self.records.get(image, {}).items())]

    def publish(self, image, rec):
        self.records.setdefault(image, {})["cn1"] = dict(rec)

    def leave(self, image):
        self.records.get(image, {}).pop("cn1", None)


def test_upkeep_grants_only_new_hosts_and_a_rebuilt_template_grants_again(tmp_path):
    node, reg = FakeNode(), FakeRegistry()
    reg.publish_host({"host": "cn2", "initiator": "iqn.x:cn2"})
    tree = Tree(node, reg, initiator="iqn.x:cn1", export_ip="198.18.0.1", state_dir=str(tmp_path))
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    assert node.export_calls == [("img", "iqn.x:cn2")]
    first = reg.records["img"]["cn1"]["grants"]["cn2"]
    for _ in range(3):
        tree.maintain()
    assert node.export_calls == [("img", "iqn.x:cn2")], "upkeep re-granted a known host"
    reg.publish_host({"host": "cn3", "initiator": "iqn.x:cn3"})
    reg.publish_host({"host": "cn2", "initiator": "iqn.x:cn2-new"})     # cn2 was reinstalled
    tree.maintain()
    assert sorted(node.export_calls[1:]) == [("img", "iqn.x:cn2-new"), ("img", "iqn.x:cn3")]
    grants = reg.records["img"]["cn1"]["grants"]
    assert set(grants) == {"cn2", "cn3"} and grants["cn2"] != first
    tree.detach("vm1")                                    # template gone: its ACLs with it
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm2")
    assert len(node.export_calls) == 5, node.export_calls
