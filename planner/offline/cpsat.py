"""The CP-SAT solver settings the bound and the schedule search share."""
from __future__ import annotations

from ortools.sat.python import cp_model

STATUS = {cp_model.OPTIMAL: "OPTIMAL", cp_model.FEASIBLE: "FEASIBLE", cp_model.INFEASIBLE: "INFEASIBLE",
          cp_model.MODEL_INVALID: "MODEL_INVALID", cp_model.UNKNOWN: "UNKNOWN"}


def new_solver(time_limit_s: float, num_workers: int, seed: int,
               deterministic_time: float | None) -> cp_model.CpSolver:
    """A solver capped at ``time_limit_s`` wall seconds; a ``deterministic_time`` budget makes it repeat."""
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.max_time_in_seconds = max(0.05, float(time_limit_s))
    p.num_workers = max(1, int(num_workers))
    p.random_seed = int(seed)
    if deterministic_time is not None:
        p.max_deterministic_time = max(0.01, float(deterministic_time))
        if p.num_workers > 1:
            p.interleave_search = True  # deterministic parallel search
    return solver
