"""Solver backends of the round formulation (DESIGN section 4).

Layout, PyJobShop style: one immutable ``RoundProblem`` (planner/problem.py)
-> ``options.build_options`` enumerates every request's options once (degrees,
steps, batch groups, pins, projection coefficients, weights, in integer ticks)
-> a backend (``cpsat.solve`` or ``milp.solve``) returns a ``Solution`` with a
status of our own -> ``convert.to_plan`` places the committed round on
concrete aligned GPU blocks. ``solution.evaluate`` scores any choice of
options independently of every solver.

Import order matters: ortools and highspy each ship a ``libhighs.so.1`` (same
soname, different versions), and whichever loads first wins the process.
PuLP imports highspy when it is imported, so ortools is imported here first;
import ``planner.solvers`` before ``pulp`` anywhere CP-SAT is used. The MILP
backend then runs HiGHS in a child process (see milp.py).
"""
from ortools.sat.python import cp_model as _cp_model  # noqa: F401  (before pulp, see above)
from planner.solvers.convert import PlacementError, to_plan
from planner.solvers.options import RoundOptions, Weights, build_options
from planner.solvers.solution import Solution, SolveStatus, evaluate

__all__ = ["PlacementError", "RoundOptions", "Solution", "SolveStatus", "Weights", "build_options",
           "evaluate", "to_plan"]
