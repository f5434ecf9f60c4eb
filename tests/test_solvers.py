"""The round formulation and its backends: brute force, cross-backend optima, plans, fallbacks.

No timed assertions: solver time limits are only set where a test wants
the time-out path.
"""
from __future__ import annotations

import itertools
import random

import pytest

import planner.solvers  # noqa: F401  (loads ortools before anything imports pulp; see planner/solvers/__init__.py)
from models.catalog import Shape, get_model
from models.cost import CostModel
from planner.checker import check_plan, check_timeline
from planner.cluster import parse_cluster
from planner.metrics import summarize, timeline_records
from planner.policies import make_policy, policy_names
from planner.policies.solver import CpSatPolicy
from planner.problem import RoundProblem, build_problem
from planner.request import Request, RequestState, RequestStatus
from planner.simulator import SimConfig, Simulator
from planner.solvers import SolveStatus, build_options, evaluate, milp, to_plan
from planner.solvers.cpsat import solve as cpsat_solve
from planner.solvers.greedy import greedy
from planner.state import PlannerState
from planner.whatif import to_requests
from planner.workloads import generate

COST = CostModel("H100")
KINDS = [("sd3-medium", Shape(1024, 1024), 28), ("flux-dev", Shape(512, 512), 28),
         ("cogvideox-5b", Shape(480, 720, 17), 50), ("sdxl", Shape(1024, 1024), 30)]


# --- tiny random states -----------------------------------------------------------------
def random_state(seed: int) -> PlannerState:
    """2-4 requests on 2-4 GPUs: every stage, latents, runs just paused, busy GPUs, twins to batch."""
    rng = random.Random(seed)
    cluster = parse_cluster(rng.choice(["2xH100", "4xH100", "2x2xH100"]))
    now = 5.0
    statuses, paused = [], set()
    for i in range(rng.randint(2, 4)):
        model, shape, steps = KINDS[0] if rng.random() < 0.3 else rng.choice(KINDS if rng.random() < 0.15 else KINDS[:3])
        ideal = COST.ideal_latency(get_model(model), shape, steps, cluster.max_node_gpus)
        req = Request(f"r{i}", model, shape, steps, 0.0, now + ideal * rng.uniform(0.3, 3.0))
        stage = rng.choice(["encode", "diffuse", "diffuse", "diffuse", "decode"])
        if stage == "encode":
            st = RequestStatus(req)
        elif stage == "decode":
            st = RequestStatus(req, state=RequestState.PAUSED, encoded=True, steps_done=steps,
                               latent_gpus=(rng.randrange(cluster.size),), sp=1)
        else:
            done = rng.choice([0, rng.randint(1, steps - 1), steps - rng.randint(1, 3)])
            if done == 0:
                st = RequestStatus(req, state=RequestState.PAUSED, encoded=True,
                                   latent_gpus=(rng.randrange(cluster.size),))
            else:
                k = rng.choice([k for k in (1, 2, 4) if k <= cluster.max_node_gpus])
                st = RequestStatus(req, state=RequestState.PAUSED, encoded=True, steps_done=done,
                                   latent_gpus=rng.choice(cluster.blocks(k)), sp=k)
                if rng.random() < 0.5:
                    paused.add(req.id)
        statuses.append(st)
    free = [now - 1 if rng.random() < 0.75 else now + rng.uniform(0.5, 5) for _ in range(cluster.size)]
    busy = [g for g in range(cluster.size) if free[g] > now]
    if busy and rng.random() < 0.6:  # a request with work in flight (planned ahead when H > 1)
        model, shape, steps = rng.choice(KINDS[:3])
        req = Request("f0", model, shape, steps, 0.0, now + rng.uniform(2, 40))
        statuses.append(RequestStatus(req, state=RequestState.RUNNING, encoded=True,
                                      steps_done=rng.randint(1, steps - 1), latent_gpus=(rng.choice(busy),), sp=1))
    served = tuple(sorted({s.request.model for s in statuses}))
    return PlannerState(now, cluster, COST, statuses, free, served, rng.choice([1.0, 2.0]), frozenset(paused))


def brute_force(ro, limit: int = 20_000) -> int | None:
    """Best objective over every choice of at most one option per request per round (None: too many)."""
    per = []
    for ri in ro.reqs:
        combos = [()]
        for h in range(ro.horizon):
            combos = [c + (o,) for c in combos for o in [None, *ri.options[h]]]
        per.append([tuple(i for i in c if i is not None) for c in combos])
    total = 1
    for p in per:
        total *= len(p)
    if total > limit:
        return None
    best = None
    for pick in itertools.product(*per):
        ev = evaluate(ro, [i for c in pick for i in c])
        if ev.feasible and (best is None or ev.objective > best):
            best = ev.objective
    return best


# Limits for solves whose optimum is asserted: these tests check optima, not speed,
# and a loaded 2-core CI machine must not turn a time limit into a failure.
EXACT_LIMIT_S = 120.0


# --- the formulation against brute force ---------------------------------------------------
@pytest.mark.parametrize("horizon,seeds", [(1, range(0, 24)), (2, range(100, 110))])
def test_cpsat_and_cbc_optimum_equals_brute_force_on_tiny_instances(horizon, seeds):
    checked = 0
    for seed in seeds:
        ro = build_options(build_problem(random_state(seed), horizon))
        best = brute_force(ro)
        if best is None:
            continue
        sol = cpsat_solve(ro, time_limit_s=10.0)
        assert sol.status is SolveStatus.OPTIMAL, seed
        assert sol.objective == best, seed
        ev = evaluate(ro, sol.chosen, sol.q)
        assert ev.feasible and ev.objective == best, (seed, ev.problems)
        cbc = milp.solve(ro, EXACT_LIMIT_S, solver="cbc")
        assert cbc.status is SolveStatus.OPTIMAL and cbc.objective == best, seed
        checked += 1
    assert checked >= len(seeds) // 2


def test_cpsat_cbc_and_highs_agree_on_small_instances():
    for seed in (3, 7, 104):
        ro = build_options(build_problem(random_state(seed), 2))
        a = cpsat_solve(ro, time_limit_s=10.0)
        b = milp.solve(ro, EXACT_LIMIT_S, solver="cbc")
        c = milp.solve(ro, EXACT_LIMIT_S, solver="highs")
        assert {a.status, b.status, c.status} == {SolveStatus.OPTIMAL}, seed
        assert a.objective == b.objective == c.objective, seed


def test_greedy_warm_start_is_feasible_in_the_model():
    for seed in range(30):
        ro = build_options(build_problem(random_state(seed), 3))
        chosen, q = greedy(ro)
        ev = evaluate(ro, chosen, q)
        assert ev.feasible, (seed, ev.problems)


# --- plans ----------------------------------------------------------------------------------
def test_every_plan_passes_the_checker_for_each_backend():
    policies = [make_policy(n) for n in ("cpsat", "milp")]
    for seed in range(25):
        state = random_state(seed)
        for pol in policies:
            plan = pol.plan(state)
            assert check_plan(state, plan) == [], (seed, pol.name, plan)
            assert not plan.fallback, (seed, pol.name, plan.stats)


def test_a_running_request_keeps_its_block_and_an_urgent_image_gets_a_free_one():
    cluster = parse_cluster("4xH100")
    video = RequestStatus(Request("v", "cogvideox-5b", Shape(480, 720, 49), 50, 0.0, 400.0),
                          state=RequestState.PAUSED, encoded=True, steps_done=10, latent_gpus=(2, 3), sp=2)
    image = RequestStatus(Request("i", "sd3-medium", Shape(1024, 1024), 28, 0.0, 12.0),
                          state=RequestState.PAUSED, encoded=True, latent_gpus=(0,))
    state = PlannerState(10.0, cluster, COST, [video, image], [0.0] * 4, ("cogvideox-5b", "sd3-medium"),
                         2.0, frozenset({"v"}))
    plan = make_policy("cpsat").plan(state)
    assert check_plan(state, plan) == []
    by_id = {a.request_ids[0]: a for a in plan.assignments}
    assert by_id["v"].gpus == (2, 3)  # placement preserved: no migration, no preemption
    assert set(by_id["i"].gpus) <= {0, 1}


def test_idle_gpus_always_get_best_effort_work():
    """A request that can no longer make it still runs on an idle cluster: on its own block
    (moving it would be a migration), though its block's degree is not its most efficient one."""
    cluster = parse_cluster("8xH100")
    late = RequestStatus(Request("v", "cogvideox-5b", Shape(480, 720, 49), 50, 0.0, 1.0),
                         state=RequestState.PAUSED, encoded=True, steps_done=16, latent_gpus=(4, 5), sp=2)
    fresh = RequestStatus(Request("i", "sd3-medium", Shape(1024, 1024), 28, 0.0, 2.0),
                          state=RequestState.PAUSED, encoded=True, latent_gpus=(0,))
    state = PlannerState(60.0, cluster, COST, [late, fresh], [0.0] * 8, ("cogvideox-5b", "sd3-medium"), 2.0)
    plan = make_policy("cpsat").plan(state)
    assert check_plan(state, plan) == []
    assert {a.request_ids[0] for a in plan.assignments} == {"v", "i"}
    assert next(a for a in plan.assignments if a.request_ids == ("v",)).gpus == (4, 5)


def test_problem_with_in_flight_requests_round_trips_through_json():
    state = random_state(1)
    p = build_problem(state, 3)
    assert RoundProblem.from_dict(p.to_dict()) == p
    running = [s for s in state.requests if s.in_flight]
    assert [r.id for r in p.in_flight] == [s.id for s in running]
    assert all(r.ready_in > 0 for r in p.in_flight)


def test_nothing_to_plan_is_optimal_and_empty():
    cluster = parse_cluster("2xH100")
    state = PlannerState(0.0, cluster, COST, [], [0.0, 0.0], ("flux-dev",), 2.0)
    ro = build_options(build_problem(state, 3))
    sol = cpsat_solve(ro)
    assert sol.status is SolveStatus.OPTIMAL and sol.chosen == ()
    assert to_plan(ro, sol, "cpsat").assignments == ()


# --- simulations -------------------------------------------------------------------------------
def _timeline_ok(requests, cluster, result) -> list[str]:
    recs = timeline_records(result)
    segs = [r for r in recs if r["type"] == "segment"]
    outcomes = {r["id"]: r for r in recs if r["type"] == "request"}
    return check_timeline(requests, cluster, segs, outcomes)


def test_cpsat_simulation_over_a_random_trace_passes_the_timeline_checker():
    cluster = parse_cluster("8xH100")
    requests = to_requests(generate("genserve-mixed", n=40, rate=1.0, seed=3), COST, cluster, 2.5)
    result = Simulator(cluster, COST, exact_cpsat(), SimConfig(seed=3)).run(requests)
    assert _timeline_ok(requests, cluster, result) == []
    assert result.fallbacks == 0
    assert sum(st.finish is not None for st in result.requests) == len(requests)


def exact_cpsat() -> CpSatPolicy:
    """The default cpsat policy, but only its deterministic budget may stop a solve:
    a loaded test machine must not trip the wall-clock net and change outcomes."""
    return CpSatPolicy(wall_safety=1000.0)


def test_a_tiny_time_limit_still_plans_every_round_by_falling_back():
    cluster = parse_cluster("4xH100")
    requests = to_requests(generate("tetriserve-uniform", n=15, rate=2.0, seed=1), COST, cluster, 3.0)
    policy = CpSatPolicy(time_limit_s=1e-4)
    result = Simulator(cluster, COST, policy, SimConfig(seed=1)).run(requests)  # checks every plan
    assert result.fallbacks > 0
    assert _timeline_ok(requests, cluster, result) == []
    assert all(st.finish is not None for st in result.requests)


def test_genserve_figure_1_cpsat_pauses_videos_for_urgent_images():
    """4xH100: four long videos start at t = 0; three tight images arrive at t = 1, 2, 3.

    FCFS at SP 1 holds every GPU with a video until it ends, so the images miss;
    cpsat pauses videos at a step boundary, serves the images, resumes the videos.
    """
    cluster = parse_cluster("4xH100")
    video, image = Shape(480, 720, 49), Shape(1024, 1024)
    ideal_v = COST.ideal_latency(get_model("cogvideox-5b"), video, 50, 4)
    ideal_i = COST.ideal_latency(get_model("sd3-medium"), image, 28, 4)
    requests = [Request(f"v{i}", "cogvideox-5b", video, 50, 0.0, 10 * ideal_v) for i in range(4)]
    requests += [Request(f"i{j}", "sd3-medium", image, 28, t, t + 2.5 * ideal_i)
                 for j, t in enumerate((1.0, 2.0, 3.0))]

    fcfs = summarize(Simulator(cluster, COST, make_policy("fcfs-sp1")).run(requests))
    assert fcfs["slo_attainment_by_kind"] == {"image": 0.0, "video": 1.0}

    result = Simulator(cluster, COST, exact_cpsat()).run(requests)
    s = summarize(result)
    assert s["slo_attainment"] == 1.0 and s["finished"] == 7
    assert s["preemptions"] > 0
    assert result.fallbacks == 0
    assert _timeline_ok(requests, cluster, result) == []


def test_solver_policies_are_registered():
    assert {"cpsat", "milp", "milp-highs"} <= set(policy_names())
