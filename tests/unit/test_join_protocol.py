"""The join protocol's values as Python sees them (src/placement/protocol.rs through
src/bindings/tree.rs): one enum of states, records and placements as typed objects, the
transitions checked where a host's own record is made, and the tree following them."""

import pytest

import vmthunder
from tests.unit.test_tree_grants import FakeNode, FakeRegistry, cn1_tree, grant, peer_host
from vmthunder import ImageRecord, InvalidArgument, JoinState, Placement, Policy


def record(**kw):
    rec = {"host": "cn2", "state": "ready", "depth": 2, "parents": ["cn1", "origin"]}
    rec.update(kw)
    return vmthunder.parse_image_record(rec)


def test_states_are_one_enum_spelled_as_records_spell_them():
    assert [str(s) for s in (JoinState.JOINING, JoinState.BUILT, JoinState.READY, JoinState.LEAVING, JoinState.FAILED)] == [
        "joining",
        "built",
        "ready",
        "leaving",
        "failed",
    ]
    built = record(state="joining", built=True)
    assert built.state == JoinState.BUILT and built.to_dict()["state"] == "joining" and built.to_dict()["built"]
    assert record().state == JoinState.READY and "built" not in record().to_dict()
    assert JoinState.BUILT.is_placing and not JoinState.READY.is_placing
    assert len({JoinState.READY, JoinState.READY, JoinState.LEAVING}) == 2


def test_records_are_typed_and_read_back_as_published():
    r = record(failure_domain="rack1", grants={"cn3": {"sealed": "00"}}, extra="dropped")
    assert (r.host, r.depth, r.parents, r.failure_domain) == ("cn2", 2, ["cn1", "origin"], "rack1")
    assert r.grant_for("cn3") == {"sealed": "00"} and r.grant_for("cn4") is None
    assert r.placement == Placement(["cn1", "origin"], 2)
    assert vmthunder.parse_image_record(r.to_dict()) == r
    assert "00" not in repr(r), "a record's repr shows no grant"
    h = vmthunder.parse_host_record({"host": "cn2", "initiator": "iqn.1993-08.org.debian:01:cn2", "export_ip": "198.18.0.2"})
    assert (h.host, h.export_ip, h.failure_domain, h.grant_key) == ("cn2", "198.18.0.2", None, None)


def test_a_hosts_own_record_follows_only_the_protocols_transitions():
    pl = Placement(["cn1", "origin"], 2)
    claim = vmthunder.own_record("cn3", pl, JoinState.JOINING, failure_domain="rack1")
    assert claim.with_state(JoinState.BUILT).with_state(JoinState.READY).state == JoinState.READY
    with pytest.raises(InvalidArgument, match="ready may not become joining"):
        claim.with_state(JoinState.READY).with_state(JoinState.JOINING)
    with pytest.raises(InvalidArgument, match="no record may not publish one that is leaving"):
        vmthunder.own_record("cn3", pl, JoinState.LEAVING)
    assert JoinState.may_follow(None, JoinState.READY)  # a rebuilt relay rejoins
    assert not JoinState.may_follow(JoinState.LEAVING, JoinState.READY)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: Policy(fanout=0), "fanout = 0"),
        (lambda: Policy(max_parents=-1), "max_parents = -1"),
        (lambda: Placement(["cn1"], 2), "origin"),
        (lambda: Placement(["origin"], 0), "depth 0"),
        (lambda: vmthunder.choose_parents("img", "cn1", [], Policy(), granted="cn2"), "granted"),
    ],
)
def test_bad_values_raise_invalid_argument_naming_them(make, needle):
    with pytest.raises(InvalidArgument, match=needle):
        make()


def test_a_join_publishes_its_states_in_the_protocols_order(tmp_path):
    """joining (the claim) -> built -> ready, then leaving when its last VM goes while a child
    still reads from it: every record the tree publishes follows the one before."""
    node, reg = FakeNode(), FakeRegistry()
    reg.publish_host(peer_host("cn2", "iqn.1993-08.org.debian:01:cn2"))
    reg.records["img"] = {"cn0": {"state": "ready", "depth": 1, "parents": ["origin"], "grants": {"cn1": grant("cn0")}}}
    node.reparent = lambda image, sources: "table"
    published = []
    real_publish = reg.publish
    reg.publish = lambda image, rec: (published.append(vmthunder.parse_image_record(rec).state), real_publish(image, rec))[1]
    tree = cn1_tree(
        node,
        reg,
        tmp_path,
        fanout=1,
        leave_timeout_s=0.1,
    )
    tree.attach("img", {"target_iqn": "iqn.x:origin"}, "vm1")
    node.templates = lambda: {"img": type("T", (), {"vms": list(node.images.get("img", [])), "children": ["cn2"]})()}
    tree.detach("vm1")
    firsts = [s for i, s in enumerate(published) if i == 0 or published[i - 1] != s]
    assert firsts == [JoinState.JOINING, JoinState.BUILT, JoinState.READY, JoinState.LEAVING], published
    assert all(JoinState.may_follow(a, b) for a, b in zip([None] + published, published))
    assert isinstance(vmthunder.parse_image_record(reg.records["img"]["cn1"]), ImageRecord)
