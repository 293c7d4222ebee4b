"""Placement with concurrent joiners: many processes on one real etcd, each following the join
protocol that `vmthunder.tree` runs (choose -> image lock -> read again -> keep the choice if it
holds, else choose again -> publish the claim; src/placement/protocol.rs), form a valid relay
tree: fan-out never exceeded, depth <= ceil(log_k N) + 1, no cycles, failure domains spread."""

import math
import multiprocessing
import traceback
import uuid

import vmthunder
from tests.registry import registry_workers as W
from vmthunder.registry import Registry

N = 12
K = 3
DOMAINS = ["rack1", "rack2", "rack3"]


def place_joiner(url, host, domain, image_id, barrier, done, results):
    out = {"host": host}
    reg = Registry(url, host, lease_s=10.0, timeout_s=10)
    policy = vmthunder.Policy(fanout=K, max_parents=2)

    def records():
        return [vmthunder.parse_image_record(r) for r in reg.peers(image_id)]

    def choose(recs, previous=None):
        # Every joiner here counts every peer as having granted it (no exports in this test).
        return vmthunder.choose_parents(
            image_id, host, recs, policy, failure_domain=domain, granted=[r.host for r in recs], previous=previous
        )

    try:
        reg.start()
        barrier.wait(60)
        choice = choose(records())
        with reg.lock(image_id, timeout_s=120):
            recs = records()
            placement = choose(recs, previous=choice)
            claim = vmthunder.own_record(host, placement, vmthunder.JoinState.JOINING, failure_domain=domain)
            reg.publish(image_id, claim.to_dict())
            # Its export verified at once: ready before the next joiner reads.
            reg.publish(image_id, claim.with_state(vmthunder.JoinState.READY).to_dict())
        out["placement"] = {"parents": placement.parents, "depth": placement.depth}
        out["order"] = len(recs)  # joins are serialized by the lock: how many came before
        out["seen"] = [
            {"host": r.host, "state": str(r.state), "depth": r.depth, "failure_domain": r.failure_domain, "parents": r.parents}
            for r in recs
        ]
    except BaseException:
        out["error"] = traceback.format_exc()
    results.put(out)
    done.wait(120)
    reg.stop()


def secondary_candidates(peers, depth, primary_domain, primary):
    """Peers (as a joiner saw them) of a domain other than its primary's that could have been
    its secondary parent: ready, no deeper than the joiner, fewer than K secondary children."""
    secondary_kids = {}
    for p in peers:
        for q in p["parents"][1:]:
            if q != "origin":
                secondary_kids[q] = secondary_kids.get(q, 0) + 1
    return [
        p["host"]
        for p in peers
        if p["host"] != primary
        and p["state"] == "ready"
        and p["depth"] <= depth
        and p["failure_domain"] != primary_domain
        and secondary_kids.get(p["host"], 0) < K
    ]


def test_concurrent_joiners_form_a_valid_tree(etcd_url):
    img = "img-" + uuid.uuid4().hex[:12]
    ctx = multiprocessing.get_context(W.FORK)
    barrier, done, results = ctx.Barrier(N), ctx.Event(), ctx.Queue()
    W.prewarm()
    procs = [
        ctx.Process(target=place_joiner, args=(etcd_url, f"cn{i}", DOMAINS[i % 3], img, barrier, done, results), daemon=True)
        for i in range(N)
    ]
    for p in procs:
        p.start()
    try:
        outs = [results.get(timeout=240) for _ in procs]
        errors = [o["error"] for o in outs if "error" in o]
        assert not errors, "\n".join(errors)
        with Registry(etcd_url, "observer", lease_s=10.0) as obs:
            recs = {r["host"]: r for r in obs.peers(img)}
    finally:
        done.set()
        for p in procs:
            p.join(20)
            W.kill(p)
    assert sorted(recs) == sorted(f"cn{i}" for i in range(N))
    seen_at_join = {o["host"]: o["seen"] for o in outs}
    primaries = [r["parents"][0] for r in recs.values()]
    for parent in set(primaries):
        assert primaries.count(parent) <= K, f"fan-out of {parent} exceeded: {primaries}"
    bound = math.ceil(math.log(N, K)) + 1
    for host, r in recs.items():
        assert "origin" in r["parents"], "the origin is always kept (first as primary, else last resort)"
        assert r["parents"][0] == "origin" or r["parents"][-1] == "origin"
        path, cur = [], host
        while cur != "origin":
            assert cur not in path, f"cycle: {path + [cur]}"
            path.append(cur)
            cur = recs[cur]["parents"][0]
        assert len(path) == r["depth"] <= bound, (host, path, bound)
        peers_ = [p for p in r["parents"] if p != "origin"]
        if len(peers_) == 2 and recs[peers_[0]]["failure_domain"] == recs[peers_[1]]["failure_domain"]:
            # Same domain only when, at join time, no peer of another domain could be a secondary
            # (ready, at most the newcomer's depth, a free secondary slot). Random join orders
            # leave one domain alone at the top in ~5 % of runs (CI saw cn6 under cn11 + cn2).
            other = secondary_candidates(seen_at_join[host], r["depth"], recs[peers_[0]]["failure_domain"], peers_[0])
            assert not other, f"{host}: both parents in one failure domain {peers_} while {other} were free"
    # A child under a parent of its own domain only when no parent of another domain at the
    # same depth had a free slot when it joined (the ranking: shallowest, then a parent of
    # another domain). A parent with a free slot at the end had one all along, and one that
    # joined before the child existed for it. (Spreading one parent's children over domains
    # ranks below that, so racing joins can pile one domain under a parent of another domain:
    # CI saw ['rack3'] x 3 under a rack1 parent; the Rust property tests cover the spreading.)
    order = {o["host"]: o["order"] for o in outs}
    kids_of = {p: primaries.count(p) for p in set(primaries)}
    for child, r in recs.items():
        parent = r["parents"][0]
        if parent == "origin" or recs[parent]["failure_domain"] != r["failure_domain"]:
            continue
        better = [
            q
            for q, rq in recs.items()
            if q not in (child, parent)
            and order[q] < order[child]
            and rq["depth"] == recs[parent]["depth"]
            and rq["failure_domain"] != r["failure_domain"]
            and kids_of.get(q, 0) < K
        ]
        assert not better, f"{child} ({r['failure_domain']}) joined {parent} of its own domain while {better} had room"
