"""Creating PuLP variables across versions: PuLP 3.3 deprecates ``LpVariable(...)``
in favour of ``prob.add_variable``; older releases only have the former."""
from __future__ import annotations

import pulp


def new_var(prob: pulp.LpProblem, name: str, low: float | None = None, up: float | None = None,
            cat: str = pulp.LpContinuous) -> pulp.LpVariable:
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, low, up, cat=cat)
    return pulp.LpVariable(name, low, up, cat=cat)
