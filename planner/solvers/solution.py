"""A schedule (one backend's answer), its status, and an independent evaluation.

:func:`evaluate` re-derives feasibility and the objective from the
:class:`~planner.solvers.data.ScheduleData` alone, so every backend's answer
(CP-SAT, the MILP, the greedy list schedule) is scored by the same numbers.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ditplan.planner.solvers.data import ScheduleData


class SolveStatus(str, enum.Enum):
    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    INFEASIBLE = "infeasible"
    TIMEOUT_NO_SOLUTION = "timeout"
    MODEL_INVALID = "model_invalid"
    ERROR = "error"

    @property
    def has_solution(self) -> bool:
        return self in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE)


@dataclass
class SolveStats:
    """One backend solve."""

    model_ms: float = 0.0  # building the model
    solve_ms: float = 0.0  # the solver itself
    deterministic_time: float | None = None  # CP-SAT's deterministic seconds
    wall_limited: bool = False  # stopped by the wall-clock limit before its deterministic budget
    jobs: int = 0
    alternatives: int = 0
    on_time: int | None = None  # the list schedule's on-time weight (greedy)
    error: str | None = None  # the backend failed
    fallback_reason: str | None = None  # the list schedule stood in for the backend's answer, with its status


@dataclass
class Schedule:
    """Present jobs: job index -> (alternative index, start tick). Absent jobs are best effort."""

    placed: dict[int, tuple[int, int]] = field(default_factory=dict)
    status: SolveStatus = SolveStatus.FEASIBLE
    backend: str = ""
    objective: int | None = None
    bound: int | None = None
    wall_ms: float = 0.0
    stats: SolveStats = field(default_factory=SolveStats)

    @property
    def has_solution(self) -> bool:
        return self.status.has_solution


@dataclass(frozen=True)
class Evaluation:
    feasible: bool
    objective: int
    on_time: int  # requests on time
    problems: tuple[str, ...] = ()


def objective_of(data: ScheduleData, j: int, a: int, start: int) -> int:
    """Objective contribution of job ``j`` placed on alternative ``a`` at ``start``."""
    W, job = data.weights, data.jobs[j]
    alt = job.alts[a]
    v = W.on_time * job.weight - W.gpu_ms * alt.gpu_ms - W.finish_ms * job.weight * (start - job.release + alt.span)
    if alt.migrate:
        v -= W.migration * job.weight
    v -= W.load * alt.loading_gpus
    if start == 0:
        v += W.preemption * job.running
    return v


def constant_of(data: ScheduleData) -> int:
    """Objective part no schedule changes: every running request starts out preempted."""
    return -data.weights.preemption * sum(j.running for j in data.jobs)


def release_offset(data: ScheduleData) -> int:
    """What the backends add to their ``-finish_ms |j| s_j`` terms so that a job absent (at its
    release) counts 0 and a present one ``-(s - release)``, as :func:`objective_of` does."""
    return data.weights.finish_ms * sum(j.weight * j.release for j in data.jobs)


def evaluate(data: ScheduleData, placed: dict[int, tuple[int, int]]) -> Evaluation:
    """Feasibility (windows, one job per request, no GPU used twice) and objective of ``placed``."""
    problems: list[str] = []
    used: dict[int, list[tuple[int, int, int]]] = {g: [(0, b, -1)] for g, b in data.busy.items() if b > 0}
    owner: dict[str, int] = {}
    obj = constant_of(data)
    on_time = 0
    for j, (a, s) in sorted(placed.items()):
        job = data.jobs[j]
        if not 0 <= a < len(job.alts):
            problems.append(f"job {j}: no alternative {a}")
            continue
        alt = job.alts[a]
        if not job.release <= s <= alt.latest:
            problems.append(f"job {j}: start {s} outside [{job.release}, {alt.latest}]")
        for rid in job.ids:
            if rid in owner:
                problems.append(f"request {rid!r} in jobs {owner[rid]} and {j}")
            owner[rid] = j
        for g, s0, e0 in data.job_intervals(j, a, s):
            if e0 > s0:
                used.setdefault(g, []).append((s0, e0, j))
        obj += objective_of(data, j, a, s)
        on_time += job.weight
    for g, spans in used.items():
        spans.sort()
        for (s0, e0, j0), (s1, e1, j1) in zip(spans, spans[1:]):
            if s1 < e0:
                problems.append(f"GPU {g}: jobs {j0} and {j1} overlap")
    return Evaluation(not problems, obj, on_time, tuple(problems))
