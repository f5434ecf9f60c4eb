"""CP-SAT backend of the schedule model (docs/architecture.md, "The schedule model").

Per job ``j``: ``p_j`` (on time), a start ``s_j`` in ``[release, latest]``,
and per alternative ``x_ja`` with ``sum_a x_ja = p_j``. Alternative ``a``
is two optional intervals with presence ``x_ja``: ``[s_j, s_j + span)`` on
its first GPU and ``[s_j + lead, s_j + lead + diff)`` on the others, and
``x_ja => s_j <= latest_a`` (on time in seconds, see ``data.py``). Every GPU
carries one NoOverlap over the intervals that may use it plus its in-flight
work ``[0, busy)``. A request is in at most one present job (alone or in one
batch). ``c_j => s_j = 0`` marks a running request continued now.

Maximised, integer: ``sum W.on_time * |j| p_j + W.preemption * running_j c_j
- sum_a x_ja (W.gpu_ms gpu_ms_a + W.migration |j| migrate_a + W.load loads_a + W.finish_ms |j| span_a)
- W.finish_ms |j| s_j`` (absent jobs start at their release: a constant).

Reproducible: one worker, a fixed seed and CP-SAT's deterministic time
limit; a wall-clock limit is only set when asked (the service, where real
time rules). The greedy list schedule (and the previous plan) is hinted as a
complete solution, so the search starts from a feasible incumbent.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from ditplan.planner.solvers.cpsat_params import configure
from ditplan.planner.solvers.data import ScheduleData
from ditplan.planner.solvers.solution import Schedule, SolveStats, SolveStatus, constant_of, release_offset

_STATUS = {
    cp_model.OPTIMAL: SolveStatus.OPTIMAL,
    cp_model.FEASIBLE: SolveStatus.FEASIBLE,
    cp_model.INFEASIBLE: SolveStatus.INFEASIBLE,
    cp_model.MODEL_INVALID: SolveStatus.MODEL_INVALID,
    cp_model.UNKNOWN: SolveStatus.TIMEOUT_NO_SOLUTION,
}


@dataclass
class _Vars:
    present: list
    start: list
    x: list  # per job: per alternative
    cont: dict  # job -> continued-now literal (running jobs)


def build_model(data: ScheduleData) -> tuple[cp_model.CpModel, _Vars]:
    m = cp_model.CpModel()
    W = data.weights
    per_gpu: dict[int, list] = {g: [] for g in data.gpus}
    for g, b in data.busy.items():
        if b > 0:
            per_gpu[g].append(m.new_fixed_size_interval_var(0, b, f"busy{g}"))
    present, start, xs, cont = [], [], [], {}
    terms: list = []
    for job in data.jobs:
        j = job.index
        p = m.new_bool_var(f"p{j}")
        s = m.new_int_var(job.release, max(a.latest for a in job.alts), f"s{j}")
        x = []
        for a, alt in enumerate(job.alts):
            xa = m.new_bool_var(f"x{j}_{a}")
            m.add(s <= alt.latest).only_enforce_if(xa)
            for g, off, n in alt.holds:
                per_gpu[g].append(m.new_optional_fixed_size_interval_var(s + off if off else s, n, xa,
                                                                         f"i{j}_{a}_{g}"))
            cost = W.gpu_ms * alt.gpu_ms + W.finish_ms * job.weight * alt.span
            if alt.migrate:
                cost += W.migration * job.weight
            cost += W.load * alt.loading_gpus
            terms.append((xa, -cost))
            x.append(xa)
        m.add(sum(x) == p)
        terms.append((p, W.on_time * job.weight))
        terms.append((s, -W.finish_ms * job.weight))
        if job.running and job.release == 0:
            c = m.new_bool_var(f"c{j}")
            m.add_implication(c, p)
            m.add(s == 0).only_enforce_if(c)
            terms.append((c, W.preemption * job.running))
            cont[j] = c
        present.append(p)
        start.append(s)
        xs.append(x)
    for g, ivs in per_gpu.items():
        if len(ivs) > 1:
            m.add_no_overlap(ivs)
    for rid, js in data.members.items():
        if len(js) > 1:
            m.add_at_most_one(present[j] for j in js)
    m.maximize(cp_model.LinearExpr.weighted_sum([t for t, _ in terms], [c for _, c in terms])
               + constant_of(data) + release_offset(data))
    return m, _Vars(present, start, xs, cont)


def add_hint(m: cp_model.CpModel, data: ScheduleData, v: _Vars, sched: Schedule) -> None:
    """Hint ``sched`` as a complete solution (absent jobs at their release)."""
    for job in data.jobs:
        j = job.index
        a, s = sched.placed.get(j, (None, job.release))
        m.add_hint(v.present[j], a is not None)
        m.add_hint(v.start[j], s)
        for i, xa in enumerate(v.x[j]):
            m.add_hint(xa, i == a)
        if j in v.cont:
            m.add_hint(v.cont[j], a is not None and s == 0)


def solve(data: ScheduleData, time_limit_s: float = 0.05, hint: Schedule | None = None, *, seed: int = 0,
          num_workers: int = 1, wall_limit_s: float | None = None, log: bool = False) -> Schedule:
    """Solve with CP-SAT within ``time_limit_s`` deterministic seconds (see the module doc)."""
    t0 = time.perf_counter()
    if not data.jobs:
        return Schedule({}, SolveStatus.OPTIMAL, "cpsat", constant_of(data), constant_of(data))
    m, v = build_model(data)
    if hint is not None:
        add_hint(m, data, v, hint)
    t_model = time.perf_counter()
    solver = cp_model.CpSolver()
    configure(solver, time_limit_s, seed, num_workers, wall_limit_s, light_presolve=True)
    solver.parameters.log_search_progress = log
    code = solver.solve(m)
    status = _STATUS.get(code, SolveStatus.ERROR)
    t_end = time.perf_counter()
    wall_limited = wall_limit_s is not None and solver.wall_time >= wall_limit_s * 0.99
    out = Schedule(status=status, backend="cpsat", wall_ms=(t_end - t0) * 1e3,
                   stats=SolveStats((t_model - t0) * 1e3, (t_end - t_model) * 1e3, solver.deterministic_time,
                                    wall_limited, len(data.jobs), sum(len(j.alts) for j in data.jobs)))
    if status.has_solution:
        for job in data.jobs:
            j = job.index
            if solver.boolean_value(v.present[j]):
                a = next(i for i, xa in enumerate(v.x[j]) if solver.boolean_value(xa))
                out.placed[j] = (a, int(solver.value(v.start[j])))
        out.objective = round(solver.objective_value)
        out.bound = round(solver.best_objective_bound)
    return out
