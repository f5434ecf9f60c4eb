"""Solver policies: ``cpsat`` (receding horizon, CP-SAT), ``milp`` / ``milp-highs`` (PuLP).

Each plan: build the RoundProblem of the state (requests just paused at a
step boundary are marked, so not continuing them counts as a preemption),
enumerate options, solve with a time limit, place the committed round on
aligned blocks, and check the plan with the independent checker. If the
solver finds no solution in time, raises, or the plan would not pass the
checker, the round falls back to the ``tetriserve-dp`` plan with
``RoundPlan.fallback = True`` (the simulator counts fallbacks), so no round
is ever missed.

Warm start: the previous solve's plan for round h+1 of each request is a
candidate hint for round h now; CP-SAT gets the better of it and a greedy
solution (``solvers/greedy.py``) as a complete hint (``add_hint``).

Time limit and reproducibility: ``time_limit_s`` (default 0.01) is CP-SAT's
*deterministic* time with one worker and a fixed seed, so a simulation
replays exactly for a seed (``whatif``'s same-seed, same-output promise);
the wall clock (4x the limit) is only a safety net, and
``RoundPlan.stats['wall_limited']`` says when it fired. On the 2-core
development machine 0.01 deterministic units are about 40-60 ms of search
at most; most rounds are proven optimal well before.

Large instances: the model grows with requests x options x rounds. The
policy builds the horizon model, and when it has more than ``max_options``
options (or ``requests x horizon`` passes ``large_threshold``, which skips
the attempt) it plans with ``H = 1`` instead: TetriServe's one-round view,
still solved exactly with batching, pinning, the buddy constraint and the
demand bounds, and near-optimal within a few ms at 8 GPUs / 64 requests and
within ~100-200 ms at 128 GPUs / 1,000 requests on a 2-core machine
(whole plan calls: p99 8-45 ms at 8 GPUs / 50-80 live requests, 157-189 ms
at 128 GPUs / 900-950 live requests). Options
are enumerated once (exact dominance pruning; best effort near its most
efficient degree), so the one-round model stays small even when most
requests are waiting (see ``planner/solvers/options.py``).

``RoundPlan.stats``: ``status``, ``objective``, ``bound``, ``wall_ms``
(whole plan call), ``solve_ms``, ``horizon``, ``options``, ``wall_limited``,
``deferred_for_short_stages`` (see ``solvers/convert.py``), and
``fallback_reason`` when it fell back.
"""
from __future__ import annotations

import time

from planner.checker import check_plan
from planner.plan import RoundPlan
from planner.policies.base import make_policy, register
from planner.problem import RoundProblem, build_problem
from planner.solvers import milp
from planner.solvers.convert import to_plan
from planner.solvers.cpsat import solve as cpsat_solve
from planner.solvers.options import RoundOptions, Weights, build_options
from planner.solvers.solution import Solution
from planner.state import PlannerState


def _signature(ro: RoundOptions, i: int) -> tuple:
    o = ro.options[i]
    return (o.stage, o.k, o.pin is not None, o.group >= 0, o.var_q)


class SolverPolicy:
    name = "cpsat"
    backend = "cpsat"

    def __init__(self, horizon: int = 3, time_limit_s: float = 0.01, num_workers: int = 1, seed: int = 0,
                 weights: Weights = Weights(), large_threshold: int = 600, max_options: int = 120,
                 check: bool = True, wall_safety: float = 4.0) -> None:
        self.horizon = horizon
        self.max_options = max_options
        # The wall-clock net is wall_safety x the deterministic budget: it bounds a round's
        # latency on a loaded machine at the price of reproducibility when it fires.
        self.wall_safety = wall_safety
        self.time_limit_s = time_limit_s
        self.num_workers = num_workers
        self.seed = seed
        self.weights = weights
        self.large_threshold = large_threshold
        self.check = check
        self._fallback = None
        self._prev: dict[str, dict[int, tuple]] = {}  # request id -> round -> signature

    # -- pieces --------------------------------------------------------------------
    def horizon_for(self, n_requests: int) -> int:
        if self.horizon > 1 and n_requests * self.horizon > self.large_threshold:
            return 1
        return self.horizon

    def options_for(self, problem: RoundProblem) -> RoundOptions:
        """The options this policy solves: H rounds, or one round on large instances."""
        H = self.horizon_for(len(problem.requests) + len(problem.in_flight))
        ro = build_options(problem, H, self.weights)
        if H > 1 and len(ro.options) > self.max_options:
            ro = build_options(problem, 1, self.weights)
        return ro

    def solve(self, ro: RoundOptions, hint: list[int]) -> Solution:
        return cpsat_solve(ro, self.time_limit_s, self.num_workers, hint, seed=self.seed,
                           safety_factor=self.wall_safety)

    def hint(self, ro: RoundOptions) -> list[int]:
        if not self._prev:
            return []
        out = []
        for ri in ro.reqs:
            prev = self._prev.get(ri.id)
            if not prev:
                continue
            for h in range(ro.horizon):
                sig = prev.get(h + 1)
                if sig is None:
                    continue
                for i in ri.options[h]:
                    if _signature(ro, i) == sig:
                        out.append(i)
                        break
        return out

    def remember(self, ro: RoundOptions, sol: Solution) -> None:
        prev: dict[str, dict[int, tuple]] = {}
        for i in sol.chosen:
            o = ro.options[i]
            prev.setdefault(ro.reqs[o.req].id, {})[o.round] = _signature(ro, i)
        self._prev = prev

    def fallback(self, state: PlannerState, t0: float, reason: str, stats: dict) -> RoundPlan:
        if self._fallback is None:
            self._fallback = make_policy("tetriserve-dp")
        plan = self._fallback.plan(state)
        self._prev = {}
        st = {**stats, "fallback_reason": reason, "wall_ms": (time.perf_counter() - t0) * 1e3}
        return RoundPlan(plan.assignments, plan.wake_at, solver=self.name, fallback=True, stats=st)

    # -- the policy ------------------------------------------------------------------
    def plan(self, state: PlannerState) -> RoundPlan:
        t0 = time.perf_counter()
        if not state.waiting():
            return RoundPlan(solver=self.name)
        stats: dict = {}
        try:
            problem = build_problem(state, self.horizon)
            ro = self.options_for(problem)
            H = ro.horizon
            sol = self.solve(ro, self.hint(ro))
            stats = {"status": sol.status.value, "objective": sol.objective, "bound": sol.bound,
                     "solve_ms": sol.wall_ms, "horizon": H, "options": len(ro.options)}
            if "wall_limited" in sol.stats:  # the wall-clock safety net fired: not reproducible
                stats["wall_limited"] = sol.stats["wall_limited"]
            if not sol.has_solution:
                return self.fallback(state, t0, sol.status.value, stats)
            plan = to_plan(ro, sol, self.name, stats)
            if self.check:
                problems = check_plan(state, plan)
                if problems:
                    return self.fallback(state, t0, "checker: " + "; ".join(problems[:3]), stats)
            self.remember(ro, sol)
        except Exception as exc:  # never miss a round
            return self.fallback(state, t0, f"error: {exc!r}", stats)
        plan.stats["wall_ms"] = (time.perf_counter() - t0) * 1e3
        return plan


@register("cpsat")
class CpSatPolicy(SolverPolicy):
    """Receding horizon (H = 3) over the round formulation, solved with CP-SAT."""

    name = "cpsat"


class MilpPolicy(SolverPolicy):
    """The same formulation as a PuLP MILP (slower; for comparison)."""

    name = "milp"
    milp_solver = "cbc"

    def __init__(self, horizon: int = 3, time_limit_s: float = 2.0, **kw) -> None:
        super().__init__(horizon=horizon, time_limit_s=time_limit_s, **kw)

    def solve(self, ro: RoundOptions, hint: list[int]) -> Solution:
        return milp.solve(ro, self.time_limit_s, self.num_workers, hint, solver=self.milp_solver)


@register("milp")
class MilpCbcPolicy(MilpPolicy):
    name, milp_solver = "milp", "cbc"


@register("milp-highs")
class MilpHighsPolicy(MilpPolicy):
    name, milp_solver = "milp-highs", "highs"
