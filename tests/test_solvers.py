"""The schedule model and its backends: brute force, cross-backend optima, plans, on-time claims.

No timed assertions: solver time limits are only set where a test wants
the time-out path.
"""
from __future__ import annotations

import itertools
import random

import pytest

import ditplan.planner.solvers  # noqa: F401  (loads ortools before anything imports pulp; see planner/solvers/__init__.py)
from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.planner.checker import check_plan, check_timeline
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.metrics import summarize, timeline_records
from ditplan.planner.policies import make_policy, policy_names
from ditplan.planner.policies.solver import CpSatPolicy
from ditplan.planner.problem import RoundProblem, build_problem
from ditplan.planner.request import Request, RequestState, RequestStatus, Stage
from ditplan.planner.simulator import SimConfig, Simulator
from ditplan.planner.solvers import cpsat, milp
from ditplan.planner.solvers.data import Alt, Job, ScheduleData, ScheduleParams, Weights, build_schedule
from ditplan.planner.solvers.greedy import greedy
from ditplan.planner.solvers.solution import SolveStatus, evaluate
from ditplan.planner.state import PlannerState
from ditplan.planner.whatif import to_requests
from ditplan.planner.workloads import generate

COST = CostModel("H100")
KINDS = [("sd3-medium", Shape(1024, 1024), 28), ("flux-dev", Shape(512, 512), 28),
         ("cogvideox-5b", Shape(480, 720, 17), 50), ("sdxl", Shape(1024, 1024), 30)]
# Tiers close together keep the MILP's floating-point objective exact on small instances.
SMALL = Weights(on_time=10_000_000, preemption=100_000, migration=100_000, gpu_ms=1, finish_ms=1)


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



# --- hand-made schedule data, brute force -------------------------------------------------------
def _alt(block, span, latest, lead=0, diff=None, migrate=False):
    diff = span if diff is None else diff
    return Alt(tuple(block), lead, diff if len(block) > 1 else 0, span, latest,
               span + (len(block) - 1) * (diff if len(block) > 1 else 0), migrate, 0.1, 0.0)


def random_data(seed: int) -> ScheduleData:
    """2-3 jobs on 2 GPUs with tiny integer durations, a batch sharing a member, a busy GPU."""
    rng = random.Random(seed)
    n = rng.randint(2, 3)
    jobs = []
    for j in range(n):
        alts = []
        for blk in rng.sample([(0,), (1,), (0, 1)], rng.randint(1, 3)):
            span = rng.randint(2, 5) if len(blk) == 1 else rng.randint(1, 3)
            alts.append(_alt(blk, span + 1, rng.randint(0, 7), lead=1 if len(blk) > 1 else 0,
                             diff=span, migrate=rng.random() < 0.2))
        jobs.append(Job(j, (f"r{j}",), Stage.DIFFUSE, 5, rng.choice([0, 0, 1]), 1.0, tuple(alts),
                        int(rng.random() < 0.4), False))
    if rng.random() < 0.5:  # a batch of r0 and r1
        jobs.append(Job(n, ("r0", "r1"), Stage.DIFFUSE, 5, 0, 1.0, (_alt((0,), 4, rng.randint(0, 6)),), 0, False))
    members: dict[str, list[int]] = {}
    for job in jobs:
        for rid in job.ids:
            members.setdefault(rid, []).append(job.index)
    busy = {0: 0, 1: rng.choice([0, 0, 2])}
    return ScheduleData((0, 1), busy, tuple(jobs), {k: tuple(v) for k, v in members.items()}, SMALL, 16)


def brute_force(data: ScheduleData) -> int:
    """Best objective over every choice of absent / (alternative, start tick) per job."""
    choices = []
    for job in data.jobs:
        opts = [None] + [(a, s) for a, alt in enumerate(job.alts) for s in range(job.release, alt.latest + 1)]
        choices.append(opts)
    best = None
    for combo in itertools.product(*choices):
        placed = {j: c for j, c in enumerate(combo) if c is not None}
        ev = evaluate(data, placed)
        if ev.feasible and (best is None or ev.objective > best):
            best = ev.objective
    return best


@pytest.mark.parametrize("seed", range(12))
def test_cpsat_and_cbc_optimum_equals_brute_force(seed):
    data = random_data(seed)
    want = brute_force(data)
    sol = cpsat.solve(data, 5.0)
    assert sol.status is SolveStatus.OPTIMAL and sol.objective == want
    assert evaluate(data, sol.placed).objective == want  # the model and the evaluation agree
    cbc = milp.solve(data, 20.0, solver="cbc")
    assert cbc.status is SolveStatus.OPTIMAL and cbc.objective == want
    assert evaluate(data, cbc.placed).feasible


def _small(seed: int) -> list[ScheduleData]:
    state = random_state(seed)
    p = build_problem(state)
    return [build_schedule(p, gpus=node, params=ScheduleParams(weights=SMALL)) for node in p.nodes
            ] if len(p.nodes) > 1 else [build_schedule(p, params=ScheduleParams(weights=SMALL))]


def test_cpsat_cbc_and_highs_agree_on_small_instances():
    checked = 0
    for seed in range(8):
        for data in _small(seed):
            if not data.jobs or sum(len(j.alts) for j in data.jobs) > 12:
                continue
            a = cpsat.solve(data, 10.0)
            b = milp.solve(data, 30.0, solver="cbc")
            c = milp.solve(data, 30.0, solver="highs")
            assert a.status is SolveStatus.OPTIMAL, seed
            for other in (b, c):
                assert other.status is SolveStatus.OPTIMAL, (seed, other.backend)
                assert other.objective == a.objective, (seed, other.backend)
                assert evaluate(data, other.placed).objective == a.objective
            checked += 1
    assert checked >= 4


def test_greedy_warm_start_is_feasible_and_never_beats_the_optimum():
    for seed in range(20):
        for data in _small(seed):
            g = greedy(data)
            ev = evaluate(data, g.placed)
            assert ev.feasible, (seed, ev.problems)
            assert ev.objective == g.objective
            opt = cpsat.solve(data, 5.0, g)
            assert opt.status is SolveStatus.OPTIMAL and opt.objective >= g.objective


def test_every_plan_passes_the_checker_for_each_backend():
    policies = [make_policy(n) for n in ("cpsat", "milp")]
    for seed in range(25):
        state = random_state(seed)
        for pol in policies:
            plan = pol.plan(state)
            assert check_plan(state, plan) == [], (seed, pol.name, plan)
            assert plan.stats.fallback_reason is None, (seed, pol.name, plan.stats)


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


def test_a_late_request_runs_only_in_capacity_no_on_time_request_needs():
    """The late video gets nothing while an on-time image needs its GPUs. Alone, it runs one step at
    a time (preemptible at the next step boundary) on its own block, within half of the node, so
    the other half stays free for arrivals."""
    cluster = parse_cluster("4xH100")
    late = RequestStatus(Request("v", "cogvideox-5b", Shape(480, 720, 49), 50, 0.0, 1.0),
                         state=RequestState.PAUSED, encoded=True, steps_done=16, latent_gpus=(0, 1), sp=2)
    ideal = COST.ideal_latency(get_model("sd3-medium"), Shape(1024, 1024), 28, 4)
    urgent = RequestStatus(Request("i", "sd3-medium", Shape(1024, 1024), 28, 60.0, 60.0 + ideal))
    state = PlannerState(60.0, cluster, COST, [late, urgent], [0.0] * 4, ("cogvideox-5b", "sd3-medium"), 2.0)
    policy = make_policy("cpsat")
    plan = policy.plan(state)
    assert check_plan(state, plan) == []
    by_id = {a.request_ids: a for a in plan.assignments}
    assert by_id[("i",)].stage is Stage.ENCODE and plan.stats.on_time == 1
    (block,) = [b for b, _ in policy._prev.values()]  # the block the schedule keeps for the image
    assert by_id[("i",)].gpus[0] == block[0]
    assert not set(by_id[("v",)].gpus) & set(block)  # the late video runs beside it, never on it
    alone = PlannerState(60.0, cluster, COST, [late], [0.0] * 4, ("cogvideox-5b",), 2.0)
    (a,) = make_policy("cpsat").plan(alone).assignments
    assert a.request_ids == ("v",) and a.gpus == (0, 1) and a.steps == 1
    everything = CpSatPolicy(late_share=1.0).plan(alone)  # no reserve: its own block all the same
    assert [x.gpus for x in everything.assignments] == [(0, 1)]
    one_gpu = parse_cluster("1xH100")  # a node of one GPU still makes progress
    solo = RequestStatus(Request("s", "sd3-medium", Shape(1024, 1024), 28, 0.0, 0.5))
    st = PlannerState(60.0, one_gpu, COST, [solo], [0.0], ("sd3-medium",), 2.0)
    assert [x.request_ids for x in make_policy("cpsat").plan(st).assignments] == [("s",)]


def test_nothing_to_plan_is_optimal_and_empty():
    data = ScheduleData((0, 1), {0: 0, 1: 0}, (), {})
    sol = cpsat.solve(data)
    assert sol.status is SolveStatus.OPTIMAL and sol.placed == {}
    cluster = parse_cluster("2xH100")
    state = PlannerState(0.0, cluster, COST, [], [0.0, 0.0], ("flux-dev",), 2.0)
    assert make_policy("cpsat").plan(state).assignments == ()


def test_batching_shares_one_forward_pass_when_it_keeps_more_requests_on_time():
    """Four identical images, one GPU, deadlines that one batch meets and one-by-one does not."""
    cluster = parse_cluster("1xH100")
    shape = Shape(512, 512)
    spec = get_model("sd3-medium")
    alone = COST.ideal_latency(spec, shape, 28, 1)
    batch = COST.encode_time(spec, shape, 4) + 28 * COST.step_time(spec, shape, 1, 4) + COST.decode_time(spec, shape, 4)
    assert batch < 2 * alone  # so four in one batch beat four in a row
    reqs = [RequestStatus(Request(f"r{i}", "sd3-medium", shape, 28, 0.0, 1.05 * batch)) for i in range(4)]
    state = PlannerState(0.0, cluster, COST, reqs, [0.0], ("sd3-medium",), 2.0)
    plan = make_policy("cpsat").plan(state)
    assert check_plan(state, plan) == []
    assert [sorted(a.request_ids) for a in plan.assignments] == [["r0", "r1", "r2", "r3"]]
    result = Simulator(cluster, COST, make_policy("cpsat")).run([r.request for r in reqs])
    assert summarize(result)["slo_attainment"] == 1.0


# --- simulations -------------------------------------------------------------------------------
def _timeline_ok(requests, cluster, result) -> list[str]:
    recs = timeline_records(result)
    segs = [r for r in recs if r["type"] == "segment"]
    outcomes = {r["id"]: r for r in recs if r["type"] == "request"}
    return check_timeline(requests, cluster, segs, outcomes)


def test_cpsat_simulation_over_a_random_trace_passes_the_timeline_checker():
    cluster = parse_cluster("8xH100")
    requests = to_requests(generate("genserve-mixed", n=40, rate=1.0, seed=3), COST, cluster, 2.5)
    result = Simulator(cluster, COST, make_policy("cpsat"), SimConfig(seed=3)).run(requests)
    assert _timeline_ok(requests, cluster, result) == []
    assert result.fallbacks == 0
    assert all(st.state is RequestState.DONE for st in result.requests)  # every request terminal: done


@pytest.mark.parametrize("model,shape,steps", [("flux-dev", Shape(2048, 2048), 28), ("flux-dev", Shape(256, 256), 28),
                                               ("sd3-medium", Shape(1024, 1024), 28),
                                               ("cogvideox-5b", Shape(480, 720, 49), 50)])
def test_a_zero_slack_request_is_served_on_time_on_an_idle_cluster(model, shape, steps):
    cluster = parse_cluster("8xH100")
    ideal = COST.ideal_latency(get_model(model), shape, steps, 8)
    req = Request("z", model, shape, steps, 3.217, 3.217 + ideal)  # slo scale 1.0: exactly zero slack
    result = Simulator(cluster, COST, make_policy("cpsat")).run([req])
    (st,) = result.requests
    assert st.met, (st.finish, req.deadline)


def test_on_time_claims_hold_in_seconds():
    """All requests known at t = 0, no noise: what the first plan claims on time is met."""
    cluster = parse_cluster("4xH100")
    records = generate("genserve-mixed", n=14, rate=1e6, seed=5)  # everything arrives at once
    requests = to_requests(records, COST, cluster, 1.6)
    claims = []
    policy = make_policy("cpsat")
    result = Simulator(cluster, COST, policy, on_plan=lambda s, p: claims.append(getattr(p.stats, "on_time", None))).run(requests)
    met_n = sum(st.met for st in result.requests)
    assert 0 < claims[0] <= met_n < len(requests)  # a loaded instance, and no claim was broken


def test_late_reject_ends_lost_requests_with_a_reason():
    cluster = parse_cluster("2xH100")
    requests = to_requests(generate("tetriserve-skewed", n=30, rate=3.0, seed=2), COST, cluster, 1.2)
    result = Simulator(cluster, COST, CpSatPolicy(late="reject")).run(requests)
    rejected = [st for st in result.requests if st.state is RequestState.FAILED]
    assert rejected and all(st.rejected and "deadline" in st.rejected for st in rejected)
    assert all(st.state is RequestState.DONE for st in result.requests if st not in rejected)
    s = summarize(result)
    assert s["rejected"] == len(rejected) and s["finished"] + s["rejected"] == len(requests)
    served = summarize(Simulator(cluster, COST, CpSatPolicy()).run(requests))
    assert served["rejected"] == 0 and served["finished"] == len(requests) and served["late_finished"] > 0
    with pytest.raises(ValueError, match="late"):
        CpSatPolicy(late="drop")


def test_a_tiny_time_limit_still_gives_valid_plans():
    cluster = parse_cluster("4xH100")
    requests = to_requests(generate("tetriserve-uniform", n=15, rate=2.0, seed=1), COST, cluster, 3.0)
    policy = CpSatPolicy(time_limit_s=1e-6)
    result = Simulator(cluster, COST, policy, SimConfig(seed=1)).run(requests)  # checks every plan
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

    result = Simulator(cluster, COST, make_policy("cpsat")).run(requests)
    s = summarize(result)
    assert s["slo_attainment"] == 1.0 and s["finished"] == 7
    assert s["preemptions"] > 0
    assert result.fallbacks == 0
    assert _timeline_ok(requests, cluster, result) == []


def test_solver_policies_are_registered():
    assert {"cpsat", "milp", "milp-highs"} <= set(policy_names())


def test_scopes_keep_latents_on_their_node_and_pack_fresh_work_best_fit():
    from ditplan.planner.policies.solver import scopes

    cluster = parse_cluster("2x4xH100")
    pinned = RequestStatus(Request("p", "flux-dev", Shape(1024, 1024), 28, 0.0, 50.0), state=RequestState.PAUSED,
                           encoded=True, steps_done=3, latent_gpus=(0, 1), sp=2)
    busy = [9.0, 9.0, 9.0, 9.0, 0.0, 0.0, 0.0, 0.0]  # node 0 busy for 8 s, node 1 idle

    def split(deadline: float) -> dict:
        fresh = [RequestStatus(Request(f"f{i}", "flux-dev", Shape(1024, 1024), 28, 0.0, deadline + i))
                 for i in range(3)]
        state = PlannerState(1.0, cluster, COST, [pinned, *fresh], busy, ("flux-dev",), 2.0)
        return {gpus: sorted(r.id for r in reqs) for gpus, reqs in scopes(build_problem(state))}

    urgent = split(4.0)  # cannot wait for node 0: the idle node
    assert urgent[(0, 1, 2, 3)] == ["p"] and urgent[(4, 5, 6, 7)] == ["f0", "f1", "f2"]
    relaxed = split(60.0)  # on time either way: packed onto the busy node, node 1 stays whole
    assert relaxed == {(0, 1, 2, 3): ["f0", "f1", "f2", "p"]}


def test_cpsat_is_deterministic_under_cpu_load():
    """Only CP-SAT's deterministic limit stops a solve in simulations: a loaded machine gives the same bytes."""
    import json
    import subprocess
    import sys

    cluster = parse_cluster("8xH100")
    requests = to_requests(generate("genserve-mixed", n=40, rate=1.0, seed=4), COST, cluster, 1.5)

    def run() -> str:
        result = Simulator(cluster, COST, make_policy("cpsat"), SimConfig(seed=4)).run(requests)
        return json.dumps(timeline_records(result))

    quiet = run()
    hogs = [subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 120\nwhile time.time() < t: pass"])
            for _ in range(3)]
    try:
        loaded = run()
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert loaded == quiet
