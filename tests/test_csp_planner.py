"""CSP batches on the planner side: the predictor, the batching rule, the schedule model's CSP jobs, the peers.

The executor side (packed forwards equal to per-request runs) is tests/test_csp.py and tests/test_csp_unet.py.
"""
from __future__ import annotations

import math

import pytest

import ditplan.planner.solvers  # noqa: F401  (loads ortools before pulp)
from ditplan.models import csp
from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.models.profiles import CspPoint, ProfileError, parse_profile
from ditplan.planner.checker import check_plan, check_timeline
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.metrics import timeline_records
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies import make_policy
from ditplan.planner.problem import RoundProblem, build_problem
from ditplan.planner.request import Request, RequestState, RequestStatus, Stage, batch_conflict
from ditplan.planner.simulator import SimConfig, Simulator
from ditplan.planner.solvers import cpsat, milp
from ditplan.planner.solvers.data import ScheduleParams, build_schedule, group_cost
from ditplan.planner.state import PlannerState
from ditplan.planner.whatif import to_requests
from ditplan.planner.workloads import generate

COST = CostModel("H100")
SD3 = get_model("sd3-medium")
C1 = parse_cluster("1xH100")
C8 = parse_cluster("8xH100")
SIDES = (512, 768, 1024)


def req(rid, side, deadline=1e6, steps=28, model="sd3-medium", arrival=0.0):
    return Request(rid, model, Shape(side, side), steps, arrival, deadline)


def state_of(statuses, cluster=C1, now=0.0):
    return PlannerState(now, cluster, COST, list(statuses), [now] * cluster.size,
                        tuple(sorted({s.request.model for s in statuses})), 2.0)


# --- the predictor ---------------------------------------------------------------------

def test_patch_count_is_256_px_patches():
    assert [csp.patch_count(SD3, Shape(s, s)) for s in SIDES] == [4, 9, 16]
    assert csp.patch_count(SD3, Shape(512, 1024)) == 8


def test_prior_fit_tracks_same_shape_batches_of_the_cost_model():
    fit = COST.csp.fit("sd3-medium", 1)
    assert fit.prior_points >= 16 and fit.measured_points == 0
    for side in SIDES:
        for b in (1, 2, 4):
            truth = COST.step_time(SD3, Shape(side, side), 1, b)
            assert COST.csp.step_time(SD3, [Shape(side, side)] * b, 1) == pytest.approx(truth, rel=0.25)
    assert fit.max_rel_error < 0.25
    # The resolution term starts at its prior share of the fixed cost.
    assert fit.coef[4] == pytest.approx(csp.RESOLUTION_PRIOR * fit.coef[0])


def test_mixed_batch_is_cheaper_than_its_members_alone_and_dearer_than_the_largest():
    shapes = [Shape(s, s) for s in SIDES]
    mixed = COST.batch_step_time(SD3, shapes, 1)
    alone = sum(COST.step_time(SD3, s, 1) for s in shapes)
    assert COST.step_time(SD3, shapes[-1], 1) < mixed < alone


def test_measured_steps_refit_the_predictor():
    cost = CostModel("H100")
    shapes = [Shape(512, 512), Shape(1024, 1024)]
    before = cost.csp.step_time(SD3, shapes, 1)
    for _ in range(8):  # the executor measures this mix 1.5x slower than predicted
        cost.csp.observe("sd3-medium", shapes, 1, 1.5 * before)
    after = cost.csp.step_time(SD3, shapes, 1)
    assert after == pytest.approx(1.5 * before, rel=0.1)
    assert cost.csp.fit("sd3-medium", 1).measured_points == 8
    # Shared by every corrected view of the cost model.
    assert cost.with_corrections({}).csp.step_time(SD3, shapes, 1) == after
    with pytest.raises(ValueError, match="seconds"):
        cost.csp.observe("sd3-medium", shapes, 1, -1.0)


def test_no_csp_for_a_model_without_it():
    with pytest.raises(ValueError, match="no CSP"):
        COST.csp.fit("cogvideox-5b", 1)
    with pytest.raises(ValueError, match="cannot batch shapes"):
        COST.batch_step_time(get_model("cogvideox-5b"), [Shape(480, 720, 49), Shape(480, 720, 17)], 1)


def test_profile_csp_rows_round_trip_and_feed_the_predictor():
    doc = {"name": "t", "gpu": "H100", "points": [],
           "csp": [{"model": "sd3-medium", "shapes": [[512, 512, 1], [1024, 1024, 1]], "sp": 1, "step_s": 0.5}]}
    prof = parse_profile(doc)
    assert prof.csp == (CspPoint("sd3-medium", (Shape(512, 512), Shape(1024, 1024)), 1, 0.5),)
    assert parse_profile(prof.to_doc()) == prof
    cost = CostModel("H100", profiles=[*COST.profiles, prof])
    assert cost.csp.fit("sd3-medium", 1).measured_points == 1
    bad = {**doc, "csp": [{**doc["csp"][0], "model": "cogvideox-5b"}]}
    with pytest.raises(ProfileError, match="csp\\[0\\].*'model'"):
        parse_profile(bad)


def test_mixed_encode_and_decode_run_per_shape():
    shapes = [Shape(512, 512), Shape(512, 512), Shape(1024, 1024)]
    enc = COST.stage_time("encode", SD3, shapes)
    assert enc == pytest.approx(COST.encode_time(SD3, shapes[0], 2) + COST.encode_time(SD3, shapes[2], 1))
    assert csp.shape_groups(["a"] * 5 + ["b"], lambda key: 2) == [("a", 2), ("a", 2), ("a", 1), ("b", 1)]


# --- the batching rule -----------------------------------------------------------------

def test_batch_rule_allows_mixed_sizes_and_progress_only_with_csp():
    a, b = req("a", 512), req("b", 1024)
    assert batch_conflict([a, b], [0, 5]) is None
    assert "more than 12" in batch_conflict([req(f"r{i}", 512) for i in range(13)])
    cog = dict(model="cogvideox-5b", steps=50)
    v1 = Request("v1", shape=Shape(480, 720, 49), arrival=0.0, deadline=1e6, **cog)
    v2 = Request("v2", shape=Shape(480, 720, 49), arrival=0.0, deadline=1e6, **cog)
    assert batch_conflict([v1, v2], [0, 0]) is None
    assert "step positions" in batch_conflict([v1, v2], [0, 3])
    v3 = Request("v3", shape=Shape(480, 720, 17), arrival=0.0, deadline=1e6, **cog)
    assert batch_conflict([v1, v3]) == "batch mixes incompatible requests"


def test_checker_takes_a_csp_batch_and_refuses_a_mixed_video_batch():
    sts = [RequestStatus(req(f"r{s}", s), state=RequestState.PAUSED, encoded=True, latent_gpus=(0,))
           for s in SIDES]
    st = state_of(sts)
    plan = RoundPlan((Assignment(tuple(s.id for s in sts), Stage.DIFFUSE, (0,), 3),))
    assert check_plan(st, plan) == []
    cog = dict(model="cogvideox-5b", steps=50, arrival=0.0, deadline=1e6)
    vids = [RequestStatus(Request(f"v{i}", shape=Shape(480, 720, 49), **cog), state=RequestState.PAUSED,
                          encoded=True, steps_done=i, latent_gpus=(0,)) for i in (1, 2)]
    plan = RoundPlan((Assignment(("v1", "v2"), Stage.DIFFUSE, (0,), 1),))
    assert any("step positions" in p for p in check_plan(state_of(vids), plan))


# --- the schedule model ----------------------------------------------------------------

def _fresh_problem(sides, deadline_scale=10.0, cluster=C1) -> RoundProblem:
    sts = []
    for i, side in enumerate(sides):
        r = req(f"r{i}", side)
        ideal = COST.ideal_latency(SD3, r.shape, 28, 1)
        sts.append(RequestStatus(Request(r.id, r.model, r.shape, 28, 0.0, deadline_scale * ideal)))
    return build_problem(state_of(sts, cluster))


def test_schedule_offers_csp_batches_and_cpsat_nocsp_does_not():
    problem = _fresh_problem(SIDES)
    with_csp = build_schedule(problem)
    mixed = [j for j in with_csp.jobs if len({problem.requests_by_id[r].batch_key for r in j.ids}) > 1]
    assert mixed and max(len(j.ids) for j in mixed) == 3
    assert not [j for j in build_schedule(problem, params=ScheduleParams(csp=False)).jobs if len(j.ids) > 1]
    # The job's step time is the problem's predictor (what the simulator charges).
    three = next(j for j in mixed if len(j.ids) == 3)
    gc = group_cost([problem.requests_by_id[r] for r in three.ids], problem)
    assert gc.step[1] == pytest.approx(COST.batch_step_time(SD3, [Shape(s, s) for s in SIDES], 1))


def test_cpsat_and_cbc_agree_on_a_csp_schedule():
    data = build_schedule(_fresh_problem(SIDES + (512,), deadline_scale=2.5))
    a = cpsat.solve(data, time_limit_s=5.0)
    b = milp.solve(data, time_limit_s=30.0, solver="cbc")
    assert a.status.value == b.status.value == "optimal"
    assert a.objective == b.objective


def test_one_gpu_serves_more_on_time_with_csp():
    """Three sizes at once on one GPU, due a little after their CSP batch would end: one batch meets every
    deadline, one request after another (no two share a shape) cannot."""
    shapes = [Shape(s, s) for s in SIDES]
    chain = (COST.stage_time("encode", SD3, shapes) + 28 * COST.batch_step_time(SD3, shapes, 1)
             + COST.stage_time("decode", SD3, shapes))
    reqs = [Request(f"r{i}", "sd3-medium", sh, 28, 0.0, 1.05 * chain) for i, sh in enumerate(shapes)]
    met = {}
    for name in ("cpsat", "cpsat-nocsp"):
        res = Simulator(C1, COST, make_policy(name), SimConfig(seed=0)).run(reqs)
        met[name] = sum(st.met for st in res.requests)
        assert check_timeline(reqs, C1, [r for r in timeline_records(res) if r["type"] == "segment"]) == []
    assert met == {"cpsat": 3, "cpsat-nocsp": 2}


def test_the_timeline_lists_every_member_of_a_csp_batch():
    reqs = [Request(f"r{i}", "sd3-medium", Shape(s, s), 28, 0.0, 1e6) for i, s in enumerate(SIDES)]
    res = Simulator(C1, COST, make_policy("patchedserve"), SimConfig(seed=0)).run(reqs)
    segs = [r for r in timeline_records(res) if r["type"] == "segment" and r["stage"] == "diffuse"]
    assert any(set(s["request_ids"]) == {"r0", "r1", "r2"} for s in segs)
    assert check_timeline(reqs, C1, [r for r in timeline_records(res) if r["type"] == "segment"]) == []


# --- the peers -------------------------------------------------------------------------

def _trace(rate, scale, n=60):
    return to_requests(generate("patchedserve-mixed", n=n, rate=rate, seed=3), COST, C8, scale)


@pytest.mark.parametrize("name", ["patchedserve", "nirvana-like", "distrifusion"])
def test_peers_end_every_request_and_pass_the_checker(name):
    reqs = _trace(12.0, 3.0)
    res = Simulator(C8, COST, make_policy(name), SimConfig(seed=0)).run(reqs)
    assert check_timeline(reqs, C8, [r for r in timeline_records(res) if r["type"] == "segment"]) == []
    assert all(st.state in (RequestState.DONE, RequestState.FAILED) for st in res.requests)
    diffuse = [s for s in res.segments if s.stage is Stage.DIFFUSE]
    if name == "distrifusion":
        assert {s.sp for s in diffuse} == {8} and all(len(s.request_ids) == 1 for s in diffuse)
    else:
        assert {s.sp for s in diffuse} == {1}
        mixed = sum(len({st.request.shape for st in res.requests if st.id in s.request_ids}) > 1 for s in diffuse)
        assert (mixed > 0) == (name == "patchedserve")


def test_patchedserve_aborts_what_cannot_make_it_and_says_why():
    reqs = _trace(24.0, 1.5)
    res = Simulator(C8, COST, make_policy("patchedserve"), SimConfig(seed=0)).run(reqs)
    rejected = [st for st in res.requests if st.rejected]
    assert rejected and all(st.rejected.startswith("aborted:") for st in rejected)
    assert all(not st.met for st in rejected)


def test_patchedserve_batches_by_slack_within_its_limit():
    policy = make_policy("patchedserve")
    sts = [RequestStatus(req(f"r{i}", SIDES[i % 3], deadline=100.0), state=RequestState.PAUSED, encoded=True,
                         latent_gpus=(0,)) for i in range(15)]
    plan = policy.plan(state_of(sts))
    assert check_plan(state_of(sts), plan) == []
    (a,) = plan.assignments
    assert len(a.request_ids) == csp.MAX_BATCH and a.steps == 1
    # A tight deadline keeps the batch small: its member would miss in a bigger one.
    tight = [RequestStatus(req("t", 1024, deadline=28 * COST.step_time(SD3, Shape(1024, 1024), 1) * 1.2
                               + COST.decode_time(SD3, Shape(1024, 1024))),
                           state=RequestState.PAUSED, encoded=True, latent_gpus=(0,)), *sts]
    plan = make_policy("patchedserve").plan(state_of(tight))
    assert "t" in plan.assignments[0].request_ids and len(plan.assignments[0].request_ids) < csp.MAX_BATCH
    assert math.isfinite(COST.csp.step_time(SD3, [Shape(512, 512)] * 12, 1))


# --- online refit in the service -------------------------------------------------------

def test_the_service_refits_the_predictor_from_csp_step_reports(tmp_path):
    from ditplan.planner.service.admission import RequestSpec
    from ditplan.planner.service.clock import ManualClock
    from ditplan.planner.service.core import CoreConfig, PlannerCore
    from ditplan.planner.service.journal import Journal
    from ditplan.planner.service.messages import StepReport

    journal, recovered = Journal.open(tmp_path / "state")
    cost = CostModel("H100")
    core = PlannerCore(CoreConfig(cluster=C1, cost=cost, policy="patchedserve"), journal, recovered, ManualClock())
    try:
        sess = core.connect_executor("ex", [0], heartbeats=False)
        core.submit([RequestSpec(f"r{s}", "sd3-medium", s, s, 1, 28, deadline_in_s=1e4) for s in SIDES])
        shapes = [Shape(s, s) for s in SIDES]
        before = cost.csp.step_time(SD3, shapes, 1)
        seen = None
        for _ in range(4):
            core.plan_once()
            while (d := sess.next(0)) is not None:
                for a in d.assignments:
                    steps = (3 * before,) * a.steps if a.stage is Stage.DIFFUSE else ()
                    if a.stage is Stage.DIFFUSE:
                        seen = a
                    core.report(StepReport(sess.id, d.plan_epoch, a.request_ids, a.stage, a.steps, steps, True,
                                           session_secret=sess.secret), wait=True)
            if seen is not None:
                break
        assert seen is not None and len(seen.request_ids) == 3
        assert cost.csp.fit("sd3-medium", 1).measured_points == 1
        assert cost.csp.step_time(SD3, shapes, 1) > 1.5 * before  # moved towards the 3x measurement
    finally:
        core.stop()
        journal.close()


# --- saturation ------------------------------------------------------------------------

def test_efficient_degrees_keep_parallel_efficiency():
    from ditplan.planner.solvers.data import efficient_degrees

    step = {1: 1.0, 2: 0.6, 4: 0.35, 8: 0.4}
    assert efficient_degrees(step) == [1, 2, 4]  # 8 is not faster than 4
    assert efficient_degrees(step, 0.8) == [1, 2]  # 4: 1 / (4 x 0.35) = 0.71


def test_a_saturated_schedule_offers_a_wide_block_only_to_a_job_that_needs_it():
    shape = Shape(1024, 1024)
    k1 = COST.ideal_latency(SD3, shape, 28, 1)
    k2 = (COST.encode_time(SD3, shape) + 28 * COST.step_time(SD3, shape, 2, link_bw=C8.block_bandwidth((0, 1)))
          + COST.decode_time(SD3, shape))
    assert k2 < k1 and COST.step_time(SD3, shape, 1) / (2 * COST.step_time(SD3, shape, 2)) < 0.8
    sts = [RequestStatus(Request("tight", "sd3-medium", shape, 28, 0.0, (k1 + k2) / 2)),
           RequestStatus(Request("loose", "sd3-medium", shape, 28, 0.0, 3 * k1))]
    problem = build_problem(state_of(sts, C8))
    data = build_schedule(problem, params=ScheduleParams(batching=False, min_efficiency=0.8))
    degrees = {problem.requests_by_id[j.ids[0]].id: {a.k for a in j.alts} for j in data.jobs}
    assert degrees["loose"] == {1} and 2 in degrees["tight"]
