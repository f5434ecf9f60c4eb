"""Solver backends of the schedule model (docs/architecture.md, "The schedule model").

Layout, PyJobShop style: one immutable ``RoundProblem`` (planner/problem.py)
-> ``data.build_schedule`` turns it into the schedule data of one scope
(jobs, their alternatives, in integer ticks) -> a backend (``cpsat.solve``
or ``milp.solve``, warm-started by ``greedy.greedy``) returns a
``Schedule`` with a status of our own -> ``commit`` turns the work that
starts now into a RoundPlan. ``solution.evaluate`` scores any schedule
independently of every solver.

Import order matters: ortools and highspy each ship a ``libhighs.so.1`` (same
soname, different versions), and whichever loads first wins the process.
PuLP imports highspy when it is imported, so ortools is imported here first;
import ``planner.solvers`` before ``pulp`` anywhere CP-SAT is used. The MILP
backend then runs HiGHS in a child process (see milp.py).
"""
from ortools.sat.python import cp_model as _cp_model  # noqa: F401  (before pulp, see above)
from ditplan.planner.solvers.data import ScheduleData, ScheduleParams, Weights, build_schedule
from ditplan.planner.solvers.solution import Schedule, SolveStatus, evaluate

__all__ = ["Schedule", "ScheduleData", "ScheduleParams", "SolveStatus", "Weights", "build_schedule", "evaluate"]
