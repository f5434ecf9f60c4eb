"""CP-SAT variables of the round formulation (one container, built once per solve)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from planner.solvers.options import RoundOptions


@dataclass
class Variables:
    x: list  # per option: chosen (bool)
    qv: dict[int, cp_model.IntVar]  # variable-step option -> steps it runs (0 when not chosen)
    y: list  # per batch group class: how many groups (pinned: 0/1)
    z: dict[tuple, cp_model.IntVar] = field(default_factory=dict)  # (L, free L-block) blocked by a pin inside
    on0: dict[int, cp_model.IntVar] = field(default_factory=dict)  # request -> on track after round 0 (fastest tail)
    onS: dict[int, cp_model.IntVar] = field(default_factory=dict)  # ... (sustainable tail)
    onH: dict[int, cp_model.IntVar] = field(default_factory=dict)  # request -> on time over the horizon
    proof: dict[tuple[int, int], cp_model.IntVar] = field(default_factory=dict)  # (request, h): finishes on time in round h
    proj: dict[int, cp_model.IntVar] = field(default_factory=dict)  # request -> on time by the horizon projection


def make_variables(model: cp_model.CpModel, ro: RoundOptions) -> Variables:
    x = [model.new_bool_var(f"x{o.index}") for o in ro.options]
    qv = {o.index: model.new_int_var(0, o.q, f"q{o.index}") for o in ro.options if o.var_q}
    y = [model.new_int_var(0, g.max_count, f"y{g.index}") for g in ro.groups]
    v = Variables(x, qv, y)
    for key in ro.pin_parents:
        v.z[key] = model.new_bool_var(f"z{key[0]}_{key[1][0]}")
    for ri in ro.reqs:
        if ri.on0 is None:
            v.on0[ri.index] = model.new_bool_var(f"on0_{ri.index}")
        if ri.onS is None:
            v.onS[ri.index] = model.new_bool_var(f"onS_{ri.index}")
        if ro.horizon > 1 and ri.onH is None:
            v.onH[ri.index] = model.new_bool_var(f"onH_{ri.index}")
            for h in ri.proof_rounds:
                v.proof[ri.index, h] = model.new_bool_var(f"pf{ri.index}_{h}")
            if ri.stage != "decode" and ri.proof_rounds:
                v.proj[ri.index] = model.new_bool_var(f"pj{ri.index}")
    return v
