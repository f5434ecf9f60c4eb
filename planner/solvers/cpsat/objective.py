"""CP-SAT objective: the weighted sum of ``options.Weights`` (maximised).

    constant
    + w_on0 * sum on0 + w_onS * sum onS + w_onH * sum onH
    + preemption * (round-0 diffuse options of requests that were running)   [the constant holds -preemption each]
    - migration * (round-0 options that move a latent)
    - gpu_ms * (excess GPU-ms of options + GPU-ms of batch groups)
    + progress of round-0 options

``objective_terms`` is shared with the MILP backend so both optimise the
same numbers.
"""
from __future__ import annotations

from ortools.sat.python import cp_model

from planner.solvers.options import RoundOptions


def objective_terms(ro: RoundOptions):
    """(kind, index, coefficient) triples: kind in x, q, y, on0, onH."""
    W, opts = ro.weights, ro.options
    out = []
    for o in opts:
        ri = ro.reqs[o.req]
        c = -W.gpu_ms * o.excess
        if o.round == 0:
            c += o.progress
            if o.migrate:
                c -= W.migration
            if o.stage == "diffuse" and ri.was_running:
                c += W.preemption
        if c:
            out.append(("x", o.index, c))
        if o.var_q and o.excess_step:
            out.append(("q", o.index, -W.gpu_ms * o.excess_step))
    for g in ro.groups:
        out.append(("y", g.index, -W.gpu_ms * g.cost))
    for ri in ro.reqs:
        if ri.on0 is None:
            out.append(("on0", ri.index, ro.w_on0))
        if ri.onS is None:
            out.append(("onS", ri.index, ro.w_onS))
        if ro.horizon > 1 and ri.onH is None:
            out.append(("onH", ri.index, ro.w_onH))
    return out


def set_objective(model: cp_model.CpModel, ro: RoundOptions, v) -> None:
    lookup = {"x": lambda j: v.x[j], "q": lambda j: v.qv[j], "y": lambda j: v.y[j],
              "on0": lambda j: v.on0[j], "onS": lambda j: v.onS[j], "onH": lambda j: v.onH[j]}
    terms = objective_terms(ro)
    model.maximize(cp_model.LinearExpr.weighted_sum([lookup[k](j) for k, j, _ in terms],
                                                    [c for _, _, c in terms]) + ro.constant)
