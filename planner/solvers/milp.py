"""The round formulation as a PuLP MILP, solved with CBC or HiGHS.

Same data (``options.build_options``), same variables, same constraints and
the same objective terms (``cpsat.objective.objective_terms``) as the CP-SAT
backend; the only difference is how an implication is written. CP-SAT's
``only_enforce_if(b)`` becomes a big-M row ``expr <= rhs + M (1 - b)`` with
``M`` = the largest value ``expr`` can take minus ``rhs`` (computed from
the options, so it is tight). On instances both solve to optimality the two
optima are equal (tests/test_solvers.py checks it).

``solver="cbc"`` runs PULP_CBC_CMD (the CBC binary bundled with PuLP),
``solver="highs"`` runs HiGHS through highspy: in process (PuLP's HiGHS API)
when highspy can load, else in a child Python process that reads the model
as MPS. ortools bundles its own ``libhighs.so.1`` under the same soname, so
once ortools is loaded (it always is next to the CP-SAT backend) highspy's
extension cannot load in that process, and the other way round. Both get a
relative gap of 0, so "optimal" means proven optimal. This backend is for
cross-checking and comparison, not for the per-round latency target: PuLP
builds models in pure Python and CBC runs as a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Iterable

from ortools.sat.python import cp_model as _cp_model  # noqa: F401  (load ortools' libhighs before pulp's highspy)
import pulp

from planner.problem import RoundProblem
from planner.solvers.cpsat.objective import objective_terms
from planner.solvers.options import RoundOptions, Weights, build_options, capacity_rows, step_rows
from planner.solvers.pulp_vars import new_var
from planner.solvers.solution import Solution, SolveStatus

SOLVERS = ("cbc", "highs")


def _lin(terms) -> pulp.LpAffineExpression:
    return pulp.LpAffineExpression([(v, c) for v, c in terms if c])


class _Model:
    def __init__(self, ro: RoundOptions) -> None:
        self.ro = ro
        self.prob = pulp.LpProblem("round", pulp.LpMaximize)
        opts = ro.options
        self.x = [new_var(self.prob, f"x{o.index}", cat=pulp.LpBinary) for o in opts]
        self.qv = {o.index: new_var(self.prob, f"q{o.index}", 0, o.q, cat=pulp.LpInteger) for o in opts if o.var_q}
        self.y = [new_var(self.prob, f"y{g.index}", 0, g.max_count, cat=pulp.LpInteger) for g in ro.groups]
        self.z = {key: new_var(self.prob, f"z{key[0]}_{key[1][0]}", cat=pulp.LpBinary) for key in ro.pin_parents}
        self.on0, self.onS, self.onH, self.proof, self.proj = {}, {}, {}, {}, {}
        for ri in ro.reqs:
            if ri.on0 is None:
                self.on0[ri.index] = new_var(self.prob, f"on0_{ri.index}", cat=pulp.LpBinary)
            if ri.onS is None:
                self.onS[ri.index] = new_var(self.prob, f"onS_{ri.index}", cat=pulp.LpBinary)
            if ro.horizon > 1 and ri.onH is None:
                self.onH[ri.index] = new_var(self.prob, f"onH_{ri.index}", cat=pulp.LpBinary)
                for h in ri.proof_rounds:
                    self.proof[ri.index, h] = new_var(self.prob, f"pf{ri.index}_{h}", cat=pulp.LpBinary)
                if ri.stage != "decode" and ri.proof_rounds:
                    self.proj[ri.index] = new_var(self.prob, f"pj{ri.index}", cat=pulp.LpBinary)
        self._n = 0
        self.constraints()
        self.objective()

    def add(self, c) -> None:
        self.prob += c, f"c{self._n}"
        self._n += 1

    def implies(self, b, terms, rhs: int, most: int) -> None:
        """b = 1 => sum terms <= rhs, as a big-M row (nothing when it always holds)."""
        M = most - rhs
        if M <= 0:
            return
        self.add(_lin(terms) + M * b <= rhs + M)

    def constraints(self) -> None:
        ro, opts, x, R = self.ro, self.ro.options, self.x, self.ro.R
        for ri in ro.reqs:
            for h in range(ri.first, ro.horizon):
                cov = ro.covering(ri.index, h)
                if len(cov) > 1:
                    self.add(pulp.lpSum(x[i] for i in cov) <= 1)
            if ri.stage in ("encode", "decode"):
                once = [i for h in range(ro.horizon) for i in ri.options[h] if opts[i].stage == ri.stage]
                if len(once) > 1:
                    self.add(pulp.lpSum(x[i] for i in once) <= 1)
            if ri.stage == "encode":
                enc_before = []
                for h in range(ri.first, ro.horizon):
                    diff = [i for i in ri.options[h] if opts[i].stage == "diffuse"]
                    if diff:
                        self.add(pulp.lpSum(x[i] for i in diff) - pulp.lpSum(enc_before) <= 0)
                    enc_before += [x[i] for i in ri.options[h] if opts[i].stage == "encode"]
        for i, q in self.qv.items():
            self.add(q - x[i] >= 0)
            self.add(q - opts[i].q * x[i] <= 0)
        var = {"x": x.__getitem__, "q": self.qv.__getitem__}
        for kind, terms, i, rem in step_rows(ro):
            done = [(var[k](j), c) for k, j, c in terms]
            if kind == "complete":  # linear form of: x_i -> done + q_i >= rem
                self.add(_lin(done + [(self.qv[i], 1), (x[i], -rem)]) >= 0)
            else:
                self.add(_lin(done) <= rem)
        for g in ro.groups:
            self.add(g.max_batch * self.y[g.index] - pulp.lpSum(x[i] for i in g.members) >= 0)
        var = {"x": x.__getitem__, "y": self.y.__getitem__, "z": self.z.__getitem__}
        for terms, rhs in capacity_rows(ro):
            self.add(_lin([(var[kind](key), c) for kind, key, c in terms]) <= rhs)
        # pins

        def var(kind: str, j: int):
            return x[j] if kind == "x" else self.y[j]

        per_gpu: dict[int, list] = {}
        for blk, users in ro.pins.items():
            for kind, j in users:
                for g in blk:
                    per_gpu.setdefault(g, []).append(var(kind, j))
        for g, vs in per_gpu.items():
            if len(vs) > 1:
                self.add(pulp.lpSum(vs) <= 1)
        for key, users in ro.pin_parents.items():
            for kind, j in users:
                self.add(self.z[key] - var(kind, j) >= 0)
        # deadlines
        for sustained, ind in ((False, self.on0), (True, self.onS)):
            for r, b in ind.items():
                skip_ok, good, bad = ro.on0_split(r, sustained)
                if skip_ok:
                    self.add(b + pulp.lpSum(x[i] for i in bad) <= 1)
                else:
                    self.add(b - pulp.lpSum(x[i] for i in good) <= 0)
        for r, b in self.onH.items():
            ri = ro.reqs[r]
            mine = [i for h in range(ro.horizon) for i in ri.options[h]]
            if ri.stage == "decode":
                for h in ri.proof_rounds:
                    self.add(self.proof[r, h] - pulp.lpSum(x[i] for i in ri.options[h]) <= 0)
                self.add(b - pulp.lpSum(self.proof[r, h] for h in ri.proof_rounds) <= 0)
                continue
            terms = [(x[i], opts[i].cH) for i in mine]
            terms += [(self.qv[i], opts[i].cH_step) for i in mine if opts[i].var_q]
            pj = self.proj.get(r, b)
            self.implies(pj, terms, ri.dl - ri.baseH, ri.maxH - ri.baseH)
            if r not in self.proj:
                continue
            self.add(b - pj - pulp.lpSum(self.proof[r, h] for h in ri.proof_rounds) <= 0)
            for h in ri.proof_rounds:
                pf = self.proof[r, h]
                finals = [i for i in ri.options[h] if opts[i].final]
                self.add(pulp.lpSum(x[i] for i in finals) - pf >= 0)
                t = []
                for i in mine:
                    o = opts[i]
                    if o.round < h:
                        t.append((x[i], o.dur - ro.wait_sum(r, o.round, min(o.round + o.span, h))))
                        if o.var_q:
                            t.append((self.qv[i], o.step))
                    elif o.round == h and o.final:
                        t.append((x[i], o.dur))
                        if o.var_q:
                            t.append((self.qv[i], o.step))
                off = ri.dec + ri.start + ro.wait_sum(r, ri.first, h)
                self.implies(pf, t, ri.dl - off, ri.proof_max[h] - off)

        ind = {"on0": self.on0, "onS": self.onS, "onH": self.onH}
        for kind, members, rhs in ro.energy_rows:
            self.add(_lin([(ind[kind][r], e) for r, e in members]) <= rhs)

    def objective(self) -> None:
        lookup = {"x": self.x, "q": self.qv, "y": self.y, "on0": self.on0, "onS": self.onS, "onH": self.onH}
        terms = [(lookup[k][j], c) for k, j, c in objective_terms(self.ro)]
        self.prob += _lin(terms) + self.ro.constant


def solve(problem: RoundProblem | RoundOptions, time_limit_s: float = 10.0, num_workers: int = 1,
          hint: Iterable[int] = (), *, solver: str = "cbc", horizon: int | None = None,
          weights: Weights = Weights()) -> Solution:
    """Solve one round problem as a MILP (``solver``: "cbc" or "highs"); ``hint`` is unused."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown MILP solver {solver!r}; choose from {', '.join(SOLVERS)}")
    t0 = time.perf_counter()
    ro = problem if isinstance(problem, RoundOptions) else build_options(problem, horizon, weights)
    m = _Model(ro)
    t_model = time.perf_counter()
    name = f"milp-{solver}"
    bound = None
    try:
        if solver == "cbc":
            m.prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=0.0, gapAbs=0.0,
                                           threads=max(1, num_workers)))
            status = _pulp_status(m.prob)
        elif pulp.HiGHS(msg=False).available():
            m.prob.solve(pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=0.0, gapAbs=0.0,
                                    threads=max(1, num_workers)))
            status = _pulp_status(m.prob)
        else:
            status, bound = _highs_child(m.prob, time_limit_s, num_workers)
    except Exception as exc:  # the solver binary or library failed
        return Solution(SolveStatus.ERROR, backend=name, wall_ms=(time.perf_counter() - t0) * 1e3,
                        stats={"error": repr(exc), **ro.stats})
    t_end = time.perf_counter()
    stats = {"model_ms": (t_model - t0) * 1e3, "solve_ms": (t_end - t_model) * 1e3, **ro.stats}
    sol = Solution(status, backend=name, wall_ms=(t_end - t0) * 1e3, stats=stats)
    if status.has_solution:
        sol.chosen = tuple(i for i, v in enumerate(m.x) if (v.value() or 0) > 0.5)
        sol.q = {i: int(round(q.value() or 0)) for i, q in m.qv.items() if (m.x[i].value() or 0) > 0.5}
        val = pulp.value(m.prob.objective)  # None for an empty model
        sol.objective = round(val) if val is not None else m.ro.constant  # integer by construction
        sol.bound = sol.objective if status is SolveStatus.OPTIMAL else (
            round(bound + m.ro.constant) if bound is not None else None)
    return sol


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
