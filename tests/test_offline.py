"""Offline bound (planner/offline/): a checkable schedule and a valid upper bound."""
import itertools

import pytest

from ditplan.models.catalog import Shape
from ditplan.models.cost import CostModel
from ditplan.planner.checker import check_timeline
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.execution import EPS
from ditplan.planner.metrics import summarize, timeline_records
from ditplan.planner.offline import POLICY_NAME, bound, fit, schedule, solve_offline
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import Policy, policy_names
from ditplan.planner.request import Request, RequestState, Stage
from ditplan.planner.runners import runner_names
from ditplan.planner.simulator import SimConfig, Simulator
from ditplan.planner.whatif import run_policies, to_requests
from ditplan.planner.workloads import generate

COST = CostModel("H100")
C4 = parse_cluster("4xH100")
C8 = parse_cluster("8xH100")
BASELINES = ("fcfs-sp1", "fcfs-sp8", "edf", "tetriserve-dp")


def check(reqs, cluster, result):
    """check_timeline's problems with ``result`` (a SimResult)."""
    recs = timeline_records(result)
    segs = [r for r in recs if r["type"] == "segment"]
    outcomes = {r["id"]: r for r in recs if r["type"] == "request"}
    return check_timeline(reqs, cluster, segs, outcomes)


def flux(rid, side, arrival, scale, cluster=C4):
    shape = Shape(side, side)
    ideal = COST.ideal_latency(Request(rid, "flux-dev", shape, 28, 0, 1).spec, shape, 28, cluster.max_node_gpus)
    return Request(rid, "flux-dev", shape, 28, arrival, arrival + scale * ideal)


@pytest.fixture(scope="module")
def small():
    reqs = to_requests(generate("tetriserve-uniform", n=10, seed=0, rate=4.0), COST, C4, 1.5)
    # The arguments the offline-bound runner passes for --offline-budget 0.4 and seed 0.
    return reqs, solve_offline(reqs, C4, COST, time_limit_s=60, seed=0, deterministic_time=0.4)


def test_schedule_passes_the_checker_and_summarizes(small):
    reqs, res = small
    assert check(reqs, C4, res.result) == []
    assert res.result.policy == "offline-bound"
    summary = summarize(res.result)
    assert summary["requests"] == 10
    assert summary["slo_attainment"] == pytest.approx(res.attainment, abs=1e-6)
    assert res.met == round(res.attainment * 10)
    assert all(st.state in (RequestState.DONE, RequestState.FAILED) for st in res.result.requests)
    for st in res.result.requests:  # every request's stages in order, all its steps
        segs = sorted((s for s in res.result.segments if st.id in s.request_ids), key=lambda s: s.start)
        if st.state is RequestState.DONE:
            assert segs[0].stage is Stage.ENCODE and segs[-1].stage is Stage.DECODE
            assert sum(s.steps for s in segs if s.stage is Stage.DIFFUSE) == st.request.steps
            assert st.finish == pytest.approx(segs[-1].end)


def test_attainment_never_exceeds_the_bound(small):
    reqs, res = small
    assert 0.0 <= res.attainment <= res.upper_bound <= 1.0
    assert "bound_below_schedule" not in res.stats
    assert res.bound_status == "OPTIMAL"


def test_bound_is_at_least_every_baseline(small):
    reqs, res = small
    ran = 0
    for name in BASELINES:
        try:
            from ditplan.planner.policies.base import make_policy
            policy = make_policy(name)
        except (ImportError, KeyError):  # a policy still in progress
            continue
        result = Simulator(C4, COST, policy, SimConfig()).run(reqs)
        assert summarize(result)["slo_attainment"] <= res.upper_bound + 1e-9, name
        ran += 1
    assert ran >= 1


def test_easy_trace_is_solved_to_the_bound():
    reqs = [flux("a", 1024, 0.0, 10), flux("b", 512, 1.0, 10), flux("c", 256, 2.0, 10)]
    res = solve_offline(reqs, C8, COST, time_limit_s=60, deterministic_time=0.5)
    assert check(reqs, C8, res.result) == []
    assert res.attainment == res.upper_bound == 1.0
    assert res.status == "schedule=OPTIMAL bound=OPTIMAL"


def test_overloaded_trace_has_a_bound_below_one():
    # Eight 2048^2 images at once on 4 GPUs, deadlines 1.2x their k=4 latency:
    # each needs about the whole node for most of its window.
    reqs = [flux(f"r{i}", 2048, 0.0, 1.2) for i in range(8)]
    res = solve_offline(reqs, C4, COST, time_limit_s=30, deterministic_time=0.3)
    assert check(reqs, C4, res.result) == []
    assert res.upper_bound < 1.0
    assert 1 / 8 <= res.attainment <= res.upper_bound
    assert res.upper_bound <= 2 / 8  # two of them already need 34 GPU-s in a 22 GPU-s window


def brute_force(reqs, cluster):
    """Most requests on time over every order, option and subset, each run contiguous on its block."""
    opts = [schedule.block_choices(r, cluster, COST, fit.served_weight_bytes(reqs, cluster)) for r in reqs]
    best = 0
    for order in itertools.permutations(range(len(reqs))):
        for choice in itertools.product(*[[None, *opts[i]] for i in order]):
            free_at = [0.0] * cluster.size
            met = 0
            for i, o in zip(order, choice):
                if o is None:
                    continue
                start = max([reqs[i].arrival] + [free_at[g] for g in o.block])
                end = start + o.enc + o.diff + o.dec
                for g in o.block:
                    free_at[g] = end
                met += end <= reqs[i].deadline
            best = max(best, met)
    return best


def test_three_requests_against_brute_force():
    # A 2048^2 image and two 1024^2 images that each need the whole node for
    # about their window: A fits after one of them, never with both.
    reqs = [flux("A", 2048, 0.0, 1.3), flux("B", 1024, 0.1, 1.3), flux("C", 1024, 0.2, 1.3)]
    exact = brute_force(reqs, C4)
    assert exact == 2
    res = solve_offline(reqs, C4, COST, time_limit_s=30, deterministic_time=0.3)
    assert check(reqs, C4, res.result) == []
    assert res.met >= exact
    assert res.bound_met == res.met == exact  # the bound is tight here


def test_deterministic_for_a_seed():
    reqs = to_requests(generate("genserve-mixed", n=8, seed=2, rate=4.0), COST, C4, 1.5)
    runs = [solve_offline(reqs, C4, COST, time_limit_s=30, deterministic_time=0.2, seed=3) for _ in range(2)]
    assert timeline_records(runs[0].result) == timeline_records(runs[1].result)
    assert runs[0].upper_bound == runs[1].upper_bound
    assert check(reqs, C4, runs[0].result) == []


def test_empty_trace():
    res = solve_offline([], C8, COST)
    assert res.attainment == res.upper_bound == 1.0 and res.result.segments == []


def test_envelope_is_the_cheapest_mix():
    hull = bound._envelope([(1.0, 4.0), (2.0, 3.0), (3.0, 2.9), (4.0, 1.0), (5.0, 1.5)])
    assert hull == [(1.0, 4.0), (4.0, 1.0)]  # (2, 3) and (3, 2.9) lie above the chord; (5, 1.5) is dominated
    assert bound._phi(hull, 2.5) == pytest.approx(2.5)
    assert bound._phi(hull, 9.0) == 1.0


def test_relaxed_request_inside_whole_window_costs_its_cheapest_work():
    req = flux("a", 1024, 0.0, 3.0)
    (q,) = bound._relaxed([req], C4, COST)
    assert q.feasible
    whole = q.inside(req.arrival, req.deadline)
    slack = req.deadline - req.arrival - q.e_t - q.d_t
    assert whole == pytest.approx(q.e_g + q.d_g + 28 * bound._phi(q.hull, slack / 28))
    assert q.inside(req.deadline, req.deadline + 5) == 0.0
    # Loose: all of it may happen in the second half. Tight: part must happen in the first.
    assert q.inside(req.arrival, (req.arrival + req.deadline) / 2) == 0.0
    tight = flux("b", 1024, 0.0, 1.5)
    (q,) = bound._relaxed([tight], C4, COST)
    assert 0.0 < q.inside(0.0, tight.deadline / 2) < q.inside(0.0, tight.deadline)


def test_offline_bound_is_a_registered_runner(small):
    """The what-if lists offline-bound after the round policies and runs solve_offline through its runner."""
    reqs, direct = small
    assert runner_names() == policy_names() + [POLICY_NAME]
    seen = []
    run = run_policies(reqs, C4, COST, [POLICY_NAME], SimConfig(seed=0), offline_budget_s=0.4,
                       progress=lambda *a: seen.append(a))[POLICY_NAME]
    assert seen == [(POLICY_NAME, 10, 10)]
    assert timeline_records(run.result) == timeline_records(direct.result)
    expected = {**summarize(direct.result), "slo_attainment_upper_bound": round(direct.upper_bound, 6),
                "offline_status": direct.status}
    assert {k: v for k, v in run.summary.items() if k != "solver_ms"} == \
        {k: v for k, v in expected.items() if k != "solver_ms"}
    assert run.summary["slo_attainment"] == direct.attainment == 0.5
    assert run.summary["slo_attainment_upper_bound"] == direct.upper_bound == 0.6


class TimelineReplay(Policy):
    """A round policy that starts a run's segments again: each in its GPUs' order, once its GPUs are idle,
    its request is waiting and its start time has come."""

    name = "timeline-replay"

    def __init__(self, segments):
        self.pending = sorted(segments, key=lambda s: (s.start, s.gpus))

    def plan(self, state):
        idle, waiting = set(state.idle_gpus()), {st.id for st in state.waiting()}
        held, started = set(), []
        for seg in self.pending:
            if seg.start > state.now + EPS:
                break
            (rid,) = seg.request_ids
            if rid in waiting and set(seg.gpus) <= idle - held:
                started.append(seg)
                idle -= set(seg.gpus)
            held |= set(seg.gpus)  # a later segment on these GPUs waits for this one
            waiting.discard(rid)  # and a request's later segment for its earlier one
        self.pending = [s for s in self.pending if s not in started]
        wake = min((s.start for s in self.pending), default=None)
        return RoundPlan(tuple(Assignment(s.request_ids, s.stage, s.gpus, s.steps) for s in started),
                         wake_at=wake if wake is not None and wake > state.now + EPS else None)


def handoffs(result):
    """(embedding moves, decode-side latent moves) of a run: first pieces off their encode GPU, decodes off
    their last piece's block."""
    emb = dec = 0
    for st in result.requests:
        segs = sorted((s for s in result.segments if st.id in s.request_ids), key=lambda s: s.start)
        diffuse = [s for s in segs if s.stage is Stage.DIFFUSE]
        if st.state is RequestState.DONE:
            emb += not set(segs[0].gpus) & set(diffuse[0].gpus)
            dec += segs[-1].gpus[0] not in diffuse[-1].gpus
    return emb, dec


def simulate_schedule(reqs, cluster, res):
    """The simulator running ``res``'s segments: the same finishes, counters, segments and summary."""
    sim = Simulator(cluster, COST, TimelineReplay(res.result.segments), SimConfig()).run(reqs)
    assert check(reqs, cluster, sim) == []
    assert {st.id: st.finish for st in sim.requests} == {st.id: st.finish for st in res.result.requests}
    assert {st.id: (st.migrations, st.sp_changes, st.preemptions) for st in sim.requests} == \
        {st.id: (st.migrations, st.sp_changes, st.preemptions) for st in res.result.requests}
    assert sim.segments == sorted(res.result.segments, key=lambda s: s.start)
    keys = ("slo_attainment", "latency_s", "gpu_seconds", "preemptions", "sp_changes", "migrations", "finished",
            "late_finished")
    ran, replayed = summarize(sim), summarize(res.result)
    assert {k: ran[k] for k in keys} == {k: replayed[k] for k in keys}
    assert ran["slo_attainment"] == round(res.attainment, 6)
    return sim


def test_replay_counts_as_the_simulator_does(small):
    """The simulator, running the offline schedule segment by segment, counts each request's migrations,
    SP changes and preemptions as the replay does, and finishes each at the same time."""
    reqs, res = small
    counters = {st.id: (st.migrations, st.sp_changes, st.preemptions) for st in res.result.requests}
    assert [sum(c[k] for c in counters.values()) for k in range(3)] == [4, 4, 4]
    simulate_schedule(reqs, C4, res)


@pytest.mark.parametrize("workload, n, seed, cluster, slo_scale, attainment", [
    ("tetriserve-uniform", 12, 1, C8, 1.5, 11 / 12),
    ("genserve-mixed", 8, 2, C4, 1.5, 6 / 8),
    ("patchedserve-mixed", 12, 0, C8, 1.2, 1.0),
])
def test_schedule_reserves_every_handoff_the_simulator_charges(workload, n, seed, cluster, slo_scale, attainment):
    """Encodes and decodes off the diffuse block pay hand-offs; the windows reserve them, so the simulator
    running the schedule gets exactly the replay's finishes and attainment, and no segment overlaps."""
    reqs = to_requests(generate(workload, n=n, seed=seed, rate=4.0), COST, cluster, slo_scale)
    res = solve_offline(reqs, cluster, COST, time_limit_s=60, seed=0, deterministic_time=0.4)
    emb, dec = handoffs(res.result)
    assert emb > 0 and dec > 0
    assert check(reqs, cluster, res.result) == []
    assert res.attainment == pytest.approx(attainment)
    simulate_schedule(reqs, cluster, res)
