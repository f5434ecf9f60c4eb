"""The slow placement loop: standing replicas for models whose requests cannot wait for a load.

The schedule places weights per chain, from the live requests only: a
request that arrives when no idle GPU holds its model first loads it. For
most requests that is fine (the load counts in the on-time test). But when a
model's requests cannot afford a load at any degree (``load + fastest chain
> deadline``, e.g. FLUX on an H100 at a tight SLO: 0.53 s load, 0.79 s
chain, 1.19 s budget), the only way to serve them is an idle block that
already holds the weights at arrival. The myopic schedule never keeps one:
it gives every idle GPU to the live videos and evicts the images' weights.

:class:`PlacementLoop` watches the recent arrivals (a window of
:data:`WINDOW` of them) and re-derives, every :data:`EVERY` arrivals
(hysteresis), how many aligned blocks each such *tight* model keeps
reserved and where. A block is worth reserving when the on-time requests it
adds per second (Poisson arrivals on ``c`` blocks, Erlang B) exceed what its
GPUs would put on time for the other models at their recent GPU-seconds
per request, counting only the demand the unreserved GPUs cannot absorb.
At most ``share`` of a node is reserved, so other models always keep GPUs.

A reserve is a placement constraint, not a schedule: other models' jobs may
not start on reserved GPUs (a job may finish on the block that holds its
latent), nor evict the reserved model there; idle reserved GPUs load the
model's weights. The reserved model also runs anywhere else.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Mapping, Sequence

from ditplan.models.catalog import get_model
from ditplan.planner.problem import ProblemRequest, RoundProblem
from ditplan.planner.request import Stage
from ditplan.planner.solvers.data import aligned_blocks, chain_components, chain_parts, kept_degrees, load_plan

WINDOW = 32  # recent arrivals the demand estimate looks back over
EVERY = 8  # re-derive the reserves after this many new arrivals (hysteresis)
MIN_ARRIVALS = 8  # no reserve before the window has this many arrivals (no rate to speak of)


@dataclass(frozen=True)
class Arrival:
    """One fresh request as the loop first saw it."""

    t: float  # absolute time it was first seen
    model: str
    degree: int  # the cheapest degree on time with the weights resident (0: none)
    chain_s: float  # seconds of the chain at that degree
    gpu_s: float  # GPU-seconds at that degree (at degree 1 when none is on time)
    tight: bool  # no degree is on time after loading the weights first
    act_bytes: int  # activation bytes per GPU at ``degree``
    min_gpu_s: float = 0.0  # GPU-seconds at its most GPU-efficient degree (what it needs of a saturated cluster)


@dataclass(frozen=True)
class Reserve:
    model: str
    block: tuple[int, ...]


def _load_s(problem: RoundProblem, model: str) -> float:
    bw = max((g.load_bw for g in problem.gpus), default=0.0)
    return get_model(model).weight_bytes / bw if bw > 0 else math.inf


def arrival(pr: ProblemRequest, now: float, load_s: float, age: float = 0.0) -> Arrival:
    """What one fresh request asked of the placement when it arrived ``age`` seconds ago."""
    chain = {k: sum(chain_parts(Stage.ENCODE, pr.encode_s, 0.0, pr.remaining_steps, pr.step_s[k], pr.decode_s))
             for k in kept_degrees(pr.step_s)}
    budget = pr.deadline + age + 1e-9
    on_time = [k for k in sorted(chain) if chain[k] <= budget]
    k = on_time[0] if on_time else 0
    tight = bool(on_time) and min(chain.values()) + load_s > budget
    base = k or min(chain, key=lambda d: (d * chain[d], d))
    return Arrival(now - age, pr.model, k, chain[base], base * chain[base], tight, pr.act_bytes.get(base, 0),
                   min(d * chain[d] for d in chain))


def erlang_b(servers: int, load: float) -> float:
    """Share of Poisson arrivals that find all ``servers`` busy (offered ``load`` in Erlangs)."""
    b = 1.0
    for c in range(1, servers + 1):
        b = load * b / (c + load * b)
    return b


@dataclass(frozen=True)
class _Demand:
    rate: float  # tight arrivals per second
    degree: int
    chain_s: float
    act_bytes: int


def _demands(window: Sequence[Arrival], span: float) -> dict[str, _Demand]:
    """Per tight model: the rate of its tight arrivals and the block the median one needs (one seen
    late, when every GPU was busy, needs a wider block than it would have at its arrival)."""
    out = {}
    for m in sorted({a.model for a in window if a.tight}):
        mine = [a for a in window if a.model == m and a.tight]
        k = sorted(a.degree for a in mine)[(len(mine) - 1) // 2]
        at_k = [a for a in mine if a.degree == k]
        out[m] = _Demand(len(mine) / span, k, sum(a.chain_s for a in at_k) / len(at_k),
                         max(a.act_bytes for a in at_k))
    return out


def reserve_counts(window: Sequence[Arrival], span: float, gpus: int) -> dict[str, int]:
    """Blocks per tight model: greedily the block with the largest net gain, while it is positive.

    Gain: on-time arrivals per second the block adds (Erlang B). Cost: the
    other models' on-time requests per GPU-second (their recent arrivals at
    their cheapest on-time degree) times the GPUs their demand loses.
    """
    demands = _demands(window, span)
    counts = {m: 0 for m in demands}
    reserved = 0
    while True:
        best = None
        for m, d in demands.items():
            c = counts[m]
            gain = d.rate * (erlang_b(c, d.rate * d.chain_s) - erlang_b(c + 1, d.rate * d.chain_s))
            others = [a for a in window if a.model != m]
            need = sum(a.gpu_s for a in others) / span  # GPUs the other models keep busy
            short = max(0.0, min(d.degree, need - (gpus - reserved - d.degree)))
            cost = short * len(others) / max(1e-9, sum(a.gpu_s for a in others)) if others else 0.0
            if gain > cost and (best is None or gain - cost > best[0]):
                best = (gain - cost, m)
        if best is None or reserved + demands[best[1]].degree > gpus:
            return counts
        counts[best[1]] += 1
        reserved += demands[best[1]].degree


class PlacementLoop:
    """Keeps the reserves (see the module doc); one per policy run."""

    def __init__(self, share: float = 0.5, window: int = WINDOW, every: int = EVERY) -> None:
        self.share, self.window, self.every = share, window, every
        self.reset()

    def reset(self) -> None:
        self.seen: set[str] = set()
        self.arrivals: deque[Arrival] = deque(maxlen=self.window)
        self.since = 0  # arrivals since the reserves were last derived
        self.reserves: tuple[Reserve, ...] = ()
        self.act: dict[str, int] = {}

    def observe(self, problem: RoundProblem, ages: Mapping[str, float] = {}) -> None:
        """Record the fresh requests seen for the first time (``ages``: seconds since each arrived, when
        known; no plan runs while every GPU is busy); re-derive after :attr:`every` of them."""
        fresh = [pr for pr in problem.requests if pr.stage is Stage.ENCODE and not pr.steps_done]
        for pr in sorted(fresh, key=lambda r: r.id):
            if pr.id in self.seen:
                continue
            self.seen.add(pr.id)
            self.arrivals.append(arrival(pr, problem.now, _load_s(problem, pr.model), ages.get(pr.id, 0.0)))
            self.since += 1
        self.seen &= {pr.id for pr in fresh}  # a request is fresh once; forget the rest
        if self.since >= self.every and len(self.arrivals) >= MIN_ARRIVALS:
            self.since = 0
            self.reserves = self.derive(problem)

    def derive(self, problem: RoundProblem) -> tuple[Reserve, ...]:
        window = list(self.arrivals)
        span = problem.now - min(a.t for a in window)
        if span <= 0:
            return self.reserves
        counts = reserve_counts(window, span, sum(len(n) for n in problem.nodes))
        demands = _demands(window, span)
        self.act = {m: demands[m].act_bytes for m in counts}
        out: list[Reserve] = []
        for m in sorted(counts, key=lambda m: (-demands[m].degree, m)):
            for _ in range(counts[m]):
                blk = self._place(problem, m, demands[m].degree, out)
                if blk is not None:
                    out.append(Reserve(m, blk))
        return tuple(out)

    def _place(self, problem: RoundProblem, model: str, k: int, taken: Sequence[Reserve]
               ) -> tuple[int, ...] | None:
        """The aligned block for one more reserve of ``model``: the one it had, else the one holding
        the most of its backbone, then the most idle GPUs, on the least reserved node."""
        used = {g for r in taken for g in r.block}
        before = {r.block for r in self.reserves if r.model == model}
        best = None
        for n, node in enumerate(problem.nodes):
            held = sum(g in used for g in node)
            if held + k > math.floor(self.share * len(node)):
                continue
            for blk in aligned_blocks(node, problem.nodes, k):
                if used & set(blk):
                    continue
                holds = sum(problem.gpu_of[g].holds(model, "backbone") for g in blk)
                idle = sum(problem.gpu_of[g].free_in <= 1e-9 for g in blk)
                key = (blk not in before, -holds, -idle, held, blk)
                if best is None or key < best[0]:
                    best = (key, blk)
        return best[1] if best else None

    def utilization(self, problem: RoundProblem) -> float:
        """Offered load of the recent arrivals: their GPU-seconds at their most GPU-efficient degree
        (unbatched) per second per GPU of the cluster; 0 before :data:`MIN_ARRIVALS` of them. From 1 on,
        the cluster cannot serve them all even at its most efficient."""
        if len(self.arrivals) < MIN_ARRIVALS:
            return 0.0
        span = problem.now - min(a.t for a in self.arrivals)
        if span <= 0:
            return 0.0
        return sum(a.min_gpu_s for a in self.arrivals) / span / max(1, sum(len(n) for n in problem.nodes))

    def owners(self) -> dict[int, str]:
        """Reserved GPU -> the model it is kept for."""
        return {g: r.model for r in self.reserves for g in r.block}


def keep_loaded(problem: RoundProblem, reserves: Sequence[Reserve], act: Mapping[str, int],
                free: Sequence[int]) -> list[tuple[int, str, tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]]]:
    """(gpu, model, loads, evictions) that put each reserved model's weights on its idle reserved GPUs.

    ``free``: GPUs idle now that nothing is planned on. A GPU holding another
    request's latent is left alone (its job may still finish there)."""
    latents = {g for r in (*problem.requests, *problem.in_flight) if r.steps_done for g in r.latent_gpus}
    mem = {g.index: g.memory_free for g in problem.gpus}
    out = []
    for r in reserves:
        for i, g in enumerate(r.block):
            if g not in free or g in latents:
                continue
            stage = Stage.ENCODE if i == 0 else Stage.DIFFUSE
            if all(problem.gpu_of[g].holds(r.model, c) for c in chain_components(stage, True)):
                continue
            loads, _, evicts = load_plan(problem, (g,), r.model, stage, act.get(r.model, 0) + 1, mem)
            if loads:
                out.append((g, r.model, loads, evicts))
    return out
