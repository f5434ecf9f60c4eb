"""List schedules of the schedule data: the warm start and the fallback of every backend.

A list schedule takes jobs in a priority order and puts each at its earliest
start, after everything already placed on those GPUs, on the alternative
that keeps a running request running and a latent where it is, then
finishes it first (ties: fewer GPU-ms); a job that can no longer be on time
is left out. Feasible by construction.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from ditplan.planner.solvers.data import ScheduleData
from ditplan.planner.solvers.solution import Schedule, SolveStats, SolveStatus, evaluate


def list_schedule(data: ScheduleData, order: Sequence[int],
                  prefer: Mapping[tuple[str, ...], tuple[int, ...]] | None = None) -> Schedule:
    """Place jobs in ``order``; ``prefer`` maps a job key to a block it should keep when it can."""
    free = dict(data.busy)
    taken: set[str] = set()
    placed: dict[int, tuple[int, int]] = {}
    for j in order:
        job = data.jobs[j]
        if any(r in taken for r in job.ids):
            continue
        want = prefer.get(job.key) if prefer else None
        best = None
        for a, alt in enumerate(job.alts):
            s = max(job.release, *(free[g] - off for g, off, _ in alt.holds))
            if s > alt.latest:
                continue
            # The objective's tiers: not preempting a running request and not moving a latent come
            # before finishing early and cheaply.
            key = (job.running > 0 and s > 0, alt.migrate, alt.loading_gpus, alt.block != want if want else False,
                   s + alt.span, alt.gpu_ms, alt.block)
            if best is None or key < best[0]:
                best = (key, a, s)
        if best is None:
            continue
        _, a, s = best
        for g, _, e in data.job_intervals(j, a, s):
            free[g] = max(free[g], e)
        taken.update(job.ids)
        placed[j] = (a, s)
    ev = evaluate(data, placed)
    return Schedule(placed, SolveStatus.FEASIBLE, "greedy", ev.objective, stats=SolveStats(on_time=ev.on_time))


def edf_order(data: ScheduleData) -> list[int]:
    """Running requests first (keeping them avoids a preemption), then earliest deadline, batches first."""
    return sorted(range(len(data.jobs)), key=lambda j: (data.jobs[j].running == 0, data.jobs[j].deadline_s,
                                                         -data.jobs[j].weight, data.jobs[j].ids))


def greedy(data: ScheduleData, previous: Mapping[tuple[str, ...], tuple[tuple[int, ...], float]] | None = None
           ) -> Schedule:
    """The better of the EDF list schedule and, given ``previous`` (job key -> (block, start s)),
    the list schedule that follows the previous plan's order and blocks."""
    best = list_schedule(data, edf_order(data))
    if previous:
        keep = [j for j in range(len(data.jobs)) if data.jobs[j].key in previous]
        keep.sort(key=lambda j: (previous[data.jobs[j].key][1], data.jobs[j].ids))
        rest = [j for j in edf_order(data) if data.jobs[j].key not in previous]
        follow = list_schedule(data, keep + rest, {k: b for k, (b, _) in previous.items()})
        if follow.objective > best.objective:
            best = follow
    return best
