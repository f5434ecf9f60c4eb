"""The slow placement loop (planner/solvers/reserve.py): standing replicas for requests that cannot wait
for a load."""
from __future__ import annotations

import pytest

import ditplan.planner.solvers  # noqa: F401  (ortools before pulp)
from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.planner.checker import check_plan
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.metrics import summarize
from ditplan.planner.placement import Placement
from ditplan.planner.policies.base import make_policy
from ditplan.planner.problem import build_problem
from ditplan.planner.request import Request, RequestStatus
from ditplan.planner.simulator import SimConfig, Simulator
from ditplan.planner.solvers.data import build_schedule
from ditplan.planner.solvers.reserve import Arrival, PlacementLoop, Reserve, arrival, erlang_b, reserve_counts
from ditplan.planner.state import PlannerState
from ditplan.planner.whatif import to_requests
from ditplan.planner.workloads import generate

H100 = parse_cluster("8xH100")
COST = CostModel(H100.kind)
IMG, VID = Shape(1024, 1024), Shape(544, 960, 33)


def image(t: float) -> Arrival:
    return Arrival(t, "flux-dev", 4, 1.05, 4.2, True, 0)


def video(t: float) -> Arrival:
    return Arrival(t, "hunyuanvideo", 4, 14.0, 56.0, False, 0)


def test_erlang_b():
    assert erlang_b(0, 0.7) == 1.0
    assert erlang_b(1, 1.0) == pytest.approx(0.5)
    assert erlang_b(2, 1.0) == pytest.approx(0.2)


def test_a_block_is_reserved_only_when_it_beats_giving_its_gpus_to_the_others():
    # Images every 4 s (a 4-GPU block serves 0.19/s of them) against videos that would keep
    # 8 GPUs busy (0.018 on time per GPU-second, 0.07/s for 4 GPUs): one block, not two.
    busy = [image(4.0 * i) for i in range(24)] + [video(12.0 * i) for i in range(8)]
    assert reserve_counts(busy, 96.0, 8) == {"flux-dev": 1}
    # Rare images: the block would idle while videos wait.
    rare = [image(40.0 * i) for i in range(3)] + [video(4.0 * i) for i in range(29)]
    assert reserve_counts(rare, 120.0, 8) == {"flux-dev": 0}
    # No other demand: reserving costs nothing, as many blocks as fit.
    assert reserve_counts([image(4.0 * i) for i in range(24)], 96.0, 8) == {"flux-dev": 2}


def test_an_image_that_cannot_afford_a_load_is_tight_and_a_relaxed_one_is_not():
    def pr(scale):
        req = Request("i", "flux-dev", IMG, 28, 0.0, scale * COST.ideal_latency(get_model("flux-dev"), IMG, 28, 8))
        st = PlannerState(0.0, H100, COST, [RequestStatus(req)], [0.0] * 8, Placement.replicate(8, ["flux-dev"]))
        return build_problem(st).requests[0]
    load_s = get_model("flux-dev").weight_bytes / H100.kind.load_bw
    tight, relaxed = arrival(pr(1.5), 0.0, load_s), arrival(pr(2.0), 0.0, load_s)
    assert (tight.tight, tight.degree) == (True, 4)  # 0.79 s at SP 8 + 0.53 s load > 1.19 s
    assert not relaxed.tight


def test_other_models_avoid_reserved_gpus_and_idle_reserved_gpus_load_the_model():
    flux_half = Placement.of_models([["hunyuanvideo"]] * 5 + [["flux-dev"]] * 3)
    vid = Request("v", "hunyuanvideo", VID, 50, 0.0, 40.0)
    state = PlannerState(0.0, H100, COST, [RequestStatus(vid)], [0.0] * 8, flux_half)
    problem = build_problem(state)
    reserved = {g: "flux-dev" for g in (4, 5, 6, 7)}
    free = build_schedule(problem)
    kept = build_schedule(problem, reserved=reserved)
    assert any(set(a.block) & set(reserved) for a in free.jobs[0].alts)
    assert kept.jobs[0].alts and not any(set(a.block) & set(reserved) for a in kept.jobs[0].alts)

    policy = make_policy("cpsat")
    policy.loop.reserves = (Reserve("flux-dev", (4, 5, 6, 7)),)
    plan = policy.plan(state)
    assert check_plan(state, plan) == []
    assert plan.assignments or plan.loads
    assert all(not set(a.gpus) & set(reserved) for a in plan.assignments)
    flux_loads = {ld.gpu for ld in plan.loads if ld.model == "flux-dev"}
    assert flux_loads == {4}  # the one reserved GPU without FLUX, evicting HunyuanVideo there
    assert {(u.gpu, u.model) for u in plan.unloads if u.gpu in reserved} <= {(4, "hunyuanvideo")}


def tight_trace(n=48, seed=0):
    recs = generate("coserve-mixed", n=n, rate=0.366, seed=seed, videos="hunyuanvideo,wan2.1-t2v-14b")
    return to_requests(recs, COST, H100, 1.5)


def test_reserve_wins_back_tight_images_on_h100():
    """FLUX at SLO scale 1.5 on H100 cannot afford a load: without a standing replica the schedule gives
    every idle GPU to videos and the images miss; with it cpsat beats the best static split."""
    reqs = tight_trace()
    runs = {}
    for name, opts in (("reserve", {}), ("myopic", {"reserve_share": 0.0})):
        sim = Simulator(H100, COST, make_policy("cpsat", **opts), SimConfig(seed=0))
        runs[name] = summarize(sim.run(reqs))
    static = summarize(Simulator(H100, COST, make_policy("genserve"),
                                 SimConfig(seed=0, placement="flux-dev:4,hunyuanvideo:2,wan2.1-t2v-14b:2")).run(reqs))
    ours, myopic = runs["reserve"], runs["myopic"]
    assert ours["finished"] == len(reqs)
    assert ours["slo_attainment_by_kind"]["image"] >= myopic["slo_attainment_by_kind"]["image"] + 0.3
    assert ours["slo_attainment"] >= static["slo_attainment"] + 0.05
    assert ours["slo_attainment"] >= myopic["slo_attainment"] + 0.1
    again = summarize(Simulator(H100, COST, make_policy("cpsat"), SimConfig(seed=0)).run(reqs))
    assert {k: v for k, v in again.items() if k != "solver_ms"} == {k: v for k, v in ours.items() if k != "solver_ms"}


def test_the_loop_reserves_after_enough_arrivals_and_not_when_requests_can_afford_a_load():
    empty = PlannerState(48.0, H100, COST, [], [0.0] * 8, Placement.of_models([["hunyuanvideo"]] * 8))
    problem = build_problem(empty)
    relaxed, tight = PlacementLoop(), PlacementLoop()
    for i in range(16):
        relaxed.arrivals.append(Arrival(3.0 * i, "flux-dev", 4, 1.05, 4.2, False, 0))
        tight.arrivals.append(image(3.0 * i))
    assert relaxed.derive(problem) == ()
    assert tight.derive(problem) == (Reserve("flux-dev", (0, 1, 2, 3)),)  # at most half the node
