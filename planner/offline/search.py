"""The search for model 1's best schedule (``planner/offline/schedule.py``), in stages.

It is solved in stages, each warm-started (hinted) from the best so far: an
EDF list schedule (greedy), then the one-piece model (non-preemptive) on the
whole trace, then large-neighbourhood search with ``pieces`` pieces
(preemption, SP change and migration at piece boundaries): a few requests
are re-solved at a time, all others fixed, and a neighbourhood's answer is
kept when the whole schedule improves. The count is capped by the proven
bound, so a schedule that reaches it is known to be optimal in count.
"""
from __future__ import annotations

import time
from typing import Sequence

from ortools.sat.python import cp_model

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.offline.fit import served_weight_bytes
from ditplan.planner.offline.schedule import (BlockChoice, Plan, ScheduleModel, alone_on_time, block_choices,
                                              contiguous, dec_latest, dec_ticks, plan_spans, run_ticks, score)
from ditplan.planner.request import Request
from ditplan.planner.solvers.cpsat_params import configure
from ditplan.planner.ticks import TICK_S, ticks_up

FULL_SHARE = 0.3  # of the schedule's budget, for the one-piece whole-trace solve
MIN_WALL_S, MIN_DET_S = 0.05, 0.01  # the least budget a solve gets, so a share of a small budget still searches


class _Busy:
    """Busy tick intervals per GPU, for the greedy list schedule."""

    def __init__(self, n: int) -> None:
        self.spans: list[list[tuple[int, int]]] = [[] for _ in range(n)]

    def _free(self, g: int, s: int, e: int) -> bool:
        return all(e <= a or s >= b for a, b in self.spans[g])

    def _fits(self, o: BlockChoice, s: int, e: int, D: int, d: int) -> bool:
        return (self._free(o.block[0], s, s + e + D + d)
                and all(self._free(g, s + e, s + e + D) for g in o.block[1:]))

    def earliest(self, o: BlockChoice, lo: int, e: int, D: int, d: int) -> int:
        cands = {lo}
        for g in o.block:
            off = 0 if g == o.block[0] else e
            cands.update(b - off for _, b in self.spans[g] if b - off >= lo)
        return next(s for s in sorted(cands) if self._fits(o, s, e, D, d))

    def add(self, o: BlockChoice, s: int, e: int, D: int, d: int) -> None:
        self.spans[o.block[0]].append((s, s + e + D + d))
        for g in o.block[1:]:
            self.spans[g].append((s + e, s + e + D))


def _greedy(requests: Sequence[Request], choices: list[list[BlockChoice]], n_gpus: int,
            prefer_cheap: bool) -> dict[int, Plan]:
    """EDF list schedule, one contiguous run per request; on-time requests only."""
    busy = _Busy(n_gpus)
    out: dict[int, Plan] = {}
    for i in sorted(range(len(requests)), key=lambda i: (requests[i].deadline, requests[i].arrival, i)):
        r = requests[i]
        best = None
        for o in choices[i]:
            e, D, d = ticks_up(o.enc), run_ticks(o, r.steps), dec_ticks(o)
            lo, hi = ticks_up(r.arrival), dec_latest(r, o) - e - D
            if hi < lo:
                continue
            s = busy.earliest(o, lo, e, D, d)
            if s > hi:
                continue
            key = (o.gpu_seconds, s) if prefer_cheap else (s + e + D, o.gpu_seconds)
            if best is None or key < best[0]:
                best = (key, o, s)
        if best is not None:
            _, o, s = best
            busy.add(o, s, ticks_up(o.enc), run_ticks(o, r.steps), dec_ticks(o))
            out[i] = contiguous(r, o, s)
    return out


class _Scheduler:
    """Model 1, solved in stages that each start from the best schedule so far."""

    def __init__(self, requests: Sequence[Request], cluster: Cluster, cost: CostModel,
                 num_workers: int = 1, seed: int = 0) -> None:
        self.requests, self.n_gpu = requests, cluster.size
        self.num_workers, self.seed = num_workers, seed
        weights = served_weight_bytes(requests, cluster)
        self.choices = [block_choices(r, cluster, cost, weights) for r in requests]
        self.best: dict[int, Plan] = max((_greedy(requests, self.choices, self.n_gpu, cheap)
                                          for cheap in (True, False)), key=self.score)
        self.stats: dict = {"greedy_on_time": len(self.best)}

    def score(self, plans: dict[int, Plan]) -> tuple[int, int]:
        return score(self.requests, plans)

    def _solve(self, model: ScheduleModel, time_limit_s: float,
               deterministic_time: float | None) -> tuple[dict[int, Plan] | None, str, float]:
        solver = cp_model.CpSolver()
        configure(solver, deterministic_time, self.seed, self.num_workers, time_limit_s)
        code = solver.solve(model.m)
        status = solver.status_name(code)
        found = model.plans(solver) if code in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None
        return found, status, solver.deterministic_time

    def full(self, pieces: int, time_limit_s: float, deterministic_time: float | None,
             max_on_time: int | None) -> tuple[str, float]:
        """Solve the whole trace at once; returns (status, deterministic time used)."""
        model = ScheduleModel(self.requests, self.choices, self.n_gpu, pieces, range(len(self.requests)), {})
        if max_on_time is not None and model.ys:
            model.m.add(model.count <= max_on_time)
        model.hint(self.best)
        found, status, det = self._solve(model, time_limit_s, deterministic_time)
        if found is not None and self.score(found) >= self.score(self.best):
            self.best = found
        return status, det

    def _possible(self, i: int) -> bool:
        return alone_on_time(self.requests[i], self.choices[i])

    def _neighbours(self, m: int, size: int) -> list[int]:
        """Missed request ``m`` and the ``size - 1`` on-time requests using most GPU-time in its window."""
        r = self.requests[m]
        lo, hi = r.arrival / TICK_S, r.deadline / TICK_S

        def overlap(i: int) -> float:
            return sum(max(0.0, min(b, hi) - max(a, lo))
                       for _, a, b in plan_spans(self.requests[i], self.best[i]))

        near = sorted((-overlap(i), i) for i in self.best)
        return [m] + [i for w, i in near[:size - 1] if w < 0]

    def improve(self, pieces: int, window: int, time_limit_s: float,
                deterministic_time: float | None) -> dict:
        """Large-neighbourhood search: re-solve a few requests at a time, the rest fixed.

        Each sweep frees, in turn, ``window`` requests consecutive by arrival
        (sliding by half a window), then each missed request with the
        ``window - 1`` on-time ones that use most GPU-time inside its window.
        Neighbourhoods are solved with up to ``pieces`` diffuse pieces a
        request and kept when the whole schedule improves; sweeps repeat
        while one improves and budget is left.
        """
        t0 = time.perf_counter()
        det_left = deterministic_time
        order = sorted(range(len(self.requests)), key=lambda i: (self.requests[i].arrival, i))
        window = max(1, min(window, len(order)))
        stride = max(1, window // 2)
        slides = [order[s:s + window] for s in range(0, max(1, len(order) - window + stride), stride)]
        n_hoods = len(slides) + sum(1 for i in order if i not in self.best and self._possible(i))
        per = max(0.25, time_limit_s / n_hoods)
        det_per = None if deterministic_time is None else max(0.02, deterministic_time / n_hoods)
        stats = {"lns_solves": 0, "lns_improved": 0}
        while True:
            better = False
            missed = [i for i in order if i not in self.best and self._possible(i)]
            for hood in [*slides, *([m] for m in missed)]:
                wall_left = time_limit_s - (time.perf_counter() - t0)
                if wall_left <= MIN_WALL_S or (det_left is not None and det_left <= MIN_DET_S):
                    return stats
                if len(hood) == 1:  # a missed request: take its neighbours now, from the current best
                    if hood[0] in self.best:
                        continue
                    hood = self._neighbours(hood[0], window)
                fixed = {i: pl for i, pl in self.best.items() if i not in hood}
                model = ScheduleModel(self.requests, self.choices, self.n_gpu, pieces, hood, fixed)
                if not model.ys:
                    continue
                model.hint(self.best)
                # With a deterministic budget the wall clock is only a safety cap, so runs repeat.
                found, _, used = self._solve(model, wall_left if det_left is not None else min(per, wall_left),
                                             None if det_left is None else min(det_left, det_per))
                stats["lns_solves"] += 1
                if det_left is not None:
                    det_left -= used
                if found is not None and self.score({**fixed, **found}) > self.score(self.best):
                    self.best, better = {**fixed, **found}, True
                    stats["lns_improved"] += 1
            if not better:
                return stats


def best_schedule(requests: Sequence[Request], cluster: Cluster, cost: CostModel, time_limit_s: float = 10.0,
                  num_workers: int = 1, seed: int = 0, deterministic_time: float | None = None, pieces: int = 2,
                  window: int = 6, max_on_time: int | None = None) -> tuple[dict[int, Plan], str, dict]:
    """Best schedule found: ({request index: plan} of on-time requests, status, stats).

    Greedy, then the one-piece model on the whole trace (``FULL_SHARE`` of
    the budget), then large-neighbourhood search with ``pieces`` pieces and
    neighbourhoods of ``window`` requests on the rest. ``max_on_time`` (a
    proven bound) caps the count so CP-SAT can prove optimality sooner. The
    status is the whole-trace solve's.
    """
    t0 = time.perf_counter()
    sched = _Scheduler(requests, cluster, cost, num_workers, seed)
    det_full = None if deterministic_time is None else max(MIN_DET_S, deterministic_time * FULL_SHARE)
    status, used = sched.full(1, max(MIN_WALL_S, time_limit_s * FULL_SHARE), det_full, max_on_time)
    sched.stats["full_on_time"] = len(sched.best)
    at_bound = max_on_time is not None and len(sched.best) >= max_on_time
    wall_rest = time_limit_s - (time.perf_counter() - t0)
    if not (status == "OPTIMAL" and (pieces == 1 or at_bound)) and wall_rest > 0.1:
        det_rest = None if deterministic_time is None else max(0.0, deterministic_time - used)
        sched.stats.update(sched.improve(pieces, window, wall_rest, det_rest))
    sched.stats["on_time"] = len(sched.best)
    return sched.best, status, sched.stats


