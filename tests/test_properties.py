"""Property: the independent checker passes on every policy's timeline over random traces."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditplan.models.catalog import Shape
from ditplan.models.cost import CostModel
from ditplan.planner.checker import check_timeline
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.metrics import timeline_records
from ditplan.planner.policies.base import policy_names
from ditplan.planner.request import Request
from ditplan.planner.simulator import SimConfig
from ditplan.planner.whatif import run_policies

CLUSTERS = {name: parse_cluster(name) for name in ("4xH100", "8xH100", "2x4xA40")}
COSTS = {name: CostModel(c.kind) for name, c in CLUSTERS.items()}
KINDS = [("flux-dev", (256, 512, 1024, 2048), 1, 28), ("sd3-medium", (512, 1024), 1, 28),
         ("cogvideox-5b", (480,), 17, 20)]


@st.composite
def traces(draw):
    n = draw(st.integers(1, 14))
    out, t = [], 0.0
    for i in range(n):
        model, sizes, frames, steps = draw(st.sampled_from(KINDS))
        side = draw(st.sampled_from(sizes))
        t += draw(st.floats(0.0, 3.0))
        slack = draw(st.floats(1.0, 60.0))
        out.append(Request(f"r{i}", model, Shape(side, side, frames), steps, round(t, 3), round(t + slack, 3)))
    return out


# The MILP backends take up to seconds per plan: fewer examples keep the suite short.
MILP = ("milp", "milp-highs")
FAST = [p for p in policy_names() if p not in MILP]


@pytest.mark.parametrize("policy", MILP)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=traces(), cluster=st.sampled_from(sorted(CLUSTERS)), noise=st.sampled_from([0.0, 0.1]))
def test_milp_timeline_passes_the_checker(policy, reqs, cluster, noise):
    test_every_policy_timeline_passes_the_checker.hypothesis.inner_test(policy, reqs, cluster, noise)


@pytest.mark.parametrize("policy", FAST)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=traces(), cluster=st.sampled_from(sorted(CLUSTERS)), noise=st.sampled_from([0.0, 0.1]))
def test_every_policy_timeline_passes_the_checker(policy, reqs, cluster, noise):
    c = CLUSTERS[cluster]
    run = run_policies(reqs, c, COSTS[cluster], [policy], SimConfig(noise=noise, seed=1))[policy]
    recs = timeline_records(run.result)
    segs = [r for r in recs if r["type"] == "segment"]
    outcomes = {r["id"]: r for r in recs if r["type"] == "request"}
    weights = [r for r in recs if r["type"] in ("load", "unload")]
    assert weights  # the starting placement, at least
    assert check_timeline(reqs, c, segs, outcomes, weights) == []
    # Every request either finishes or is reported unfinished: none silently lost.
    assert run.summary["requests"] == len(reqs)
    assert run.summary["finished"] == sum(o["finish"] is not None for o in outcomes.values())
