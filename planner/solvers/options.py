"""Each request's options in one round problem, enumerated once for every backend.

The receding-horizon formulation (DESIGN section 4) looks ``H`` rounds ahead
of length ``R = round_s``; round 0 is the one that is committed. An *option*
is one piece of work a request may start in round ``h``:

* ``encode`` / ``decode``: one GPU, the stage's time. A short one in round 0
  (at most a tenth of a round) does not hold its GPU for the round: the work
  that shares its GPU starts when it ends (plans are made again at every
  completion), so it only counts against the idle GPUs;
* ``diffuse`` at SP degree ``k`` for ``q`` steps. ``q`` fills about one round,
  ``max(1, floor(R / step(k)))``, capped by the steps left. An option may be
  *pinned* to the request's latent block (same degree, block idle: it keeps
  its GPUs, no migration) or free (any aligned block: a request with a
  diffuse latent then migrates). Degrees where a bigger ``k`` is not faster
  than a smaller one are dropped (except the pinned one), as are degrees
  with no free block or whose activations do not fit;
* batched diffuse: requests with the same ``batch_key`` share one forward pass
  of a *group* on ``k`` GPUs (up to ``max_batch`` members, timed and sized at
  ``max_batch``, an upper bound); the group, not the member, uses the GPUs;
* in later rounds a *final* diffuse option runs exactly the steps that are
  left (``q`` is then a variable in ``[1, Q]``), so a plan can finish a request
  mid-horizon without overshooting.

Everything a backend needs is precomputed here in integer ticks
(``TICK_S`` = 1 ms; durations rounded up, deadlines down, so an "on time"
claim of the model is on time in real seconds): durations, rounds covered
(``span``), projection coefficients, GPU-ms, progress and objective weights.
Both CP-SAT and the MILP read these numbers and nothing else, and
:func:`planner.solvers.solution.evaluate` scores a solution from them, so
all three agree by construction (the tests check it by brute force).

Time model. Each request runs on its own clock: work it gets adds its
duration, a round it waits adds ``R`` (round 0: only until a block of the
degree it needs frees, when none is free now). Its *projected finish* is
its clock, plus the steps left at an assumed rate, plus decode (and encode
if pending). Three on-time indicators, by weight:

* ``on0``, on track after round 0 if the rest runs at its fastest degree
  (TetriServe's criterion: waiting is fine while it can still catch up);
* ``onS``, on track after round 0 if it keeps the degree it gets now, or,
  when it waits, runs the rest at its *sustainable* degree: the smallest
  that finishes its steps by the deadline from now (EDF's criterion; stops
  a request from drifting at too small a degree round after round);
* ``onH`` (``H > 1``), on time after the horizon with the rest at its
  sustainable degree, or finishing in a round ``h < H-1`` with
  ``clock_h + duration + decode`` by the deadline.

Each projection alone assumes the GPUs for the steps left will be there, so
*demand-bound rows* (EDF's test) cap each indicator: the GPU-time the
requests it claims on time by a deadline T still need must fit in the
GPU-time free until T. Requests whose indicators are constants whatever the
plan get no variable, and plan no round after round 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from planner.problem import ProblemRequest, RoundProblem

TICK_S = 1e-3
_EPS = 1e-9


def ticks_up(seconds: float) -> int:
    return max(0, int(math.ceil(seconds / TICK_S - 1e-6)))


def ticks_down(seconds: float) -> int:
    return int(math.floor(seconds / TICK_S + 1e-6))


@dataclass(frozen=True)
class Weights:
    """Objective weights (maximised), lexicographic in practice.

    Tiers, most important first: requests on time (``on0``, ``onS``, ``onH``,
    see the module doc); preemptions and migrations in round 0; GPU-ms beyond
    the request's cheapest way to run a step without moving its latent
    (*excess*: deferring work saves no GPU time, running it inefficiently
    wastes it; a batch beating that earns a bonus); progress of round-0 work
    (ms of a request's critical path advanced), requests that can make it
    before late ones, late ones most overdue first. Each tier's weight exceeds
    what one decision can move in the tiers below at realistic sizes (a 20 s
    option at k = 8 is 5e6 weighted GPU-ms < one preemption). On an idle
    cluster every waiting request has an option with no excess and no
    penalty, so best effort always gets otherwise idle GPUs.
    """

    on_time_round0: int = 2_000_000_000  # on track after round 0 if the rest runs at the fastest degree
    on_time_sustained: int = 1_000_000_000  # ... if it keeps this degree (waiting: at its sustainable degree)
    on_time_horizon: int = 1_000_000_000  # on time over the horizon (sustainable tail)
    preemption: int = 10_000_000
    migration: int = 10_000_000
    gpu_ms: int = 32  # per GPU-ms of excess
    progress_on_time: int = 16  # per ms of critical path advanced
    progress_late: int = 8  # ... of a request that can no longer make it,
    progress_late_overdue: int = 4  # ... plus up to this much, growing with how overdue it is
    overdue_scale_s: float = 60.0
    # "served": every request given round-0 work earns progress weight x R, whatever its
    # degree; "steps": weight x ms of critical path advanced (bigger degrees earn more).
    progress_mode: str = "steps"
    # per GPU-ms held beyond the first GPU ((k - 1) x duration) of round-0 work: among options
    # equally on time, smaller degrees keep GPUs free for requests that arrive next
    hold_gpu_ms: int = 0  # measured: any positive value lowered attainment (bigger degrees finish sooner)


@dataclass(slots=True)
class ReqInfo:
    """One request (waiting or in flight) in integer ticks."""

    index: int
    id: str
    stage: str  # "encode" | "diffuse" | "decode"
    rem: int  # diffuse steps left
    dl: int  # deadline, ticks from now
    start: int  # its clock origin: 0, or when its in-flight work ends
    first: int  # first round it may take work
    enc: int  # encode still to do (0 when encoded)
    dec: int
    tmin: int  # ticks per step at its fastest degree (batch 1)
    ttail: int  # ticks per step the projections assume for steps left after the plan
    was_running: bool
    has_latent: bool  # a diffuse latent lives on latent_gpus (moving it is a migration)
    in_flight: bool
    late: bool  # cannot make the deadline even alone on the cluster
    batch_key: str
    max_batch: int
    latent: tuple[int, ...]
    # on-time indicators: a constant 0/1, or None when the plan decides
    on0: int | None = None
    onS: int | None = None
    onH: int | None = None
    base0: int = 0  # round-0 projection without any option (fastest tail)
    base0s: int = 0  # ... (sustainable tail)
    baseH: int = 0  # horizon projection without any option
    max0: int = 0  # largest round-0 projection
    maxH: int = 0  # largest horizon projection (big-M)
    proof_rounds: tuple[int, ...] = ()  # rounds where finishing (decoding) may prove on time
    proof_max: dict = field(default_factory=dict)  # h -> largest finish claim (big-M)
    options: list = field(default_factory=list)  # per round: option indices starting then
    steps_cap_needed: bool = False
    step_t: dict = field(default_factory=dict)  # degree -> ticks per step (batch 1)
    energy: int = 0  # GPU-ticks it still needs to finish on time (steps at its sustainable degree + stages)
    rl: tuple = ()  # per round, what waiting it out adds to its clock: R, but round 0 only until a block frees


@dataclass(frozen=True, slots=True)
class Option:
    index: int
    req: int
    round: int
    stage: str  # "encode" | "diffuse" | "decode"
    k: int  # GPUs of the block (1 for encode and decode)
    q: int  # steps; for var_q the most it may run
    var_q: bool  # final option of a later round: q = the steps left then (a variable)
    dur: int  # ticks (var_q: the part that does not depend on q)
    step: int  # ticks per step (var_q: duration = dur + q * step)
    span: int  # horizon rounds it covers (>= 1)
    final: bool  # finishes the request's diffuse stage (or decodes it)
    pin: tuple[int, ...] | None  # the request's own latent block, kept
    group: int  # batch group class, or -1
    migrate: bool
    excess: int  # GPU-ms beyond the cheapest (var_q: fixed part; group members: minus their share)
    excess_step: int  # var_q: per step
    progress: int  # weighted progress (round 0 only)
    act: int  # activation bytes per GPU
    c0: int  # coefficient in the round-0 projection (fastest tail)
    c0s: int  # ... (sustainable tail)
    cH: int  # coefficient in the horizon projection
    cH_step: int  # var_q: per step in the horizon projection
    short: bool = False  # a round-0 encode/decode of at most short_frac x R: shares a GPU (see _Builder)


@dataclass(frozen=True, slots=True)
class Group:
    """A batch class: ``count`` groups of up to ``max_batch`` members share one forward pass each."""

    index: int
    round: int
    batch_key: str
    k: int
    q: int
    pin: tuple[int, ...] | None
    dur: int
    span: int
    cost: int  # GPU-ms of one group (k x dur)
    max_batch: int
    max_count: int
    members: tuple[int, ...]  # option indices


@dataclass
class RoundOptions:
    problem: RoundProblem
    horizon: int
    R: int  # round length, ticks
    weights: Weights
    reqs: list[ReqInfo]
    options: list[Option]
    groups: list[Group]
    # capacity: per round, per level L, aligned L-blocks free (round 0: idle now)
    blocks: list[dict[int, int]]
    levels: tuple[int, ...]
    # round-0 pinned blocks: block -> list of ("x", option index) / ("y", group index)
    pins: dict[tuple[int, ...], list[tuple[str, int]]]
    # (L, free L-block) -> pinned users strictly inside it (smaller blocks)
    pin_parents: dict[tuple[int, tuple[int, ...]], list[tuple[str, int]]]
    # Objective weights of the on-time indicators (with H = 1 both are one indicator).
    w_on0: int = 0
    w_onS: int = 0
    w_onH: int = 0
    constant: int = 0  # objective part no plan changes (constant indicators, preemption offsets)
    # demand-bound rows: (indicator "on0"|"onS"|"onH", [(request, GPU-ticks)], rhs): the
    # requests an indicator claims on time with deadlines up to a threshold T must fit,
    # with the work of those on time whatever the plan, in the GPU-time free until T.
    energy_rows: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def wait_sum(self, r: int, a: int, b: int) -> int:
        """Clock added by waiting rounds a..b-1 of request ``r``."""
        return sum(self.reqs[r].rl[a:b])

    def step_ticks(self, r: int, k: int) -> int:
        ri = self.reqs[r]
        return ri.step_t.get(k, ri.tmin)

    def on0_split(self, r: int, sustained: bool = False) -> tuple[bool, list[int], list[int]]:
        """(waiting is on track, round-0 options on track, options not on track) of request ``r``.

        At most one round-0 option is chosen, so a round-0 indicator needs
        no big-M: ``on <= sum(good)`` when waiting is late, else
        ``on + sum(bad) <= 1``. ``sustained`` picks the sustainable-tail
        projection (``onS``) instead of the fastest-tail one (``on0``).
        """
        ri = self.reqs[r]
        rhs = ri.dl - (ri.base0s if sustained else ri.base0)
        good, bad = [], []
        for i in ri.options[0]:
            o = self.options[i]
            (good if (o.c0s if sustained else o.c0) <= rhs else bad).append(i)
        return rhs >= 0, good, bad

    def by_round(self, r: int, h: int) -> list[int]:
        opts = self.reqs[r].options
        return opts[h] if h < len(opts) else []

    def covering(self, r: int, h: int) -> list[int]:
        """Options of request ``r`` that keep it busy in round ``h`` (started then or earlier)."""
        out = []
        for h0, idx in enumerate(self.reqs[r].options[:h + 1]):
            for i in idx:
                if self.options[i].round + self.options[i].span > h:
                    out.append(i)
        return out


# --- helpers -----------------------------------------------------------------
def _aligned_blocks(nodes: Sequence[Sequence[int]], L: int) -> list[tuple[int, ...]]:
    out = []
    for node in nodes:
        for s in range(0, len(node) - L + 1, L):
            out.append(tuple(node[s:s + L]))
    return out


def _kept_degrees(step: dict[int, float]) -> list[int]:
    """Degrees strictly faster than every smaller kept degree (a bigger k that is not faster is dominated)."""
    kept, best = [], math.inf
    for k in sorted(step):
        if step[k] < best * (1 - 1e-9):
            kept.append(k)
            best = step[k]
    return kept


def round_q(round_s: float, step_s: float) -> int:
    """Steps that fill one round: max(1, floor(round_s / step_s))."""
    return max(1, math.floor(round_s / step_s + 1e-9))


def _span(work_ticks: int, R: int) -> int:
    return max(1, math.ceil(work_ticks / R - 1e-9))


@dataclass(slots=True)
class _Scratch:
    """Per-request numbers the builder shares between passes (seconds unless noted)."""

    pr: ProblemRequest
    pw: int  # progress weight
    step: dict[int, float] = field(default_factory=dict)
    kept: list[int] = field(default_factory=list)
    bstep: dict[int, float] = field(default_factory=dict)
    base: float = 0.0  # GPU-ms per step of its cheapest way to run alone (see add_request)
    mv: int = 0  # ticks of the slowest latent move (0 without a diffuse latent)
    act: dict[int, int] = field(default_factory=dict)


# --- the builder ---------------------------------------------------------------
class _Builder:
    def __init__(self, problem: RoundProblem, H: int, weights: Weights,
                 best_effort_slack: float | None = 0.25, tail: str = "sustainable") -> None:
        if tail not in ("sustainable", "fastest"):
            raise ValueError(f"tail must be 'sustainable' or 'fastest', not {tail!r}")
        self.p, self.H, self.W = problem, H, weights
        self.tail = tail
        self.short_frac = 0.1
        self.best_effort_slack = best_effort_slack
        self.R_s = problem.round_s
        self.R = max(1, ticks_up(problem.round_s))
        self.free_in = {g.index: g.free_in for g in problem.gpus}
        self.mem = {g.index: g.memory_free for g in problem.gpus}
        self.idle = {g for g, f in self.free_in.items() if f <= _EPS}
        max_node = max(len(n) for n in problem.nodes)
        self.levels = tuple(L for L in (1, 2, 4, 8) if L <= max_node)
        self.head0 = min((self.mem[g] for g in self.idle), default=0)  # activations that fit any idle GPU
        self.headF = min(self.mem.values(), default=0)
        self.opts: list[Option] = []
        self.reqs: list[ReqInfo] = []
        blocks0 = {L: _aligned_blocks(problem.nodes, L) for L in self.levels}
        self.free0 = {L: sum(1 for b in bl if all(g in self.idle for g in b)) for L, bl in blocks0.items()}
        busy = [ticks_up(f) for f in self.free_in.values() if f > _EPS]
        self.t_next = min(busy) if busy else self.R  # next in-flight completion
        self.t_free = {L: min(max(ticks_up(self.free_in[g]) for g in b) for b in bl)
                       for L, bl in blocks0.items() if bl}  # when a block of L is free
        self._k_sus = 1
        self.scratch: list[_Scratch] = []
        self.cands: dict[tuple, list[int]] = {}  # batch class key -> candidate request indices
        self._shapes: dict[str, dict] = {}

    # -- requests ------------------------------------------------------------------
    def _shape(self, pr: ProblemRequest) -> dict:
        """Per-shape numbers, shared by the requests of one batch key (memoized)."""
        hit = self._shapes.get(pr.batch_key)
        if hit is None:
            step = dict(pr.step_s)
            hit = {"step": step, "step_t": {k: ticks_up(t) for k, t in step.items()},
                   "kept": _kept_degrees(step) if step else [],
                   "tmin": ticks_up(min(step.values())) if step else 0}
            mb = max(1, pr.max_batch)
            hit["bstep"] = dict(pr.batch_step_s) if mb > 1 and pr.batch_step_s else {}
            hit["bkept"] = _kept_degrees(hit["bstep"]) if hit["bstep"] else []
            self._shapes[pr.batch_key] = hit
        return hit

    def timing(self, pr: ProblemRequest, in_flight: bool) -> tuple:
        """(start, first round, encode, decode, steps left, deadline, fastest and sustainable
        ticks per step, energy) of a request, all in ticks."""
        shp = self._shape(pr)
        start = ticks_up(pr.ready_in) if in_flight else 0
        first = max(1, math.ceil(pr.ready_in / self.R_s - 1e-9)) if in_flight else 0
        stage = pr.stage
        enc = ticks_up(pr.encode_s) if stage == "encode" else 0
        dec = ticks_up(pr.decode_s)
        rem = pr.remaining_steps if stage != "decode" else 0
        tmin = shp["tmin"]
        ttail = tmin
        energy = enc + dec
        dl = ticks_down(pr.deadline)
        if rem and shp["step"]:
            # the smallest degree that finishes every step left by the deadline from now (EDF's
            # on-track degree); the fastest when none does
            budget = dl - start - enc - dec
            st = shp["step_t"]
            k_sus = min(st, key=lambda k: (st[k], k))
            for k in shp["kept"]:
                if rem * st[k] <= budget:
                    k_sus = k
                    break
            if self.tail == "sustainable":
                ttail = st[k_sus]
            energy += rem * k_sus * st[k_sus]
            self._k_sus = k_sus
        else:
            self._k_sus = 1
        return start, first, enc, dec, rem, dl, tmin, ttail, energy

    def add_request(self, pr: ProblemRequest, in_flight: bool) -> None:
        H, W = self.H, self.W
        start, first, enc, dec, rem, dl, tmin, ttail, energy = self.timing(pr, in_flight)
        stage = pr.stage
        shp = self._shape(pr)
        has_latent = stage == "diffuse" and pr.sp_prev > 0 and bool(pr.latent_gpus)
        lb = start + enc + rem * tmin + dec
        late = lb > dl
        # Waiting out round 0 costs a round (R), except when no block of the degree it needs
        # is free now: then it waits only until in-flight work frees one (the simulator and
        # the service plan again at every completion), at most a round.
        k_need = self._k_sus if stage == "diffuse" else 1
        t_free = self.t_free.get(k_need, self.R)
        wait0 = min(self.R, t_free) if t_free > 0 else self.R
        rl = tuple((wait0 if h == 0 and not in_flight else self.R) for h in range(H))
        ri = ReqInfo(len(self.reqs), pr.id, stage, rem, dl, start, first, enc, dec, tmin, ttail,
                     pr.was_running and not in_flight, has_latent, in_flight, late,
                     pr.batch_key, max(1, pr.max_batch), tuple(pr.latent_gpus),
                     options=[[] for _ in range(H)], step_t=shp["step_t"] if rem else {}, energy=energy, rl=rl)
        if late:
            frac = min(1.0, max(0.0, (lb - dl) * TICK_S / W.overdue_scale_s))
            pw = W.progress_late + int(round(W.progress_late_overdue * frac))
        else:
            pw = W.progress_on_time
        sc = _Scratch(pr, pw)
        if stage != "decode" and shp["step"]:
            sc.step = shp["step"]
            sc.kept = shp["kept"]
            sc.act = pr.act_bytes
            sc.bstep = shp["bstep"]
            # Excess GPU-ms is measured from its cheapest way to run a step that needs no
            # migration and fits in memory, so on an idle cluster every waiting request has an
            # option with no excess and no penalty: best effort always gets idle GPUs.
            # (with a diffuse latent only its own degree moves nothing).
            k_lat = len(pr.latent_gpus)
            if has_latent and k_lat in sc.step:
                base = k_lat * sc.step[k_lat]
            else:
                fits = [k for k in sc.step if pr.act_bytes.get(k, 0) <= self.headF] or list(sc.step)
                base = min(k * sc.step[k] for k in fits)
            sc.base = base / TICK_S
            sc.mv = ticks_up(max(pr.move_s.values(), default=0.0)) if has_latent else 0
        self.reqs.append(ri)
        self.scratch.append(sc)

    def add(self, ri: ReqInfo, **kw) -> Option:
        kw.setdefault("var_q", False)
        kw.setdefault("step", 0)
        kw.setdefault("pin", None)
        kw.setdefault("group", -1)
        kw.setdefault("migrate", False)
        kw.setdefault("excess_step", 0)
        kw.setdefault("progress", 0)
        kw.setdefault("act", 0)
        kw.setdefault("c0", 0)
        kw.setdefault("c0s", 0)
        kw.setdefault("cH", 0)
        kw.setdefault("cH_step", 0)
        o = Option(index=len(self.opts), req=ri.index, **kw)
        self.opts.append(o)
        ri.options[o.round].append(o.index)
        return o

    def progress(self, pw: int, advanced: int) -> int:
        """Progress reward of round-0 work that advances a request's critical path by ``advanced`` ticks."""
        if self.W.progress_mode == "served":
            return pw * self.R  # the same for any degree: the GPU tiers pick the degree
        return pw * advanced

    def stage_option(self, ri: ReqInfo, h: int, stage: str) -> None:
        dur = ri.enc if stage == "encode" else ri.dec
        pw = self.scratch[ri.index].pw if h == 0 else 0
        # encode: clock += enc instead of R, encode no longer pending; decode: finish now.
        # A short one in round 0 does not hold its GPU for the round: the work that
        # shares the GPU starts when it ends (the simulator and the service plan again
        # at every completion), so it only counts against the idle GPUs.
        self.add(ri, round=h, stage=stage, k=1, q=0, dur=dur, span=_span(dur, self.R),
                 final=stage == "decode", excess=0, progress=self.progress(pw, dur), c0=-ri.rl[0] if h == 0 else 0,
                 c0s=-ri.rl[0] if h == 0 else 0, short=h == 0 and dur <= self.short_frac * self.R)

    # -- round 0 -----------------------------------------------------------------------
    def round0(self, ri: ReqInfo) -> None:
        if ri.first != 0:
            return
        if ri.stage != "diffuse":
            self.stage_option(ri, 0, ri.stage)
            return
        sc, R = self.scratch[ri.index], self.R
        lat, mem, idle = ri.latent, self.mem, self.idle
        k_lat = len(lat)
        pin_ok = (ri.has_latent and k_lat in sc.step and all(g in idle for g in lat))
        lat_head = min((mem[g] for g in lat), default=0) if pin_ok else 0
        free0 = self.free0
        for k in sorted(set(sc.kept) | ({k_lat} if pin_ok else set())):
            q = min(ri.rem, round_q(self.R_s, sc.step[k]))
            work = q * sc.step[k]
            for pinned in (False, True):
                if pinned:
                    if not (pin_ok and k == k_lat and sc.act[k] <= lat_head):
                        continue
                    dur = ticks_up(work)
                elif k not in sc.kept or sc.act[k] > self.head0 or not free0.get(k):
                    continue
                else:
                    dur = ticks_up(work + sc.mv * TICK_S)
                self.add(ri, round=0, stage="diffuse", k=k, q=q, dur=dur, span=_span(ticks_up(work), R),
                         final=q == ri.rem, pin=lat if pinned else None,
                         migrate=ri.has_latent and not pinned,
                         excess=max(0, int(round(k * ((dur - ticks_up(work)) + work / TICK_S) - q * sc.base))),
                         progress=self.progress(sc.pw, q * ri.tmin) - self.W.hold_gpu_ms * (k - 1) * dur,
                         act=sc.act[k], c0=dur - ri.rl[0] - q * ri.tmin,
                         c0s=dur + (ri.rem - q) * ticks_up(sc.step[k]) - ri.rl[0] - ri.rem * ri.ttail)
        if sc.bstep:
            mb = ri.max_batch
            bkept = self._shape(sc.pr)["bkept"]
            for k in sorted(set(bkept) | ({k_lat} if pin_ok and k_lat in sc.bstep else set())):
                q = min(ri.rem, round_q(self.R_s, sc.bstep[k]))
                need = mb * sc.act[k]
                if k in bkept and need <= self.head0 and free0.get(k):
                    self.cands.setdefault((0, ri.batch_key, k, q, None), []).append(ri.index)
                if pin_ok and k == k_lat and need <= lat_head:
                    self.cands.setdefault((0, ri.batch_key, k, q, lat), []).append(ri.index)

    # -- later rounds ------------------------------------------------------------------
    def horizon_open(self, ri: ReqInfo) -> bool:
        """Can the plan change whether ``ri`` is on time over the horizon?"""
        lb = ri.start + ri.enc + ri.rem * ri.tmin + ri.dec
        if lb > ri.dl:
            ri.onH = 0
            return False
        sc, R = self.scratch[ri.index], self.R
        longest = R  # a round either waits R or runs one option
        if sc.step:
            longest = max(longest, max(ticks_up(s) for s in sc.step.values()) + sc.mv)
        if sc.bstep:
            longest = max(longest, max(ticks_up(s) for s in sc.bstep.values()) + sc.mv)
        # Each round adds at most ``longest`` to the clock; the steps left take at most ttail each.
        if ri.start + ri.enc + ri.rem * max(ri.tmin, ri.ttail) + ri.dec + (self.H - ri.first) * longest <= ri.dl:
            ri.onH = 1
            return False
        return True

    def later(self, ri: ReqInfo) -> None:
        H, R, R_s = self.H, self.R, self.R_s
        if ri.stage == "decode":
            for h in range(max(1, ri.first), H):
                self.stage_option(ri, h, "decode")
            return
        sc = self.scratch[ri.index]
        if ri.stage == "encode":
            for h in range(max(1, ri.first), H):
                self.stage_option(ri, h, "encode")
        first_diffuse = ri.first + (1 if ri.stage == "encode" else 0)
        qmax = max((round_q(R_s, sc.step[k]) for k in sc.kept), default=1)
        bkept = self._shape(sc.pr)["bkept"] if sc.bstep else []
        for h in range(max(1, first_diffuse), H):
            done_before = qmax * (h - first_diffuse)  # most steps run before round h
            for k in sc.kept:
                if sc.act[k] > self.headF:
                    continue
                Q = round_q(R_s, sc.step[k])
                if ri.rem > Q:  # a regular round of Q steps
                    work = ticks_up(Q * sc.step[k])
                    dur = ticks_up(Q * sc.step[k] + sc.mv * TICK_S)
                    self.add(ri, round=h, stage="diffuse", k=k, q=Q, dur=dur, span=_span(work, R),
                             final=False, act=sc.act[k],
                             excess=max(0, int(round(k * (sc.mv + Q * sc.step[k] / TICK_S) - Q * sc.base))))
                if ri.rem - done_before <= Q:  # its last steps may fall in round h
                    st = ticks_up(sc.step[k])
                    qm = min(Q, ri.rem)
                    self.add(ri, round=h, stage="diffuse", k=k, q=qm, var_q=True, dur=sc.mv, step=st,
                             span=_span(qm * st, R), final=True, excess=k * sc.mv,
                             excess_step=max(0, int(round(k * st - sc.base))), act=sc.act[k])
            for k in bkept:
                Q = round_q(R_s, sc.bstep[k])
                if ri.rem > Q and ri.max_batch * sc.act[k] <= self.headF:
                    self.cands.setdefault((h, ri.batch_key, k, Q, None), []).append(ri.index)

    # -- batch groups -----------------------------------------------------------------
    def groups(self) -> list[Group]:
        out: list[Group] = []
        R = self.R
        for key in sorted(self.cands, key=lambda t: (t[0], t[1], t[2], t[3], t[4] or ())):
            h, bkey, k, q, pin = key
            members_r = self.cands[key]
            if len(members_r) < 2:
                continue  # a group of one is a slower single
            sc0 = self.scratch[members_r[0]]
            mb = self.reqs[members_r[0]].max_batch
            work = q * sc0.bstep[k]
            mv = 0 if pin is not None else max(self.scratch[r].mv for r in members_r)
            dur = ticks_up(work + mv * TICK_S)
            span = _span(ticks_up(work), R)
            gi = len(out)
            members = []
            for r in members_r:
                ri, sc = self.reqs[r], self.scratch[r]
                o = self.add(ri, round=h, stage="diffuse", k=k, q=q, dur=dur, span=span, final=q == ri.rem,
                             pin=pin, group=gi, migrate=h == 0 and ri.has_latent and pin is None,
                             excess=-int(round(q * sc.base)), progress=self.progress(sc.pw, q * ri.tmin) if h == 0 else 0,
                             act=mb * sc.act[k], c0=dur - ri.rl[0] - q * ri.tmin if h == 0 else 0,
                             c0s=(dur + (ri.rem - q) * ticks_up(sc.step[k]) - ri.rl[0] - ri.rem * ri.ttail)
                             if h == 0 else 0)
                members.append(o.index)
            out.append(Group(gi, h, bkey, k, q, pin, dur, span, k * dur, mb,
                             1 if pin is not None else -(-len(members) // mb), tuple(members)))
        return out

    # -- projections ---------------------------------------------------------------------
    def bounds0(self, ri: ReqInfo) -> None:
        """Round-0 projections ``base + sum c x`` (both tails); constants when every choice agrees."""
        R = self.R
        if ri.first != 0:  # in flight: nothing this round
            ri.base0 = ri.max0 = ri.start + ri.rem * ri.tmin + ri.dec + ri.enc
            ri.base0s = ri.start + ri.rem * ri.ttail + ri.dec + ri.enc
            ri.on0 = int(ri.base0 <= ri.dl)
            ri.onS = int(ri.base0s <= ri.dl)
            return
        ri.base0 = ri.start + ri.rl[0] + ri.rem * ri.tmin + ri.dec + ri.enc
        ri.base0s = ri.start + ri.rl[0] + ri.rem * ri.ttail + ri.dec + ri.enc
        cs = [self.opts[i].c0 for i in ri.options[0]]
        lo, hi = ri.base0 + min([0] + cs), ri.base0 + max([0] + cs)
        ri.max0 = hi
        ri.on0 = 1 if hi <= ri.dl else (0 if lo > ri.dl else None)
        cs = [self.opts[i].c0s for i in ri.options[0]]
        lo, hi = ri.base0s + min([0] + cs), ri.base0s + max([0] + cs)
        ri.onS = 1 if hi <= ri.dl else (0 if lo > ri.dl else None)

    def boundsH(self, ri: ReqInfo) -> None:
        """Horizon projection coefficients, finishing proofs and big-M values."""
        H, R, opts = self.H, self.R, self.opts
        if H == 1:
            ri.onH = ri.onS  # one round: the horizon projection is the sustainable one
            return
        if ri.onH is not None:
            return
        lb = ri.start + ri.enc + ri.rem * ri.tmin + ri.dec
        if ri.stage == "decode":
            # Decoded in round h: done at start + (h - first) R + dec; never: start + (H - first) R + dec.
            ri.baseH = ri.maxH = ri.start + sum(ri.rl[ri.first:H]) + ri.dec
            ri.proof_rounds = tuple(h for h in range(ri.first, H)
                                    if ri.options[h] and ri.start + sum(ri.rl[ri.first:h]) + ri.dec <= ri.dl)
            for h in ri.proof_rounds:
                ri.proof_max[h] = ri.start + sum(ri.rl[ri.first:h]) + ri.dec
            ri.onH = 1 if ri.baseH <= ri.dl else (None if ri.proof_rounds else 0)
            return
        # clock_H + (rem - S_H) ttail + dec + enc (if still pending)
        ri.baseH = ri.start + sum(ri.rl[ri.first:H]) + ri.rem * ri.ttail + ri.dec + ri.enc
        hi = lo = ri.baseH
        for h in range(H):
            cs = []
            for i in ri.options[h]:
                o = opts[i]
                waited = sum(ri.rl[o.round:o.round + o.span])  # the rounds it covers no longer wait
                if o.var_q:
                    cH, cs_ = o.dur - waited, o.step - ri.ttail
                else:
                    enc_part = ri.enc if o.stage == "encode" else 0
                    cH, cs_ = o.dur - waited - o.q * ri.ttail - enc_part, 0
                opts[i] = replace(o, cH=cH, cH_step=cs_)
                cs += [cH + max(0, cs_) * o.q, cH + min(0, cs_)]
            hi += max([0] + cs)
            lo += min([0] + cs)
        ri.maxH = hi
        lo = max(lo, lb)
        # Finishing in round h < H-1 proves on time if clock_h + duration + decode meets the deadline.
        proofs = []
        for h in range(ri.first, H - 1):
            finals = [i for i in ri.options[h] if opts[i].final]
            if not finals:
                continue
            worst = ri.start + ri.dec
            for h2 in range(ri.first, h):
                worst += max([R] + [self._dur_max(opts[i]) for i in ri.options[h2]])
            worst += max(self._dur_max(opts[i]) for i in finals)
            proofs.append(h)
            ri.proof_max[h] = worst
        ri.proof_rounds = tuple(proofs)
        if hi <= ri.dl:
            ri.onH = 1
        elif lo > ri.dl and not proofs:
            ri.onH = 0
        most = sum(max([0] + [opts[i].q for i in ri.options[h] if opts[i].stage == "diffuse"]) for h in range(H))
        ri.steps_cap_needed = most > ri.rem

    @staticmethod
    def _dur_max(o: Option) -> int:
        return o.dur + (o.step * o.q if o.var_q else 0)

    # -- demand bounds ----------------------------------------------------------------------
    def energy_rows(self, max_rows: int = 24) -> list:
        """EDF's demand-bound test over the on-time indicators (see RoundOptions.energy_rows).

        A necessary condition, not a schedule: it stops many requests from each
        claiming the same future GPUs (every projection alone assumes the steps
        left find their degree free), which is where a one-round view over-commits.
        """
        free_t = [ticks_up(f) for f in self.free_in.values()]
        extra = []  # in-flight requests that are not in the model (one-round view)
        if self.H == 1:
            for pr in self.p.in_flight:
                start, _, enc, dec, rem, dl, tmin, _, energy = self.timing(pr, True)
                if start + enc + rem * tmin + dec <= dl:
                    extra.append((dl, energy))
        kinds = [("on0", "on0"), ("onS", "onS")] + ([("onH", "onH")] if self.H > 1 else [])
        rows = []
        for kind, attr in kinds:
            open_r = [ri for ri in self.reqs if getattr(ri, attr) is None and ri.energy > 0]
            if not open_r:
                continue
            sure = [(ri.dl, ri.energy) for ri in self.reqs if getattr(ri, attr) == 1 and not ri.late] + extra
            ts = sorted({ri.dl for ri in open_r})
            if len(ts) > max_rows:
                step = len(ts) / max_rows
                ts = sorted({ts[min(len(ts) - 1, int(round((i + 1) * step)) - 1)] for i in range(max_rows)})
            for T in ts:
                members = [(ri.index, ri.energy) for ri in open_r if ri.dl <= T]
                cap = sum(max(0, T - f) for f in free_t) - sum(e for d, e in sure if d <= T)
                if sum(e for _, e in members) > max(0, cap):
                    rows.append((kind, members, max(0, cap)))
        return rows

    # -- capacity ---------------------------------------------------------------------------
    def capacity(self) -> list[dict[int, int]]:
        all_blocks = {L: _aligned_blocks(self.p.nodes, L) for L in self.levels}
        out = []
        for h in range(self.H):
            t = h * self.R_s + _EPS
            out.append({L: sum(1 for b in all_blocks[L] if all(self.free_in[g] <= t for g in b))
                        for L in self.levels})
        return out

    def pins(self, groups: list[Group]):
        pins: dict[tuple[int, ...], list[tuple[str, int]]] = {}
        for o in self.opts:
            if o.round == 0 and o.pin is not None and o.group < 0:
                pins.setdefault(o.pin, []).append(("x", o.index))
        for g in groups:
            if g.round == 0 and g.pin is not None:
                pins.setdefault(g.pin, []).append(("y", g.index))
        parents: dict[tuple[int, tuple[int, ...]], list[tuple[str, int]]] = {}
        nodes = self.p.nodes
        node_of = {g: n for n, node in enumerate(nodes) for g in node}
        for blk, users in pins.items():
            node = nodes[node_of[blk[0]]]
            local = node.index(blk[0])
            for L in self.levels:
                if L <= len(blk) or L > len(node):
                    continue
                s = (local // L) * L
                parent = tuple(node[s:s + L])
                if all(g in self.idle for g in parent):
                    parents.setdefault((L, parent), []).extend(users)
        return pins, parents


def _value0(ro_w: Weights, ri: ReqInfo, o: Option) -> int:
    """Objective contribution of a round-0 option on its own (no on-time change)."""
    v = o.progress - ro_w.gpu_ms * o.excess
    if o.migrate:
        v -= ro_w.migration
    if o.stage == "diffuse" and ri.was_running:
        v += ro_w.preemption
    return v


def _prune(b: "_Builder", groups: list[Group], H: int) -> list[Group]:
    """Drop options that are dominated for requests whose on-time indicators are constants.

    Exact: for such a request only the lower tiers and the capacity it uses
    matter, so a round-0 single option is dropped when another one of the
    request uses no more GPUs (k, rounds covered, and no pinned block unless
    the same one) and is worth at least as much; a batch class of round 0 is
    dropped when another class of the same key at a smaller or equal degree
    costs no more, covers no more rounds, and is worth at least as much to each
    of its members (all of them constant requests). Options are re-indexed.
    """
    opts, W = b.opts, b.W
    const = [ri.on0 is not None and ri.onS is not None and (H == 1 or ri.onH is not None) for ri in b.reqs]
    drop: set[int] = set()
    for ri in b.reqs:
        if not const[ri.index] or ri.first != 0:
            continue
        singles = [opts[i] for i in ri.options[0] if opts[i].group < 0]
        if b.best_effort_slack is not None:  # best effort runs near its most GPU-efficient degree
            eff = {o.index: o.k * o.dur / max(1, o.q) for o in singles if o.stage == "diffuse"}
            if eff:
                cheapest = min(eff.values())
                drop.update(i for i, e in eff.items()
                            if e > (1 + b.best_effort_slack) * cheapest and opts[i].pin is None)
        vals = {o.index: _value0(W, ri, o) for o in singles}
        for bo in singles:
            for a in singles:
                if a.index == bo.index or a.index in drop or bo.index in drop:
                    continue
                if not (a.k <= bo.k and a.span <= bo.span and (a.pin is None or a.pin == bo.pin)
                        and vals[a.index] >= vals[bo.index]):
                    continue
                same = (a.k, a.span, vals[a.index], a.pin) == (bo.k, bo.span, vals[bo.index], bo.pin)
                if not same or a.index < bo.index:
                    drop.add(bo.index)
    # batch classes of round 0 whose members are all constant requests
    gdrop: set[int] = set()
    cls = [g for g in groups if g.round == 0 and g.pin is None
           and all(const[opts[i].req] for i in g.members)]
    if b.best_effort_slack is not None:
        by_key: dict[str, list[Group]] = {}
        for g in cls:
            by_key.setdefault(g.batch_key, []).append(g)
        for key, gs in by_key.items():
            cheapest = min(g.cost / g.q for g in gs)
            gdrop.update(g.index for g in gs if g.cost / g.q > (1 + b.best_effort_slack) * cheapest)
    for g in cls:
        if g.index in gdrop:
            continue
        mv = {opts[i].req: _value0(W, b.reqs[opts[i].req], opts[i]) for i in g.members}
        for a in cls:
            if a.index == g.index or a.index in gdrop or a.batch_key != g.batch_key:
                continue
            if a.k > g.k or a.span > g.span or a.cost > g.cost:
                continue
            amv = {opts[i].req: _value0(W, b.reqs[opts[i].req], opts[i]) for i in a.members}
            if all(r in amv and amv[r] >= v for r, v in mv.items()):
                if (a.k, a.span, a.cost) != (g.k, g.span, g.cost) or a.index < g.index:
                    gdrop.add(g.index)
                    break
    for g in groups:
        if g.index in gdrop:
            drop.update(g.members)
    if not drop:
        return groups
    # re-index options and groups
    keep_groups = []
    new_gi: dict[int, int] = {}
    for g in groups:
        members = [i for i in g.members if i not in drop]
        if g.index in gdrop or len(members) < 2:
            drop.update(members)
            continue
        new_gi[g.index] = len(keep_groups)
        keep_groups.append(g)
    new_idx: dict[int, int] = {}
    new_opts: list[Option] = []
    for o in opts:
        if o.index in drop:
            continue
        new_idx[o.index] = len(new_opts)
        new_opts.append(replace(o, index=len(new_opts), group=new_gi.get(o.group, -1) if o.group >= 0 else -1))
    for ri in b.reqs:
        ri.options = [[new_idx[i] for i in lst if i in new_idx] for lst in ri.options]
    out = []
    for g in keep_groups:
        out.append(replace(g, index=new_gi[g.index], members=tuple(new_idx[i] for i in g.members if i in new_idx)))
    b.opts[:] = new_opts
    return out


def build_options(problem: RoundProblem, horizon: int | None = None,
                  weights: Weights = Weights(), prune: bool = True,
                  best_effort_slack: float | None = 0.25, tail: str = "sustainable",
                  energy: bool = True) -> RoundOptions:
    """Enumerate every request's options in ``problem`` over ``horizon`` rounds (default: the problem's).

    ``prune`` drops options that are exactly dominated (see ``_prune``).
    ``best_effort_slack``: a request whose on-time indicators are constants
    (safe whatever the plan, or already late) only keeps round-0 degrees whose
    GPU-ms per step is within this fraction of its most efficient one (and its
    own pinned block); ``None`` keeps every degree. This is a modelling
    choice, not a dominance: best-effort work goes to the GPUs at its most
    efficient degree, which keeps huge overloaded rounds small.
    """
    H = max(1, int(problem.horizon if horizon is None else horizon))
    b = _Builder(problem, H, weights, best_effort_slack if prune else None, tail)
    for pr in problem.requests:
        b.add_request(pr, False)
    if H > 1:
        for pr in problem.in_flight:
            b.add_request(pr, True)
    for ri in b.reqs:
        b.round0(ri)
    ahead = 0
    if H > 1:
        for ri in b.reqs:
            if b.horizon_open(ri):
                b.later(ri)
                ahead += 1
    groups = b.groups()
    for ri in b.reqs:
        b.bounds0(ri)
        b.boundsH(ri)
    n_before = len(b.opts)
    if prune:
        groups = _prune(b, groups, H)
    pins, parents = b.pins(groups)
    W = weights
    w_on0 = W.on_time_round0
    w_onS, w_onH = (W.on_time_sustained + W.on_time_horizon, 0) if H == 1 else (W.on_time_sustained,
                                                                                W.on_time_horizon)
    ro = RoundOptions(problem, H, b.R, weights, b.reqs, b.opts, groups, b.capacity(), b.levels,
                      pins, parents, w_on0, w_onS, w_onH)
    const = 0
    for ri in b.reqs:
        if ri.on0:
            const += w_on0
        if ri.onS:
            const += w_onS
        if H > 1 and ri.onH:
            const += w_onH
        if ri.was_running:
            const -= W.preemption  # each of its round-0 diffuse options gives it back
    ro.constant = const
    ro.energy_rows = b.energy_rows() if energy else []
    ro.stats = {"requests": len(problem.requests), "in_flight": len(problem.in_flight) if H > 1 else 0,
                "options": len(b.opts), "pruned": n_before - len(b.opts), "groups": len(groups), "horizon": H, "planned_ahead": ahead}
    return ro


def capacity_rows(ro: RoundOptions):
    """Buddy capacity rows shared by every backend: ``([(kind, key, coef)], rhs)``.

    Per round h and block level L, the aligned L-blocks the chosen options and
    batch groups occupy (``k // L`` each) plus, in round 0, the blocked parents
    of pinned blocks, must fit the free L-blocks. Rows that cannot bind are
    left out. ``kind`` is ``x`` (option), ``y`` (batch group count) or ``z``
    (pinned parent, keyed by ``(L, parent)``). A last row caps round 0's short
    stages by the free single GPUs.
    """
    opts = ro.options
    for h in range(ro.horizon):
        terms: dict[int, list] = {L: [] for L in ro.levels}
        most = {L: 0 for L in ro.levels}  # the terms' largest value
        for o in opts:
            if o.group >= 0 or o.short or not (o.round <= h < o.round + o.span):
                continue
            for L in ro.levels:
                if o.k >= L:
                    terms[L].append(("x", o.index, o.k // L))
                    most[L] += o.k // L
        for g in ro.groups:
            if not (g.round <= h < g.round + g.span):
                continue
            for L in ro.levels:
                if g.k >= L:
                    terms[L].append(("y", g.index, g.k // L))
                    most[L] += g.max_count * (g.k // L)
        if h == 0:
            for key in ro.pin_parents:
                terms[key[0]].append(("z", key, 1))
                most[key[0]] += 1
        for L in ro.levels:
            if terms[L] and most[L] > ro.blocks[h][L]:
                yield terms[L], ro.blocks[h][L]
    short = [("x", o.index, 1) for o in opts if o.short]
    if len(short) > ro.blocks[0].get(1, 0):
        yield short, ro.blocks[0].get(1, 0)


def step_rows(ro: RoundOptions):
    """Step bookkeeping shared by every backend: ``(kind, terms, option, rem)``.

    ``terms`` are ``(kind, index, coef)``: ``x`` (a fixed-q option, coef = its
    steps) or ``q`` (a final option's step count), the steps a request runs in
    the rounds before. ``("complete", terms, i, rem)``: final option ``i``, if
    chosen, runs exactly the steps left (terms + q_i >= rem; the cap gives <=).
    ``("cap", terms, None, rem)``: over the horizon, never more than remains.
    """
    opts = ro.options
    for ri in ro.reqs:
        if ri.stage == "decode":
            continue
        before: list = []
        for h in range(ri.first, ro.horizon):
            here = []
            for i in ri.options[h]:
                o = opts[i]
                if o.stage != "diffuse":
                    continue
                if o.var_q:
                    yield "complete", list(before), i, ri.rem
                    here.append(("q", i, 1))
                else:
                    here.append(("x", i, o.q))
            before += here
        if ri.steps_cap_needed and before:
            yield "cap", before, None, ri.rem
