"""The schedule model as a PuLP MILP, solved with CBC or HiGHS.

Same data (:class:`~planner.solvers.data.ScheduleData`), same decisions and
the same integer objective as the CP-SAT backend (``cpsat.py``); only the
NoOverlap is written differently. Each pair of intervals of two jobs that
may share a GPU gets an order binary ``y`` with big-M rows (``M`` = the
data's horizon), and in-flight work ``[0, busy)`` becomes a release on that
GPU. On instances both solve to optimality the two optima are equal
(tests/test_solvers.py). The tiers of the objective span twelve orders of
magnitude, beyond what a floating-point MILP resolves exactly at scale:
this backend is for cross-checking small instances and for comparison,
not for the per-plan latency target.

``solver="cbc"`` runs PULP_CBC_CMD (the CBC binary bundled with PuLP),
``solver="highs"`` runs HiGHS through highspy: in process when highspy can
load, else in a child Python process that reads the model as MPS. ortools
bundles its own ``libhighs.so.1`` under the same soname, so once ortools is
loaded (it always is next to the CP-SAT backend) highspy's extension cannot
load in that process, and the other way round.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from ortools.sat.python import cp_model as _cp_model  # noqa: F401  (load ortools' libhighs before pulp's highspy)
import pulp

from ditplan.planner.solvers.data import ScheduleData
from ditplan.planner.solvers.pulp_vars import new_var
from ditplan.planner.solvers.solution import Schedule, SolveStats, SolveStatus, constant_of, release_offset

SOLVERS = ("cbc", "highs")


def build_model(data: ScheduleData) -> tuple[pulp.LpProblem, list, list, list]:
    """(problem, present, start, x) of the schedule model."""
    W = data.weights
    prob = pulp.LpProblem("schedule", pulp.LpMaximize)
    M = data.horizon + max([b for b in data.busy.values()] + [0]) + 1
    present, start, xs = [], [], []
    obj = []
    ivs: dict[int, list] = {}  # GPU -> (job, x, offset, length)
    for job in data.jobs:
        j = job.index
        p = new_var(prob, f"p{j}", cat=pulp.LpBinary)
        s = new_var(prob, f"s{j}", job.release, max(a.latest for a in job.alts), cat=pulp.LpInteger)
        x = [new_var(prob, f"x{j}_{a}", cat=pulp.LpBinary) for a in range(len(job.alts))]
        prob += pulp.lpSum(x) - p == 0
        for a, alt in enumerate(job.alts):
            prob += s - alt.latest <= M * (1 - x[a])
            for g, off, n in alt.holds:
                ivs.setdefault(g, []).append((j, x[a], off, n))
            cost = W.gpu_ms * alt.gpu_ms + W.finish_ms * job.weight * alt.span
            if alt.migrate:
                cost += W.migration * job.weight
            cost += W.load * alt.loading_gpus
            obj.append((x[a], -cost))
        obj += [(p, W.on_time * job.weight), (s, -W.finish_ms * job.weight)]
        if job.running and job.release == 0:
            c = new_var(prob, f"c{j}", cat=pulp.LpBinary)
            prob += c - p <= 0
            prob += s <= M * (1 - c)
            obj.append((c, W.preemption * job.running))
        present.append(p)
        start.append(s)
        xs.append(x)
    n = 0
    for g, lst in sorted(ivs.items()):
        busy = data.busy.get(g, 0)
        for j, xa, off, ln in lst:
            if busy > 0 and ln > 0:
                prob += start[j] + off >= busy - M * (1 - xa)
        pairs: dict[tuple[int, int], object] = {}
        for u in range(len(lst)):
            for v in range(u + 1, len(lst)):
                (ju, xu, ou, lu), (jv, xv, ov, lv) = lst[u], lst[v]
                if ju == jv or lu == 0 or lv == 0:
                    continue
                key = (min(ju, jv), max(ju, jv))
                if key not in pairs:  # one order per job pair and GPU
                    pairs[key] = new_var(prob, f"y{g}_{key[0]}_{key[1]}", cat=pulp.LpBinary)
                    n += 1
                y = pairs[key] if ju < jv else 1 - pairs[key]  # y = 1: ju first
                prob += start[ju] + ou + lu <= start[jv] + ov + M * (1 - y) + M * (2 - xu - xv)
                prob += start[jv] + ov + lv <= start[ju] + ou + M * y + M * (2 - xu - xv)
    for rid, js in data.members.items():
        if len(js) > 1:
            prob += pulp.lpSum(present[j] for j in js) <= 1
    prob += pulp.LpAffineExpression([(v, c) for v, c in obj if c]) + constant_of(data) + release_offset(data)
    return prob, present, start, xs


def solve(data: ScheduleData, time_limit_s: float = 10.0, hint: Schedule | None = None, *,
          solver: str = "cbc", num_workers: int = 1) -> Schedule:
    """Solve the schedule model as a MILP (``solver``: "cbc" or "highs"); ``hint`` is unused."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown MILP solver {solver!r}; choose from {', '.join(SOLVERS)}")
    t0 = time.perf_counter()
    name = f"milp-{solver}"
    if not data.jobs:
        return Schedule({}, SolveStatus.OPTIMAL, name, constant_of(data), constant_of(data))
    prob, present, start, xs = build_model(data)
    t_model = time.perf_counter()
    bound = None
    try:
        if solver == "cbc":
            prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=0.0, gapAbs=0.0,
                                         threads=max(1, num_workers)))
            status = _pulp_status(prob)
        elif pulp.HiGHS(msg=False).available():
            prob.solve(pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=0.0, gapAbs=0.0,
                                  threads=max(1, num_workers)))
            status = _pulp_status(prob)
        else:
            status, bound = _highs_child(prob, time_limit_s, num_workers)
    except Exception as exc:  # the solver binary or library failed
        return Schedule(status=SolveStatus.ERROR, backend=name, wall_ms=(time.perf_counter() - t0) * 1e3,
                        stats=SolveStats(error=repr(exc)))
    t_end = time.perf_counter()
    out = Schedule(status=status, backend=name, wall_ms=(t_end - t0) * 1e3,
                   stats=SolveStats((t_model - t0) * 1e3, (t_end - t_model) * 1e3))
    if status.has_solution:
        for job in data.jobs:
            j = job.index
            if (present[j].value() or 0) > 0.5:
                a = max(range(len(xs[j])), key=lambda a: xs[j][a].value() or 0)
                out.placed[j] = (a, int(round(start[j].value() or 0)))
        val = pulp.value(prob.objective)
        out.objective = round(val) if val is not None else constant_of(data)
        out.bound = out.objective if status is SolveStatus.OPTIMAL else (round(bound) if bound is not None else None)
    return out


def _pulp_status(prob: pulp.LpProblem) -> SolveStatus:
    sol_status = getattr(prob, "sol_status", None)
    if prob.status == pulp.LpStatusOptimal and sol_status in (None, pulp.LpSolutionOptimal):
        return SolveStatus.OPTIMAL
    if sol_status == pulp.LpSolutionIntegerFeasible or (
            prob.status == pulp.LpStatusOptimal and sol_status != pulp.LpSolutionNoSolutionFound):
        return SolveStatus.FEASIBLE
    if prob.status == pulp.LpStatusInfeasible:
        return SolveStatus.INFEASIBLE
    return SolveStatus.TIMEOUT_NO_SOLUTION


_CHILD = r"""
import json, sys
import highspy
path, limit, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
h = highspy.Highs()
h.setOptionValue("output_flag", False)
h.setOptionValue("time_limit", limit)
h.setOptionValue("mip_rel_gap", 0.0)
h.setOptionValue("mip_abs_gap", 0.0)
h.setOptionValue("threads", threads)
h.readModel(path)
h.run()
st = h.getModelStatus()
info = h.getInfo()
sol = h.getSolution()
lp = h.getLp()
out = {"status": h.modelStatusToString(st), "primal": int(info.primal_solution_status),
       "bound": info.mip_dual_bound, "values": dict(zip(lp.col_names_, sol.col_value))}
json.dump(out, sys.stdout)
"""


def _highs_child(prob: pulp.LpProblem, time_limit_s: float, num_workers: int) -> tuple[SolveStatus, float | None]:
    """Solve ``prob`` with highspy in a child process (MPS in, JSON out); set its variables' values."""
    with tempfile.TemporaryDirectory(prefix="ditplan-highs-") as tmp:
        path = os.path.join(tmp, "round.mps")
        prob.writeMPS(path, with_objsense=True)
        proc = subprocess.run([sys.executable, "-c", _CHILD, path, str(time_limit_s), str(max(1, num_workers))],
                              capture_output=True, text=True, timeout=time_limit_s + 30.0)
    if proc.returncode != 0:
        raise RuntimeError(f"HiGHS child failed: {proc.stderr.strip()[-500:]}")
    out = json.loads(proc.stdout)
    values = out["values"]
    has = out["primal"] == 2  # kSolutionStatusFeasible
    if has:
        for v in prob.variables():
            if v.name in values:
                v.varValue = values[v.name]
    bound = out.get("bound")
    if out["status"] == "Optimal":
        return SolveStatus.OPTIMAL, bound
    if out["status"] == "Infeasible":
        return SolveStatus.INFEASIBLE, None
    return (SolveStatus.FEASIBLE if has else SolveStatus.TIMEOUT_NO_SOLUTION), bound
