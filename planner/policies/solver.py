"""Solver policies: ``cpsat`` (the schedule model on CP-SAT), ``milp`` / ``milp-highs`` (PuLP).

Every plan call solves the schedule of *all remaining work of every live
request* (``planner/solvers/data.py``) and commits only what starts now
(``planner/solvers/commit.py``):

1. build the RoundProblem of the state;
2. split it into scopes: one per node (see :func:`scopes`). A request whose
   latent lives on a node stays there; fresh ones are packed best fit by a
   node-level list schedule. A one-node cluster is one scope. Only scopes
   with an idle GPU are solved: nothing else can start now;
3. per scope: build the schedule data, warm-start from the better of the EDF
   list schedule and the list schedule that follows the previous plan, solve
   within a deterministic limit, commit the on-time work that starts now;
4. fill the GPUs the schedule leaves idle with best-effort work, and reject
   lost requests when ``late="reject"``;
5. check the plan with the independent checker.

A solve with no solution uses the list schedule (``RoundPlan.fallback``, and
the simulator counts it); an exception or a plan the checker rejects falls
back to the ``tetriserve-dp`` plan. No round is ever missed.

Determinism: CP-SAT runs on its deterministic time with one worker and a
fixed seed, so a simulation repeats byte for byte for a seed whatever the
machine's load. ``wall_limit_s`` (off by default) adds a wall-clock cap for
the service, where real time rules; ``stats.wall_limited`` says when it
fired.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from ditplan.models.catalog import get_model
from ditplan.planner.checker import check_plan
from ditplan.planner.placement import WeightLoad
from ditplan.planner.plan import PlanStats, RoundPlan
from ditplan.planner.policies.base import Policy, make_policy, register
from ditplan.planner.policies.kit.timing import PARALLEL_EFFICIENCY
from ditplan.planner.problem import ProblemRequest, RoundProblem, build_problem
from ditplan.planner.request import Stage
from ditplan.planner.solvers import cpsat, milp
from ditplan.planner.solvers.commit import (LATE_MODES, Committed, Gaps, commit_on_time, fill_best_effort, idle_gaps,
                                            load_stranded, rejections, weight_load)
from ditplan.planner.solvers.data import (ScheduleData, ScheduleParams, build_schedule, chain_parts, has_latent,
                                          kept_degrees)
from ditplan.planner.solvers.greedy import greedy
from ditplan.planner.solvers.reserve import PlacementLoop, keep_loaded
from ditplan.planner.solvers.solution import Schedule, evaluate
from ditplan.planner.state import PlannerState
from ditplan.planner.ticks import TICK_S


def _chain_s(pr: ProblemRequest, k: int) -> float:
    """Seconds of the request's remaining chain at degree ``k`` (no latent move)."""
    return sum(chain_parts(pr.stage, pr.encode_s, 0.0, pr.remaining_steps, pr.step_s[k], pr.decode_s))


def _load_s(problem: RoundProblem, model: str) -> float:
    """Seconds to load the whole model onto an empty GPU of the problem."""
    bw = max((g.load_bw for g in problem.gpus), default=0.0)
    return get_model(model).weight_bytes / bw if bw > 0 else float("inf")


def scopes(problem: RoundProblem, skip: set[str] = frozenset(), fit: str = "best"
           ) -> list[tuple[tuple[int, ...], list[ProblemRequest]]]:
    """(GPUs, requests) per node: latents stay on their node; fresh requests are packed by a list schedule.

    The list schedule is the node-level relaxation of the schedule model (a
    degree-k chain takes the k GPUs of the node that free first, alignment
    aside): bound requests load their node, then fresh requests, earliest
    deadline first, go to the busiest node where some degree still finishes
    them on time (best fit: whole nodes stay free for the requests that need
    one), or, when none does, where they finish first.
    """
    nodes = problem.nodes
    everyone = [r for r in (*problem.requests, *problem.in_flight) if r.id not in skip]
    if len(nodes) == 1:
        return [(tuple(nodes[0]), everyone)]
    node_of = problem.node_of
    free_at = [sorted(g.free_in for g in problem.gpus if node_of[g.index] == n) for n in range(len(nodes))]
    waiting = {r.id for r in problem.requests}
    out: list[list[ProblemRequest]] = [[] for _ in nodes]
    fresh = []

    def take(n: int, k: int, ready: float, pr: ProblemRequest) -> float:
        start = max(ready, free_at[n][k - 1])
        end = start + _chain_s(pr, k)
        free_at[n][:k] = [end] * k
        free_at[n].sort()
        return end

    for r in sorted(everyone, key=lambda r: (r.deadline, r.id)):
        bound = has_latent(r) or r.stage is Stage.DECODE or r.id not in waiting
        if bound and r.latent_gpus:
            n = node_of[r.latent_gpus[0]]
            out[n].append(r)
            k = len(r.latent_gpus) if r.stage is not Stage.DECODE and len(r.latent_gpus) in r.step_s else 1
            take(n, min(k, len(free_at[n])), r.ready_in, r)
        else:
            fresh.append(r)
    held = problem.node_holders
    for r in fresh:
        best = None
        load_s = _load_s(problem, r.model)
        for n in range(len(nodes)):
            for k in kept_degrees(r.step_s):
                if k <= len(free_at[n]):
                    end = max(r.ready_in, free_at[n][k - 1]) + _chain_s(r, k)
                    if held.get((n, r.model), 0) < k:  # the weights have to come first
                        end += load_s
                    # On time: best fit, the busiest node that still makes it (whole nodes stay free
                    # for requests that need one); late: the earliest finish.
                    key = (0, -sum(free_at[n]), k, n) if end <= r.deadline and fit == "best" else (1, end, k, n)
                    if best is None or key < best[0]:
                        best = (key, n, k)
        n, k = (best[1], best[2]) if best else (0, 1)
        out[n].append(r)
        take(n, k, r.ready_in, r)
    return [(tuple(nodes[n]), out[n]) for n in range(len(nodes)) if out[n]]


MAX_FULL_SCOPES = 4
SATURATED_GPU_MS = 10


@dataclass
class ScheduleStats(PlanStats):
    """One plan of the schedule model: summed over its scopes (one per node with an idle GPU)."""

    scopes: int = 0
    jobs: int = 0
    on_time: int = 0  # on-time weight the solves placed
    solve_ms: float = 0.0
    status: list[str] = field(default_factory=list)  # per scope
    wall_limited: bool = False  # a solve stopped at the wall-clock limit
    reserved: int = 0  # GPUs the placement loop reserves
    loads: int = 0  # weight loads in the plan
    load: float = 0.0  # offered load per GPU of the recent arrivals (``PlacementLoop.utilization``)


class SchedulePolicy(Policy):
    """The schedule model solved at every planning instant (see the module doc)."""

    name = "cpsat"
    places_models = True  # loads and evicts weights itself (no static placement wrapper)

    def __init__(self, time_limit_s: float = 0.003, piece_s: float = 0.25, late: str = "serve",
                 batching: bool = True, max_jobs: int = 32, seed: int = 0, num_workers: int = 1,
                 wall_limit_s: float | None = None, check: bool = True, late_piece_s: float = 0.0,
                 late_share: float = 0.5, node_fit: str = "best", reject_grace_s: float = 0.0,
                 reserve_share: float = 0.5, csp: bool = True, saturation: float = 1.0) -> None:
        if late not in LATE_MODES:
            raise ValueError(f"late must be one of {', '.join(LATE_MODES)}, not {late!r}")
        if piece_s <= 0:
            raise ValueError(f"piece_s must be positive, got {piece_s!r}")
        self.time_limit_s = time_limit_s
        self.piece_s = piece_s
        self.late_piece_s = late_piece_s  # 0: one step at a time, preemptible at the next step boundary
        self.late_share = late_share
        self.node_fit = node_fit
        self.reject_grace_s = reject_grace_s
        self.late = late
        self.params = ScheduleParams(batching=batching, max_jobs=max_jobs, csp=csp)
        # From this offered load per GPU (``PlacementLoop.utilization``: recent arrivals at their most
        # efficient degree, unbatched) on, GPU-ms weigh SATURATED_GPU_MS x an early finish and only degrees
        # of parallel efficiency >= PARALLEL_EFFICIENCY are offered (``ScheduleParams.min_efficiency``): a
        # saturated cluster has no GPU-second to spare for a wide block or a lone request.
        self.saturation = saturation
        self.seed = seed
        self.num_workers = num_workers
        self.wall_limit_s = wall_limit_s
        self.check = check
        self._fallback = None
        self.loop = PlacementLoop(reserve_share)  # 0: no reserves
        self.reset()

    def reset(self) -> None:
        """Forget the previous plan and the recent arrivals (a new run)."""
        self._prev: dict[tuple[str, ...], tuple[tuple[int, ...], float]] = {}
        self.loop.reset()
        if self._fallback is not None:
            self._fallback.reset()

    # -- one scope -----------------------------------------------------------------
    def solve(self, data: ScheduleData, hint: Schedule, limit_s: float) -> Schedule:
        return cpsat.solve(data, limit_s, hint, seed=self.seed, num_workers=self.num_workers,
                           wall_limit_s=self.wall_limit_s)

    def schedule(self, data: ScheduleData, now: float, limit_s: float) -> tuple[Schedule, bool]:
        """(the scope's schedule, whether it fell back to the list schedule)."""
        prev = {k: (b, t - now) for k, (b, t) in self._prev.items()}
        hint = greedy(data, prev)
        sched = self.solve(data, hint, limit_s)
        if not sched.has_solution or evaluate(data, sched.placed).objective < hint.objective:
            hint.stats.fallback_reason = sched.status.value
            return hint, not sched.has_solution
        return sched, False

    # -- the policy ------------------------------------------------------------------
    def plan(self, state: PlannerState) -> RoundPlan:
        t0 = time.perf_counter()
        if not state.waiting():
            return RoundPlan(solver=self.name)
        try:
            plan = self._plan(state, t0)
        except Exception as exc:  # never miss a round
            return self.fallback(state, t0, f"error: {exc!r}")
        if self.check:
            problems = check_plan(state, plan)
            if problems:
                return self.fallback(state, t0, "checker: " + "; ".join(problems[:3]))
        plan.stats.wall_ms = (time.perf_counter() - t0) * 1e3
        return plan

    def _plan(self, state: PlannerState, t0: float) -> RoundPlan:
        ages = {st.id: max(0.0, state.now - st.request.arrival) for st in state.requests}
        return self.plan_problem(build_problem(state), ages)

    def solved_scopes(self, problem: RoundProblem) -> list[tuple[tuple[int, ...], list[ProblemRequest]]]:
        """(GPUs, requests) of each scope this instant solves: those with an idle GPU (nothing can start
        elsewhere now), the most idle GPUs first."""
        rejected = {rid for rid, _ in rejections(problem, self.late, self.reject_grace_s)}
        idle = set(problem.idle)
        out = [(gpus, reqs) for gpus, reqs in scopes(problem, rejected, self.node_fit)
               if any(g in idle for g in gpus)]
        return sorted(out, key=lambda sc: (-sum(g in idle for g in sc[0]), sc[0]))

    def plan_problem(self, problem: RoundProblem, ages: dict[str, float] | None = None) -> RoundPlan:
        """The plan of one RoundProblem (what ``plan`` does after building it, before the checker);
        ``ages``: seconds since each request arrived, for the placement loop.

        Scopes are solved in turn; a fresh request (no latent yet) that a scope
        leaves out moves on to the next one, so it is tried on every node with
        an idle GPU before it falls to best effort.
        """
        now = problem.now
        rejected = rejections(problem, self.late, self.reject_grace_s)
        gaps = idle_gaps(problem)
        waiting = {r.id for r in problem.requests}
        out = Committed()
        best_effort, carry = [], []
        fell_back = False
        stats = ScheduleStats()
        prev = dict(self._prev)
        self.loop.observe(problem, ages or {})
        reserved = self.loop.owners()
        stats.load = self.loop.utilization(problem)
        params = self.params
        if stats.load >= self.saturation:
            params = replace(params, min_efficiency=PARALLEL_EFFICIENCY,
                             weights=replace(params.weights, gpu_ms=params.weights.gpu_ms * SATURATED_GPU_MS))
        solved = self.solved_scopes(problem)
        # Each scope gets the budget, up to MAX_FULL_SCOPES of them; beyond, they share that total.
        limit = self.time_limit_s * min(1.0, MAX_FULL_SCOPES / max(1, len(solved)))
        for gpus, reqs in solved:
            reqs = reqs + carry
            data = build_schedule(problem, reqs, gpus, params, reserved)
            sched, fb = self.schedule(data, now, limit)
            fell_back |= fb
            commit_on_time(data, sched, problem, self.piece_s, gaps, out)
            present = {rid for j in sched.placed for rid in data.jobs[j].ids}
            left = [r for r in reqs if r.id in waiting and r.id not in present]
            carry = [r for r in left if not has_latent(r) and r.stage is not Stage.DECODE]
            best_effort += [r for r in left if has_latent(r) or r.stage is Stage.DECODE]
            for j, (a, s) in sched.placed.items():
                prev[data.jobs[j].key] = (data.jobs[j].alts[a].block, now + s * TICK_S)
            stats.scopes += 1
            stats.jobs += len(data.jobs)
            stats.on_time += sum(data.jobs[j].weight for j in sched.placed)
            stats.solve_ms += sched.wall_ms
            stats.status.append(sched.status.value)
            stats.wall_limited |= sched.stats.wall_limited
        best_effort += carry
        committed = {rid for a in out.assignments for rid in a.request_ids}
        leftover = [r for r in best_effort if r.id not in committed]
        self.fill_gaps(leftover, problem, gaps, reserved, out)
        stats.reserved = len(reserved)
        live = waiting | {r.id for r in problem.in_flight}
        self._prev = {k: v for k, v in prev.items() if all(rid in live for rid in k)}
        stats.loads = len(out.loads)
        return RoundPlan(tuple(out.assignments), solver=self.name, fallback=fell_back, rejections=tuple(rejected),
                         stats=stats, unloads=tuple(out.unloads), loads=tuple(out.loads))

    def fill_gaps(self, leftover: list[ProblemRequest], problem: RoundProblem, gaps: Gaps,
                  reserved: dict[int, str], out: Committed) -> None:
        """Best effort in the gaps. A reserved GPU takes only its model's late work, and loads that
        model's weights when nothing is planned there (``planner/solvers/reserve.py``)."""
        out.assignments += fill_best_effort(leftover, problem, gaps, self.late_piece_s, self.params.batching,
                                            self.late_share, reserved)
        served = {rid for a in out.assignments for rid in a.request_ids}
        held = gaps.split(reserved)
        load_stranded([r for r in leftover if r.id not in served], problem, gaps, out, reserved)
        free = [g for g, u in held.until.items() if u == math.inf]
        for g, model, loads, evicts in keep_loaded(problem, self.loop.reserves, self.loop.act, free):
            out.unloads += [weight_load(g, w) for _, w in evicts]
            out.loads += [WeightLoad(g, model, c) for _, c in loads]

    def fallback(self, state: PlannerState, t0: float, reason: str) -> RoundPlan:
        if self._fallback is None:
            self._fallback = make_policy("tetriserve-dp")
        plan = self._fallback.plan(state)
        self._prev = {}
        st = PlanStats((time.perf_counter() - t0) * 1e3, reason)
        return RoundPlan(plan.assignments, plan.wake_at, solver=self.name, fallback=True, stats=st)


@register("cpsat")
class CpSatPolicy(SchedulePolicy):
    """The schedule model solved with CP-SAT."""

    name = "cpsat"


@register("cpsat-nocsp")
class CpSatNoCspPolicy(SchedulePolicy):
    """``cpsat`` without mixed-resolution CSP batches (same-shape batches only): what CSP adds."""

    name = "cpsat-nocsp"

    def __init__(self, **kw) -> None:
        super().__init__(**{"csp": False, **kw})


class MilpPolicy(SchedulePolicy):
    """The same schedule model as a PuLP MILP (slower; for comparison on small clusters)."""

    name = "milp"
    milp_solver = "cbc"

    def __init__(self, time_limit_s: float = 2.0, **kw) -> None:
        super().__init__(time_limit_s=time_limit_s, **kw)

    def solve(self, data: ScheduleData, hint: Schedule, limit_s: float) -> Schedule:
        return milp.solve(data, limit_s, hint, solver=self.milp_solver)


@register("milp")
class MilpCbcPolicy(MilpPolicy):
    name, milp_solver = "milp", "cbc"


@register("milp-highs")
class MilpHighsPolicy(MilpPolicy):
    name, milp_solver = "milp-highs", "highs"

