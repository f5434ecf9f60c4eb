"""Offline bound: the whole trace known in advance, solved with CP-SAT.

:func:`solve_offline` returns two things for one trace on one cluster:

* a **schedule** that really runs (it passes :func:`planner.checker.check_timeline`
  and :func:`planner.metrics.summarize` reads it like any policy's run), the best
  CP-SAT finds in the time limit: a lower bound on what an omniscient
  planner achieves;
* a **proven upper bound** on the SLO attainment of *any* policy, from a
  relaxation every schedule of the simulator's semantics satisfies — with
  preemption, SP changes between steps, migration and batching.

So every policy's gap to the limit can be reported (docs/architecture.md).
The package: ``bound`` (model 2, the relaxation), ``schedule`` (model 1, the
schedule in ticks and its CP-SAT model), ``search`` (model 1 solved in
stages), ``replay`` (the schedule as a simulation result); ``fit`` holds
what fits, for both models; CP-SAT's parameters are the solver layer's
(``planner/solvers/cpsat_params.py``). ``offline-bound`` is registered as
a what-if runner (``planner/runners.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.metrics import summarize
from ditplan.planner.offline.bound import upper_bound_count
from ditplan.planner.offline.replay import to_sim_result
from ditplan.planner.offline.search import MIN_DET_S, MIN_WALL_S, best_schedule
from ditplan.planner.request import Request
from ditplan.planner.runners import PolicyRun, RunOptions, register_runner
from ditplan.planner.sim_result import SimResult

__all__ = ["POLICY_NAME", "OfflineResult", "solve_offline"]

POLICY_NAME = "offline-bound"


@dataclass
class OfflineResult:
    """What :func:`solve_offline` returns: the schedule, run, and the proven bound."""

    result: SimResult  # the best schedule found, as a simulation result
    attainment: float  # its SLO attainment
    upper_bound: float  # proven upper bound on the SLO attainment of any policy
    status: str  # "schedule=OPTIMAL/FEASIBLE bound=<CP-SAT status>" (see solve_offline)
    wall_s: float
    met: int = 0  # requests on time in the schedule
    bound_met: int = 0  # proven bound on that number
    schedule_status: str = ""
    bound_status: str = ""
    stats: dict = field(default_factory=dict)


def solve_offline(requests: Sequence[Request], cluster: Cluster, cost: CostModel,
                  time_limit_s: float = 20.0, num_workers: int = 1, seed: int = 0,
                  deterministic_time: float | None = None, pieces: int = 2,
                  window: int = 6) -> OfflineResult:
    """Best schedule found and a proven SLO-attainment upper bound for ``requests`` (module doc).

    ``time_limit_s`` caps the wall-clock time of all solves together: the
    bound (at most 20 %, usually well under a second), then the schedule
    (``search.FULL_SHARE`` of the rest for the one-piece whole-trace solve, the rest
    for the search with ``pieces`` pieces and neighbourhoods of ``window``
    requests; it stops early once a proven optimum is reached).
    ``deterministic_time`` (CP-SAT deterministic seconds, shared out the same
    way) makes the result repeatable for a seed on any machine, the wall
    clock then being only a safety cap; with ``num_workers > 1`` it also
    switches CP-SAT to its deterministic interleaved parallel search.
    Without it, runs repeat only while no wall-clock limit cuts a search.

    ``status`` reads ``schedule=OPTIMAL`` when the schedule's count meets the
    proven bound (no policy does better), else ``schedule=FEASIBLE``;
    ``bound=OPTIMAL`` when the relaxation was solved to optimality.
    The bound assumes the noise-free cost model (``SimConfig.noise = 0``).
    """
    t0 = time.perf_counter()
    requests = list(requests)
    n = len(requests)
    if n == 0:
        return OfflineResult(SimResult(POLICY_NAME, [], [], [0.0], 0, 1, 0.0), 1.0, 1.0,
                             "schedule=OPTIMAL bound=OPTIMAL", 0.0, 0, 0, "OPTIMAL", "OPTIMAL")
    det_left = deterministic_time

    def budget(share: float) -> tuple[float, float | None]:
        wall = max(MIN_WALL_S, (time_limit_s - (time.perf_counter() - t0)) * share)
        return wall, (None if det_left is None else max(MIN_DET_S, det_left * share))

    def spent(stats: dict) -> None:
        nonlocal det_left
        if det_left is not None:
            det_left = max(0.0, det_left - stats.get("det_time", 0.0))

    wall, det = budget(0.2)
    bound, bstatus, bstats = upper_bound_count(requests, cluster, cost, wall, num_workers, seed, det)
    spent(bstats)
    wall, det = budget(1.0)
    plans, sstatus, sstats = best_schedule(requests, cluster, cost, wall, num_workers, seed, det,
                                           pieces=pieces, window=window, max_on_time=bound)
    stats = {"bound": bstats, "schedule": sstats}
    result = to_sim_result(requests, cluster, cost, plans, POLICY_NAME, solver_ms=(time.perf_counter() - t0) * 1e3)
    met = sum(st.met for st in result.requests)
    if met > bound:  # impossible while the relaxation is valid; never report a bound below a schedule
        stats["bound_below_schedule"] = (bound, met)
        bound = met
    sstats["cpsat_status"] = sstatus
    sstatus = "OPTIMAL" if met >= bound else "FEASIBLE"
    return OfflineResult(result, met / n, bound / n, f"schedule={sstatus} bound={bstatus}",
                         time.perf_counter() - t0, met, bound, sstatus, bstatus, stats)


@register_runner(POLICY_NAME)
def run_offline_bound(requests: Sequence[Request], cluster: Cluster, cost: CostModel,
                      options: RunOptions) -> PolicyRun:
    """The what-if's ``offline-bound``: ``options.offline_budget_s`` deterministic CP-SAT seconds, so the
    result repeats for a seed; the summary adds ``slo_attainment_upper_bound`` and ``offline_status``."""
    off = solve_offline(requests, cluster, cost, time_limit_s=max(60.0, 20 * options.offline_budget_s),
                        seed=options.config.seed, deterministic_time=options.offline_budget_s)
    summary = summarize(off.result)
    summary["slo_attainment_upper_bound"] = round(off.upper_bound, 6)
    summary["offline_status"] = off.status
    if options.progress:
        options.progress(len(requests), len(requests))
    return PolicyRun(off.result, summary)
