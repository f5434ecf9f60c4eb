"""CP-SAT constraints of the round formulation.

Notation: x_o option o chosen, q_o its steps (variable-step options), y_g
groups of batch class g, R round length, all times in integer ticks.

* one option per request per round: sum of x over options covering round h <= 1;
  encode and decode at most once over the horizon;
* encode before diffuse: diffuse at h only if encoded in a round < h;
* steps never exceed what remains: sum q_o x_o (+ q of variable options) <= rem;
  a variable-step option runs exactly the steps left: S_before + q_o = rem;
* batching: max_batch * y_g >= its members; a group, not a member, holds GPUs;
* capacity, round 0, exact buddy constraint over aligned blocks of the idle
  GPUs, for every level L (cluster-wide, since a block lives in one node and
  blocks of a level are interchangeable for placement):
      sum_{free units with k >= L} (k/L) n_u + sum_{pins with |b| >= L} (|b|/L) p
      + sum_{free L-blocks holding a smaller pin} z  <=  free aligned L-blocks,
  with pinned units on pairwise disjoint blocks and z >= each pin inside;
  later rounds: the same per level without pins, GPUs free once in-flight
  work ends (largest-first placement of the committed round always succeeds);
  short encodes/decodes of round 0 only count against the idle GPUs (they
  share a GPU with the work that follows them, see options.py);
* memory: options whose activations do not fit are never generated;
* demand bounds: for deadline thresholds T, the GPU-time still needed by the
  requests an indicator claims on time by T fits in the GPU-time free until T;
* deadlines: on0 => base0 + sum c0 x <= deadline, written as a clause over
  the round-0 options that are (not) on track (one is chosen at most);
  onH => the horizon projection, or a finishing proof of some round h,
  meets the deadline (enforced linear rows).
"""
from __future__ import annotations

from ortools.sat.python import cp_model

from planner.solvers.cpsat.variables import Variables
from planner.solvers.options import RoundOptions, capacity_rows, step_rows


def _sum(model, terms):
    return cp_model.LinearExpr.weighted_sum([t[0] for t in terms], [t[1] for t in terms])


def one_per_round(model: cp_model.CpModel, ro: RoundOptions, v: Variables) -> None:
    for ri in ro.reqs:
        for h in range(ri.first, ro.horizon):
            cov = ro.covering(ri.index, h)
            if len(cov) > 1:
                model.add_at_most_one(v.x[i] for i in cov)
        if ri.stage in ("encode", "decode"):  # that stage runs once over the horizon
            once = [i for h in range(ro.horizon) for i in ri.options[h] if ro.options[i].stage == ri.stage]
            if len(once) > 1:
                model.add_at_most_one(v.x[i] for i in once)


def encode_first(model: cp_model.CpModel, ro: RoundOptions, v: Variables) -> None:
    for ri in ro.reqs:
        if ri.stage != "encode":
            continue
        enc_before = []
        for h in range(ri.first, ro.horizon):
            diff = [i for i in ri.options[h] if ro.options[i].stage == "diffuse"]
            if diff:
                model.add(sum(v.x[i] for i in diff) <= sum(enc_before))
            enc_before += [v.x[i] for i in ri.options[h] if ro.options[i].stage == "encode"]


def steps(model: cp_model.CpModel, ro: RoundOptions, v: Variables) -> None:
    opts = ro.options
    for i, q in v.qv.items():
        model.add(q >= v.x[i])
        model.add(q <= opts[i].q * v.x[i])
    var = {"x": v.x.__getitem__, "q": v.qv.__getitem__}
    for kind, terms, i, rem in step_rows(ro):
        done = _sum(model, [(var[k](j), c) for k, j, c in terms])
        if kind == "complete":
            model.add(done + v.qv[i] >= rem).only_enforce_if(v.x[i])
        else:
            model.add(done <= rem)


def groups(model: cp_model.CpModel, ro: RoundOptions, v: Variables) -> None:
    for g in ro.groups:
        model.add(g.max_batch * v.y[g.index] >= sum(v.x[i] for i in g.members))


def capacity(model: cp_model.CpModel, ro: RoundOptions, v: Variables) -> None:
    var = {"x": v.x.__getitem__, "y": v.y.__getitem__, "z": v.z.__getitem__}
    for terms, rhs in capacity_rows(ro):
        model.add(_sum(model, [(var[kind](key), c) for kind, key, c in terms]) <= rhs)


def pins(model: cp_model.CpModel, ro: RoundOptions, v: Variables) -> None:
    def var(kind: str, j: int):
        return v.x[j] if kind == "x" else v.y[j]

    per_gpu: dict[int, list] = {}
    for blk, users in ro.pins.items():
        for kind, j in users:
            for g in blk:
                per_gpu.setdefault(g, []).append(var(kind, j))
    for g, vs in per_gpu.items():
        if len(vs) > 1:
            model.add(sum(vs) <= 1)
    for key, users in ro.pin_parents.items():
        for kind, j in users:
            model.add(v.z[key] >= var(kind, j))


def on_time(model: cp_model.CpModel, ro: RoundOptions, v: Variables) -> None:
    opts, R = ro.options, ro.R
    for sustained, ind in ((False, v.on0), (True, v.onS)):
        for r, b in ind.items():
            skip_ok, good, bad = ro.on0_split(r, sustained)
            if skip_ok:
                model.add_at_most_one([b] + [v.x[i] for i in bad])
            else:
                model.add(b <= sum(v.x[i] for i in good))
    for r, b in v.onH.items():
        ri = ro.reqs[r]
        mine = [i for h in range(ro.horizon) for i in ri.options[h]]
        if ri.stage == "decode":
            dec = [v.proof[r, h] for h in ri.proof_rounds]
            for h in ri.proof_rounds:
                model.add(v.proof[r, h] <= sum(v.x[i] for i in ri.options[h]))
            model.add(b <= sum(dec))
            continue
        terms = [(v.x[i], opts[i].cH) for i in mine if opts[i].cH]
        terms += [(v.qv[i], opts[i].cH_step) for i in mine if opts[i].var_q and opts[i].cH_step]
        pj = v.proj.get(r, b)
        model.add(_sum(model, terms) <= ri.dl - ri.baseH).only_enforce_if(pj)
        if r not in v.proj:
            continue
        model.add(b <= pj + sum(v.proof[r, h] for h in ri.proof_rounds))
        for h in ri.proof_rounds:
            pf = v.proof[r, h]
            finals = [i for i in ri.options[h] if opts[i].final]
            model.add(sum(v.x[i] for i in finals) >= 1).only_enforce_if(pf)
            # clock_h + duration of the final option + decode <= deadline
            t = []
            for i in mine:
                o = opts[i]
                if o.round < h:
                    t.append((v.x[i], o.dur - ro.wait_sum(r, o.round, min(o.round + o.span, h))))
                    if o.var_q:
                        t.append((v.qv[i], o.step))
                elif o.round == h and o.final:
                    t.append((v.x[i], o.dur))
                    if o.var_q:
                        t.append((v.qv[i], o.step))
            rhs = ri.dl - ri.dec - ri.start - ro.wait_sum(r, ri.first, h)
            model.add(_sum(model, [u for u in t if u[1]]) <= rhs).only_enforce_if(pf)


def demand_bounds(model: cp_model.CpModel, ro: RoundOptions, v: Variables) -> None:
    ind = {"on0": v.on0, "onS": v.onS, "onH": v.onH}
    for kind, members, rhs in ro.energy_rows:
        model.add(_sum(model, [(ind[kind][r], e) for r, e in members]) <= rhs)


def add_all(model: cp_model.CpModel, ro: RoundOptions, v: Variables) -> None:
    one_per_round(model, ro, v)
    encode_first(model, ro, v)
    steps(model, ro, v)
    groups(model, ro, v)
    capacity(model, ro, v)
    pins(model, ro, v)
    on_time(model, ro, v)
    demand_bounds(model, ro, v)
