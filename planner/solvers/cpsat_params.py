"""CP-SAT parameters, one home for the rolling planner (``planner/solvers/cpsat.py``) and the offline bound."""
from __future__ import annotations

from ortools.sat.python import cp_model


def configure(solver: cp_model.CpSolver, deterministic_s: float | None, seed: int = 0, num_workers: int = 1,
              wall_s: float | None = None, *, light_presolve: bool = False) -> None:
    """Fixed seed, workers, and the limits asked for.

    A deterministic limit makes a solve repeat on any machine (with several
    workers, through CP-SAT's interleaved parallel search); a wall-clock limit
    is then only a safety cap. ``light_presolve`` turns probing and symmetry
    detection off: on a budget of milliseconds they cost more than they save.
    """
    prm = solver.parameters
    prm.random_seed = int(seed)
    prm.num_workers = max(1, int(num_workers))
    if deterministic_s is not None:
        prm.max_deterministic_time = max(1e-6, float(deterministic_s))
        if prm.num_workers > 1:
            prm.interleave_search = True
    if wall_s is not None:
        prm.max_time_in_seconds = max(1e-6, float(wall_s))
    if light_presolve:
        prm.cp_model_probing_level = 0
        prm.symmetry_level = 0
