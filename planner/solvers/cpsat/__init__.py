"""CP-SAT backend of the round formulation (variables, constraints, objective, solve)."""
from planner.solvers.cpsat.solve import build_model, solve

__all__ = ["build_model", "solve"]
