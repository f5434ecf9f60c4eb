"""Model 1 of the offline bound: the schedule, in integer ticks, and its CP-SAT model.

Time is in integer ticks (``planner/ticks.py``). A request either is dropped
or runs, in order:

* encode on one GPU (any), ``e`` ticks;
* up to ``pieces`` diffuse pieces, each with its own SP degree ``k``, aligned
  block of ``k`` GPUs inside a node (:meth:`Cluster.blocks`) and number of
  steps ``n_p >= 1`` (sum = the request's steps); a piece's length covers
  ``n_p`` steps at batch 1 on that block's link bandwidth after the worst
  hand-off (:func:`worst_handoff`);
* decode on one GPU (any), its decode time after the worst hand-off, ending
  by the deadline.

The simulator charges a hand-off (``planner.state.handoff_time``) before a
piece that changes GPUs (the latent), before a first piece off the encode
GPU (the prompt embeddings) and before a decode off the last piece's block
(the latent); reserving the worst one for every piece and decode, whether
it is paid or not, keeps the model simple and every real segment inside its
window.

Every GPU carries one NoOverlap over all optional intervals that may use it
(one per GPU of each (piece, block choice)). Objective: most requests on time, then
fewest GPU-ticks (one weighted sum, the count weight above any GPU-tick
total). Durations are rounded *up* to ticks and starts sit on ticks, so the
real segments lie inside their reserved windows: the timeline never
overlaps, and a request on time in ticks is on time in seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ortools.sat.python import cp_model

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.offline.fit import degrees, fits
from ditplan.planner.request import Request
from ditplan.planner.ticks import TICK_S, ticks_down, ticks_up

_TICK_NS = round(TICK_S * 1e9)


@dataclass(frozen=True)
class BlockChoice:
    """Where a request may run: degree k on one aligned block, with the request's stage times there."""

    k: int
    block: tuple[int, ...]
    enc: float  # seconds
    diff: float  # seconds, all steps at batch 1 on this block
    dec: float  # seconds
    handoff: float  # seconds, reserved before every piece and before decode (worst_handoff)

    @property
    def gpu_seconds(self) -> float:
        return self.enc + self.k * self.diff + self.dec


@dataclass(frozen=True)
class Piece:
    """Some of a request's diffuse steps, run in one go on one block."""

    choice: BlockChoice
    start: int  # tick
    steps: int


@dataclass(frozen=True)
class Plan:
    """How one request runs in the schedule (ticks)."""

    enc_gpu: int
    enc_start: int
    pieces: tuple[Piece, ...]
    dec_gpu: int
    dec_start: int


def worst_handoff(req: Request, cluster: Cluster, cost: CostModel) -> float:
    """Longest hand-off ``req`` may pay: the larger of its latent and its prompt embeddings over the
    slowest link of the cluster."""
    if cluster.size < 2:
        return 0.0
    slow = min(cluster.link_bandwidth(a, b) for a in range(cluster.size) for b in range(a + 1, cluster.size))
    spec = req.spec
    return cost.transfer_time(max(spec.latent_bytes(req.shape), spec.embedding_bytes()), slow)


def block_choices(req: Request, cluster: Cluster, cost: CostModel, weights: int) -> list[BlockChoice]:
    """Every aligned block ``req`` fits on beside ``weights`` served bytes, lowest degree first."""
    model = req.spec
    enc = cost.encode_time(model, req.shape)
    dec = cost.decode_time(model, req.shape)
    handoff = worst_handoff(req, cluster, cost)
    out = []
    for k in degrees(model, cluster):
        for block in cluster.blocks(k):
            if not fits(model, req.shape, k, 1, weights, min(cluster.gpus[g].memory for g in block)):
                continue
            bw = cluster.block_bandwidth(block) if k > 1 else None
            step = cost.step_time(model, req.shape, k, 1, link_bw=bw)
            out.append(BlockChoice(k, tuple(block), enc, req.steps * step, dec, handoff))
    return out


def _step_ns(o: BlockChoice, steps: int) -> int:
    return int(math.ceil(o.diff / steps * 1e9))


def _handoff_ns(o: BlockChoice) -> int:
    return int(math.ceil(o.handoff * 1e9))


def _piece_ticks(o: BlockChoice, n: int, steps: int) -> int:
    """Ticks reserved for the hand-off and ``n`` of a request's ``steps`` steps on ``o``."""
    return -(-(n * _step_ns(o, steps) + _handoff_ns(o)) // _TICK_NS)


def run_ticks(o: BlockChoice, steps: int) -> int:
    """Ticks reserved for all steps of a request on ``o`` in one piece."""
    return _piece_ticks(o, steps, steps)


def dec_ticks(o: BlockChoice) -> int:
    """Ticks reserved for the hand-off and the decode."""
    return ticks_up(o.dec + o.handoff)


def dec_latest(req: Request, o: BlockChoice) -> int:
    """Last decode start tick from which the request is on time in real seconds."""
    return ticks_down(req.deadline - (o.dec + o.handoff))


def alone_on_time(req: Request, choices: list[BlockChoice]) -> bool:
    """Whether the schedule model can put ``req`` on time at all (alone, fastest block)."""
    return bool(choices) and (ticks_up(req.arrival) + ticks_up(choices[0].enc)
                              + min(run_ticks(o, req.steps) for o in choices) <= dec_latest(req, choices[0]))


def contiguous(req: Request, o: BlockChoice, s: int) -> Plan:
    """Encode, all steps and decode back to back on ``o``'s block (encode/decode on its first GPU)."""
    e, D = ticks_up(o.enc), run_ticks(o, req.steps)
    return Plan(o.block[0], s, (Piece(o, s + e, req.steps),), o.block[0], s + e + D)


def _plan_cost(req: Request, plan: Plan) -> int:
    o0 = plan.pieces[0].choice
    return ticks_up(o0.enc) + dec_ticks(o0) + sum(pc.choice.k * _piece_ticks(pc.choice, pc.steps, req.steps)
                                                  for pc in plan.pieces)


def score(requests: Sequence[Request], plans: dict[int, Plan]) -> tuple[int, int]:
    """(on time, -GPU-ticks): larger is better."""
    return len(plans), -sum(_plan_cost(requests[i], pl) for i, pl in plans.items())


def plan_spans(req: Request, plan: Plan) -> list[tuple[int, int, int]]:
    """(gpu, start tick, end tick) of everything ``plan`` reserves."""
    o0 = plan.pieces[0].choice
    out = [(plan.enc_gpu, plan.enc_start, plan.enc_start + ticks_up(o0.enc)),
           (plan.dec_gpu, plan.dec_start, plan.dec_start + dec_ticks(o0))]
    for pc in plan.pieces:
        end = pc.start + _piece_ticks(pc.choice, pc.steps, req.steps)
        out.extend((g, pc.start, end) for g in pc.choice.block)
    return out


class ScheduleModel:
    """Model 1 over the ``free`` requests; ``fixed`` plans stay as they are (busy GPU time)."""

    def __init__(self, requests: Sequence[Request], choices: list[list[BlockChoice]], n_gpu: int,
                 pieces: int, free: Sequence[int], fixed: dict[int, Plan]) -> None:
        self.requests, self.choices = requests, choices
        m = self.m = cp_model.CpModel()
        per_gpu: list[list] = [[] for _ in range(n_gpu)]
        self.ys: dict[int, cp_model.IntVar] = {}
        self.v: dict[int, dict] = {}
        costs: list = []
        worst = 0
        horizon = [math.inf, -math.inf]
        for i in free:
            r = requests[i]
            if not alone_on_time(r, choices[i]):
                continue
            e, d = ticks_up(choices[i][0].enc), dec_ticks(choices[i][0])
            lo, dl = ticks_up(r.arrival), dec_latest(r, choices[i][0])
            horizon = [min(horizon[0], lo), max(horizon[1], dl + d)]
            y = self.ys[i] = m.new_bool_var(f"y{i}")
            rv: dict = {"enc": {}, "dec": {}, "pieces": [],
                        "se": m.new_int_var(lo, dl, f"se{i}"), "sd": m.new_int_var(lo, dl, f"sd{i}")}
            for g in range(n_gpu):
                rv["enc"][g] = le = m.new_bool_var(f"le{i}_{g}")
                rv["dec"][g] = ld = m.new_bool_var(f"ld{i}_{g}")
                per_gpu[g].append(m.new_optional_fixed_size_interval_var(rv["se"], e, le, f"E{i}_{g}"))
                per_gpu[g].append(m.new_optional_fixed_size_interval_var(rv["sd"], d, ld, f"D{i}_{g}"))
            m.add_exactly_one([*rv["enc"].values(), ~y])
            m.add_exactly_one([*rv["dec"].values(), ~y])
            prev_end, prev_z = rv["se"] + e, y
            steps = []
            for p in range(pieces):
                z = y if p == 0 else m.new_bool_var(f"z{i}_{p}")
                if p:
                    m.add_implication(z, prev_z)
                n = m.new_int_var(0, r.steps, f"n{i}_{p}")
                m.add(n >= 1).only_enforce_if(z)
                m.add(n == 0).only_enforce_if(~z)
                sp, ep = m.new_int_var(lo, dl, f"sp{i}_{p}"), m.new_int_var(lo, dl, f"ep{i}_{p}")
                lits, sizes = {}, {}
                for j, o in enumerate(choices[i]):
                    if lo + e + _piece_ticks(o, 1, r.steps) > dl:
                        continue  # not even one step on this block fits in the window
                    full = run_ticks(o, r.steps)
                    lit, size = m.new_bool_var(f"l{i}_{p}_{j}"), m.new_int_var(0, full, f"D{i}_{p}_{j}")
                    m.add(size == 0).only_enforce_if(~lit)
                    m.add(size * _TICK_NS >= n * _step_ns(o, r.steps) + _handoff_ns(o)).only_enforce_if(lit)
                    for g in o.block:
                        per_gpu[g].append(m.new_optional_interval_var(sp, size, ep, lit, f"P{i}_{p}_{j}_{g}"))
                    lits[j], sizes[j] = lit, size
                    costs.append((o.k, size))
                    worst += o.k * full
                m.add_exactly_one([*lits.values(), ~z])
                m.add(ep == sp).only_enforce_if(~z)
                m.add(sp >= prev_end).only_enforce_if(z)
                m.add(rv["sd"] >= ep).only_enforce_if(z)
                rv["pieces"].append({"z": z, "n": n, "s": sp, "e": ep, "lits": lits, "sizes": sizes})
                prev_end, prev_z = ep, z
                steps.append(n)
            m.add(sum(steps) == r.steps * y)
            costs.append((e + d, y))
            worst += e + d
            self.v[i] = rv
        for i, plan in fixed.items():
            for g, a, b in plan_spans(requests[i], plan):
                if b > horizon[0] and a < horizon[1]:
                    per_gpu[g].append(m.new_fixed_size_interval_var(a, b - a, f"F{i}_{g}_{a}"))
        for ivs in per_gpu:
            if len(ivs) > 1:
                m.add_no_overlap(ivs)
        self.count = sum(self.ys.values())
        m.maximize((worst + 1) * self.count - sum(c * x for c, x in costs))

    def hint(self, plans: dict[int, Plan]) -> None:
        """A complete hint from ``plans`` (pieces it lacks: absent, zero steps)."""
        m = self.m
        for i, y in self.ys.items():
            plan, rv = plans.get(i), self.v[i]
            m.add_hint(y, plan is not None)
            for g in rv["enc"]:
                m.add_hint(rv["enc"][g], plan is not None and plan.enc_gpu == g)
                m.add_hint(rv["dec"][g], plan is not None and plan.dec_gpu == g)
            if plan is not None:
                m.add_hint(rv["se"], plan.enc_start)
                m.add_hint(rv["sd"], plan.dec_start)
            for p, pv in enumerate(rv["pieces"]):
                pc = plan.pieces[p] if plan is not None and p < len(plan.pieces) else None
                if p:
                    m.add_hint(pv["z"], pc is not None)
                m.add_hint(pv["n"], pc.steps if pc else 0)
                size = _piece_ticks(pc.choice, pc.steps, self.requests[i].steps) if pc else 0
                if pc is not None:
                    m.add_hint(pv["s"], pc.start)
                    m.add_hint(pv["e"], pc.start + size)
                for j, lit in pv["lits"].items():
                    on = pc is not None and self.choices[i][j] == pc.choice
                    m.add_hint(lit, on)
                    m.add_hint(pv["sizes"][j], size if on else 0)

    def plans(self, solver: cp_model.CpSolver) -> dict[int, Plan]:
        out: dict[int, Plan] = {}
        val = solver.boolean_value
        for i, y in self.ys.items():
            if not val(y):
                continue
            rv = self.v[i]
            pcs = []
            for pv in rv["pieces"]:
                if not val(pv["z"]):
                    break
                j = next(j for j, lit in pv["lits"].items() if val(lit))
                pcs.append(Piece(self.choices[i][j], solver.value(pv["s"]), solver.value(pv["n"])))
            out[i] = Plan(next(g for g, lit in rv["enc"].items() if val(lit)), solver.value(rv["se"]),
                          tuple(pcs), next(g for g, lit in rv["dec"].items() if val(lit)),
                          solver.value(rv["sd"]))
        return out

