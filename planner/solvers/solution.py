"""What a backend returns, and an independent scorer of any choice of options.

``evaluate`` re-derives feasibility and the objective of a set of chosen
options straight from :mod:`planner.solvers.options` data, without any
solver: the tests enumerate every combination on tiny instances with it and
compare the best value with each backend's optimum.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from planner.solvers.options import RoundOptions


class SolveStatus(str, enum.Enum):
    OPTIMAL = "optimal"  # proven best
    FEASIBLE = "feasible"  # a solution, not proven best (time limit)
    INFEASIBLE = "infeasible"  # cannot happen for a well-formed problem (choosing nothing is feasible)
    TIMEOUT_NO_SOLUTION = "timeout_no_solution"  # the limit hit before any solution
    MODEL_INVALID = "model_invalid"
    ERROR = "error"  # the backend raised

    @property
    def has_solution(self) -> bool:
        return self in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE)


@dataclass
class Solution:
    status: SolveStatus
    chosen: tuple[int, ...] = ()  # option indices, every round
    q: dict[int, int] = field(default_factory=dict)  # steps of chosen variable-q options
    objective: float | None = None  # incl. RoundOptions.constant
    bound: float | None = None
    wall_ms: float = 0.0
    backend: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def has_solution(self) -> bool:
        return self.status.has_solution

    def round0(self, ro: RoundOptions) -> list[int]:
        return [i for i in self.chosen if ro.options[i].round == 0]


@dataclass
class Evaluation:
    feasible: bool
    objective: int
    problems: list[str]
    on0: dict[int, int]
    onS: dict[int, int]
    onH: dict[int, int]
    # values of the model's auxiliary variables under this choice (complete solver hints)
    steps: dict[int, int] = field(default_factory=dict)  # variable-step option -> steps
    groups: dict[int, int] = field(default_factory=dict)  # group class -> groups
    parents: set = field(default_factory=set)  # (L, block) blocked by a pin inside
    proj: dict[int, int] = field(default_factory=dict)  # request -> horizon projection on time
    proofs: dict[tuple[int, int], int] = field(default_factory=dict)  # (request, h) -> finishes on time in h


def evaluate(ro: RoundOptions, chosen: Iterable[int], q: Mapping[int, int] | None = None) -> Evaluation:
    """Feasibility and objective of choosing ``chosen`` (variable steps derived when not given)."""
    opts, W, H, R = ro.options, ro.weights, ro.horizon, ro.R
    chosen = sorted(set(chosen))
    q = dict(q or {})
    problems: list[str] = []
    by_req: dict[int, list[int]] = {}
    for i in chosen:
        by_req.setdefault(opts[i].req, []).append(i)
    obj = ro.constant
    on0: dict[int, int] = {}
    onS: dict[int, int] = {}
    onH: dict[int, int] = {}
    steps_of: dict[int, int] = {}
    for r, mine in by_req.items():
        ri = ro.reqs[r]
        mine.sort(key=lambda i: opts[i].round)
        busy = [0] * H
        done = 0
        encoded = ri.stage != "encode"
        for i in mine:
            o = opts[i]
            for h in range(o.round, min(H, o.round + o.span)):
                busy[h] += 1
            if o.stage == "encode":
                encoded = True
            elif o.stage == "diffuse":
                if not encoded or (ri.stage == "encode" and o.round == 0):
                    problems.append(f"request {ri.id}: diffuse before encode")
                if o.var_q:
                    qq = q.get(i, ri.rem - done)
                    if not 1 <= qq <= o.q or done + qq != ri.rem:
                        problems.append(f"request {ri.id}: final option runs {qq} steps of {ri.rem - done} left")
                    steps_of[i] = qq
                    done += qq
                else:
                    done += o.q
        if any(b > 1 for b in busy):
            problems.append(f"request {ri.id}: two options in one round")
        if done > ri.rem:
            problems.append(f"request {ri.id}: {done} steps > {ri.rem} left")
        encodes = sum(1 for i in mine if opts[i].stage == "encode")
        decodes = sum(1 for i in mine if opts[i].stage == "decode")
        if encodes > 1 or decodes > 1:
            problems.append(f"request {ri.id}: encode or decode twice")
    # Capacity.
    chosen_set = set(chosen)
    group_count: dict[int, int] = {}
    for i in chosen:
        if opts[i].group >= 0:
            group_count[opts[i].group] = group_count.get(opts[i].group, 0) + 1
    for gi, n in group_count.items():
        group_count[gi] = -(-n // ro.groups[gi].max_batch)
    parents_used: set = set()
    for h in range(H):
        demand = {L: 0 for L in ro.levels}
        for i in chosen:
            o = opts[i]
            if o.group >= 0 or o.short or not (o.round <= h < o.round + o.span):
                continue
            if h == 0 and o.pin is not None:
                continue
            for L in ro.levels:
                if o.k >= L:
                    demand[L] += o.k // L
        for gi, n in group_count.items():
            g = ro.groups[gi]
            if not (g.round <= h < g.round + g.span) or (h == 0 and g.pin is not None):
                continue
            for L in ro.levels:
                if g.k >= L:
                    demand[L] += n * (g.k // L)
        if h == 0:
            used = [blk for blk, users in ro.pins.items() for kind, j in users
                    if (kind == "x" and j in chosen_set) or (kind == "y" and j in group_count)]
            gpus = [g for blk in used for g in blk]
            if len(gpus) != len(set(gpus)):
                problems.append("pinned blocks overlap")
            for blk in used:
                for L in ro.levels:
                    if len(blk) >= L:
                        demand[L] += len(blk) // L
            for (L, parent), users in ro.pin_parents.items():
                if any((kind == "x" and j in chosen_set) or (kind == "y" and j in group_count)
                       for kind, j in users):
                    demand[L] += 1
                    parents_used.add((L, parent))
        for L in ro.levels:
            if demand[L] > ro.blocks[h][L]:
                problems.append(f"round {h}: {demand[L]} blocks of {L} wanted, {ro.blocks[h][L]} free")
    n_short = sum(1 for i in chosen if opts[i].short)
    if n_short > ro.blocks[0].get(1, 0):
        problems.append(f"round 0: {n_short} short stages, {ro.blocks[0].get(1, 0)} idle GPUs")
    # Objective.
    for i in chosen:
        o = opts[i]
        ri = ro.reqs[o.req]
        if o.round == 0:
            if o.stage == "diffuse" and ri.was_running:
                pass  # counted per request below
            if o.migrate:
                obj -= W.migration
            obj += o.progress
        obj -= W.gpu_ms * (o.excess + o.excess_step * steps_of.get(i, 0))
    for gi, n in group_count.items():
        obj -= W.gpu_ms * ro.groups[gi].cost * n
    proj_ok: dict[int, int] = {}
    proofs: dict[tuple[int, int], int] = {}
    for r, ri in enumerate(ro.reqs):
        mine = by_req.get(r, [])
        if ri.was_running and any(opts[i].round == 0 and opts[i].stage == "diffuse" for i in mine):
            obj += W.preemption
        if ri.on0 is None:
            proj = ri.base0 + sum(opts[i].c0 for i in mine if opts[i].round == 0)
            on0[r] = int(proj <= ri.dl)
            obj += ro.w_on0 * on0[r]
        if ri.onS is None:
            proj = ri.base0s + sum(opts[i].c0s for i in mine if opts[i].round == 0)
            onS[r] = int(proj <= ri.dl)
            obj += ro.w_onS * onS[r]
        if H > 1 and ri.onH is None:
            pj, pf = _on_time_horizon(ro, r, mine, steps_of)
            proj_ok[r] = pj
            proofs.update({(r, h): v for h, v in pf.items()})
            onH[r] = int(pj or any(pf.values()))
            obj += ro.w_onH * onH[r]
    # Demand bounds: the indicators of a kind together must fit their rows; keep the most.
    for kind, ind, w in (("on0", on0, ro.w_on0), ("onS", onS, ro.w_onS), ("onH", onH, ro.w_onH)):
        rows = [(m, rhs) for k, m, rhs in ro.energy_rows if k == kind]
        if rows:
            kept = _fit_rows(ind, rows)
            for r in ind:
                if ind[r] and r not in kept:
                    ind[r] = 0
                    obj -= w
    return Evaluation(not problems, obj, problems, on0, onS, onH, steps_of, group_count, parents_used, proj_ok,
                      proofs)


def _fit_rows(ind: dict[int, int], rows: list) -> set[int]:
    """Largest set of requests with ``ind`` = 1 that satisfies every demand-bound row.

    Exact (by enumeration) up to 10 candidates in the rows, else a greedy pass
    that drops the request with the most work in the most violated row.
    """
    in_rows = sorted({r for m, _ in rows for r, _ in m if ind.get(r)})
    others = {r for r, v in ind.items() if v and r not in in_rows}

    def ok(chosen: set[int]) -> bool:
        return all(sum(e for r, e in m if r in chosen) <= rhs for m, rhs in rows)

    if len(in_rows) <= 10:
        for size in range(len(in_rows), -1, -1):
            for combo in itertools.combinations(in_rows, size):
                if ok(set(combo)):
                    return others | set(combo)
        return others
    chosen = set(in_rows)
    while not ok(chosen):
        m, rhs = max(rows, key=lambda row: sum(e for r, e in row[0] if r in chosen) - row[1])
        r = max((x for x in m if x[0] in chosen), key=lambda x: x[1])[0]
        chosen.discard(r)
    return others | chosen


def _on_time_horizon(ro: RoundOptions, r: int, mine: list[int],
                     steps_of: Mapping[int, int]) -> tuple[int, dict[int, int]]:
    """(horizon projection on time, finishing proofs per round) of request ``r``."""
    opts, R, H = ro.options, ro.R, ro.horizon
    ri = ro.reqs[r]
    if ri.stage == "decode":
        return 0, {h: int(any(opts[i].round == h for i in mine)) for h in ri.proof_rounds}
    proj = ri.baseH + sum(opts[i].cH + opts[i].cH_step * steps_of.get(i, 0) for i in mine)
    pf: dict[int, int] = {}
    for h in ri.proof_rounds:
        pf[h] = 0
        fin = [i for i in mine if opts[i].round == h and opts[i].final]
        if not fin:
            continue
        clock = ri.start + ro.wait_sum(r, ri.first, h)
        for i in mine:
            o = opts[i]
            if o.round < h:
                clock += o.dur + o.step * steps_of.get(i, 0) - ro.wait_sum(r, o.round, min(o.round + o.span, h))
        f = opts[fin[0]]
        pf[h] = int(clock + f.dur + f.step * steps_of.get(fin[0], 0) + ri.dec <= ri.dl)
    return int(proj <= ri.dl), pf
