"""One entry point: ``solve(problem, time_limit_s, num_workers, hint)`` -> Solution.

Reproducibility: by default the search is deterministic. CP-SAT runs with a
fixed ``random_seed`` and stops on ``max_deterministic_time`` (its own work
counter, about seconds on a typical core, independent of machine load), with
one worker, or several workers under ``interleave_search`` (deterministic
interleaving). The wall-clock ``max_time_in_seconds`` is only a safety net
(``safety_factor`` times the limit): when it fires first the result can
depend on machine speed, which ``Solution.stats['wall_limited']`` reports.
Pass ``deterministic=False`` to use the wall-clock limit with parallel
portfolio workers instead.
"""
from __future__ import annotations

import time
from typing import Iterable

from ortools.sat.python import cp_model

from planner.problem import RoundProblem
from planner.solvers.cpsat.constraints import add_all
from planner.solvers.cpsat.objective import set_objective
from planner.solvers.cpsat.variables import Variables, make_variables
from planner.solvers.greedy import greedy
from planner.solvers.options import RoundOptions, Weights, build_options
from planner.solvers.solution import Solution, SolveStatus, evaluate

_STATUS = {
    cp_model.OPTIMAL: SolveStatus.OPTIMAL,
    cp_model.FEASIBLE: SolveStatus.FEASIBLE,
    cp_model.INFEASIBLE: SolveStatus.INFEASIBLE,
    cp_model.MODEL_INVALID: SolveStatus.MODEL_INVALID,
    cp_model.UNKNOWN: SolveStatus.TIMEOUT_NO_SOLUTION,
}


def build_model(ro: RoundOptions) -> tuple[cp_model.CpModel, Variables]:
    model = cp_model.CpModel()
    v = make_variables(model, ro)
    add_all(model, ro, v)
    set_objective(model, ro, v)
    return model, v


def add_hint(model: cp_model.CpModel, ro: RoundOptions, v: Variables, chosen: Iterable[int],
             q: dict[int, int] | None = None) -> bool:
    """Hint a complete solution: ``chosen`` options and every auxiliary variable they imply.

    Returns False (and hints nothing) when the choice is infeasible in the model.
    """
    chosen = set(chosen)
    ev = evaluate(ro, chosen, q)
    if not ev.feasible:
        return False
    for o in ro.options:
        model.add_hint(v.x[o.index], o.index in chosen)
    for i, qv in v.qv.items():
        model.add_hint(qv, ev.steps.get(i, 0))
    for g in ro.groups:
        model.add_hint(v.y[g.index], ev.groups.get(g.index, 0))
    for key, zv in v.z.items():
        model.add_hint(zv, key in ev.parents)
    for r, b in v.on0.items():
        model.add_hint(b, ev.on0.get(r, 0))
    for r, b in v.onS.items():
        model.add_hint(b, ev.onS.get(r, 0))
    for r, b in v.onH.items():
        model.add_hint(b, ev.onH.get(r, 0))
    for r, b in v.proj.items():
        model.add_hint(b, ev.proj.get(r, 0))
    for key, b in v.proof.items():
        model.add_hint(b, ev.proofs.get(key, 0))
    return True


def warm_start(ro: RoundOptions, hint: Iterable[int] = ()) -> tuple[list[int], dict[int, int], int]:
    """The better of the greedy solution and ``hint`` (e.g. the previous plan), by the model's objective."""
    g_chosen, g_q = greedy(ro)
    best = (g_chosen, g_q, evaluate(ro, g_chosen, g_q))
    hint = list(hint)
    if hint:
        ev = evaluate(ro, hint)
        if ev.feasible and (not best[2].feasible or ev.objective > best[2].objective):
            best = (hint, ev.steps, ev)
    return best[0], best[1], best[2].objective if best[2].feasible else None


def solve(problem: RoundProblem | RoundOptions, time_limit_s: float = 0.05, num_workers: int = 1,
          hint: Iterable[int] = (), *, seed: int = 0, deterministic: bool = True,
          safety_factor: float = 4.0, horizon: int | None = None, weights: Weights = Weights(),
          warm: bool = True, light_presolve: bool = True, log: bool = False) -> Solution:
    """Solve one round problem with CP-SAT (see the module doc for the limits).

    ``hint``: option indices of a previous plan. With ``warm`` the better of
    it and the greedy solution is hinted as a complete solution, so the search
    starts from a good incumbent. ``light_presolve`` turns off probing and
    symmetry detection and runs one presolve pass: on these models they cost
    more of a tight budget than they save.
    """
    t0 = time.perf_counter()
    ro = problem if isinstance(problem, RoundOptions) else build_options(problem, horizon, weights)
    t_opts = time.perf_counter()
    model, v = build_model(ro)
    warm_obj = None
    if warm:
        chosen, q, warm_obj = warm_start(ro, hint)
        hinted = add_hint(model, ro, v, chosen, q)
    else:
        hinted = add_hint(model, ro, v, hint) if hint else False
    t_model = time.perf_counter()
    solver = cp_model.CpSolver()
    prm = solver.parameters
    prm.random_seed = seed
    prm.num_workers = max(1, int(num_workers))
    prm.log_search_progress = log
    if light_presolve:
        prm.cp_model_probing_level = 0
        prm.symmetry_level = 0
        prm.max_presolve_iterations = 1
    if deterministic:
        prm.max_deterministic_time = max(1e-6, time_limit_s)
        prm.max_time_in_seconds = max(1e-6, time_limit_s * safety_factor)
        if prm.num_workers > 1:
            prm.interleave_search = True
    else:
        prm.max_time_in_seconds = max(1e-6, time_limit_s)
    code = solver.solve(model)
    status = _STATUS.get(code, SolveStatus.ERROR)
    t_end = time.perf_counter()
    stats = {
        "options_ms": (t_opts - t0) * 1e3, "model_ms": (t_model - t_opts) * 1e3,
        "solve_ms": (t_end - t_model) * 1e3, "deterministic_time": solver.deterministic_time,
        "wall_limited": deterministic and solver.wall_time >= prm.max_time_in_seconds * 0.99,
        "hinted": hinted, "warm_objective": warm_obj, **ro.stats,
    }
    sol = Solution(status, backend="cpsat", wall_ms=(t_end - t0) * 1e3, stats=stats)
    if status.has_solution:
        sol.chosen = tuple(i for i, x in enumerate(v.x) if solver.boolean_value(x))
        sol.q = {i: int(solver.value(q)) for i, q in v.qv.items() if solver.boolean_value(v.x[i])}
        sol.objective = round(solver.objective_value)  # integer by construction (ticks, integer weights)
        sol.bound = round(solver.best_objective_bound)
    return sol
