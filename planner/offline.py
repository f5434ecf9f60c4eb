"""Offline bound: the whole trace known in advance, solved with CP-SAT.

:func:`solve_offline` returns two things for one trace on one cluster:

* a **schedule** that really runs (it passes :func:`planner.checker.check_timeline`
  and :func:`planner.metrics.summarize` reads it like any policy's run), the best
  CP-SAT finds in the time limit: a lower bound on what an omniscient
  planner achieves;
* a **proven upper bound** on the SLO attainment of *any* policy, from a
  relaxation every schedule of the simulator's semantics satisfies — with
  preemption, SP changes between steps, migration and batching.

So every policy's gap to the limit can be reported (docs/architecture.md).

Model 1: the schedule
---------------------
Time is in integer ticks of ``TICK`` seconds. A request either is dropped or
runs, in order:

* encode on one GPU (any), ``e`` ticks;
* up to ``pieces`` diffuse pieces, each with its own SP degree ``k``, aligned
  block of ``k`` GPUs inside a node (:meth:`Cluster.blocks`) and number of
  steps ``n_p >= 1`` (sum = the request's steps); a piece's length covers
  ``n_p`` steps at batch 1 on that block's link bandwidth, and a piece after
  the first also the slowest latent move of the cluster (the simulator charges
  a move when a diffuse segment changes GPUs; encode and decode never pay one);
* decode on one GPU (any), ``d`` ticks, ending by the deadline.

Every GPU carries one NoOverlap over all optional intervals that may use it
(one per GPU of each (piece, option)). Objective: most requests on time, then
fewest GPU-ticks (one weighted sum, the count weight above any GPU-tick
total). Durations are rounded *up* to ticks and starts sit on ticks, so the
real segments lie inside their reserved windows: the timeline never
overlaps, and a request on time in ticks is on time in seconds.

It is solved in stages, each warm-started (hinted) from the best so far: an
EDF list schedule (greedy), then the one-piece model (non-preemptive) on the
whole trace, then large-neighbourhood search with ``pieces`` pieces
(preemption, SP change and migration at piece boundaries): a few requests
are re-solved at a time, all others fixed, and a neighbourhood's answer is
kept when the whole schedule improves. The count is capped by the proven
bound, so a schedule that reaches it is known to be optimal in count.
Requests the schedule drops are appended at the end, each on the block that
finishes it first (best effort: they count as misses unless one happens to
make its deadline, which only raises attainment).

Model 2: the upper bound
------------------------
One boolean ``x_i`` per request, "finishes by its deadline"; maximise
``sum x_i``. The bound on attainment is CP-SAT's proven objective bound
(``solver.best_objective_bound``) over ``n``.

Per request ``i`` (window ``[a_i, d_i]``) the model uses only quantities no
schedule can beat, whatever it preempts, migrates, batches or whichever SP
degree it picks step by step:

* fastest times: ``e_i`` = least encode time over batch sizes, ``T_i`` = least
  step time over SP degree k, batch size B and block bandwidth, ``dd_i`` =
  least decode time. A request's stages run in order and it is never in two
  segments at once, so its position along the chain encode -> steps -> decode,
  measured in these fastest times (``L_i = e_i + steps_i*T_i + dd_i`` in all),
  advances at rate at most 1. If ``a_i + L_i > d_i``, ``x_i = 0``.
* cheapest GPU-time: a step at (k, B), a batch of B compatible requests on k
  GPUs, takes ``t = T(k, B)`` seconds and ``k*T(k, B)`` GPU-seconds, of which
  ``c = k*T(k, B)/B`` are attributed to each member; an encode or decode in a
  batch of B costs at least ``encode(B)/B`` / ``decode(B)/B`` (one GPU at
  least). B is capped by the number of same-batch-key requests that arrive
  before ``d_i`` and by memory (served weights + activations; resident latents
  are ignored, which only loosens). Doing ``s`` steps within ``tau`` seconds
  costs at least ``F_i(s, tau) = s * phi_i(tau/s)``, ``phi_i`` the
  non-increasing lower convex envelope of the points ``(t, c)``: the optimum
  of the LP ``min sum n_o c_o s.t. sum n_o = s, sum n_o t_o <= tau``, of
  which any mix of degrees and batch sizes a real schedule uses is one
  feasible point.
* energy: for every ``[t1, t2]`` with ``t1`` an arrival and ``t2`` a deadline,
  the GPU-seconds attributed inside ``[t1, t2]`` to on-time requests is at
  most ``N*(t2 - t1)`` (N GPUs, each running one segment at a time). An
  on-time request has advanced at most ``l = t1 - a_i`` along its chain
  before ``t1`` and has at most ``r = d_i - t2`` of it left after ``t2``, so
  the chain's middle ``[l, L_i - r]`` happens inside: its encode/decode
  fractions at their cheapest cost and its ``s_in`` steps within the
  ``Delta = |[a_i, d_i] ∩ [t1, t2]|`` seconds available, at least
  ``F_i(s_in, Delta)`` (F grows with s and shrinks with tau, so the real,
  larger middle costs at least that). Coefficients are rounded down and
  capacities up (GPU-milliseconds), so each integer row stays implied by the
  real one; rows that cannot bind are left out.

So every feasible schedule of the simulator's semantics (noise-free cost
model) gives a feasible ``x`` with as many on-time requests: the relaxation's
optimum, and a fortiori CP-SAT's proven bound, is at least the attainment of
any policy, the schedule of model 1 included (``attainment <= upper_bound``).
The bound ignores block alignment, whole steps, migration time and latent
memory; those only lower what is achievable, so it is valid but not always
tight.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

from ortools.sat.python import cp_model

from ditplan.models.catalog import SP_DEGREES, get_model
from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.request import Request, RequestState, RequestStatus, Stage
from ditplan.planner.execution import Segment
from ditplan.planner.sim_result import SimResult

POLICY_NAME = "offline-bound"
TICK = 1e-3  # seconds per integer time unit of the schedule model
FULL_SHARE = 0.3  # of the schedule's budget, for the one-piece whole-trace solve
_TICK_NS = 1_000_000
_GPU_MS = 1e3  # GPU-time unit of the bound's rows: GPU-milliseconds
_EPS = 1e-9

_STATUS = {cp_model.OPTIMAL: "OPTIMAL", cp_model.FEASIBLE: "FEASIBLE", cp_model.INFEASIBLE: "INFEASIBLE",
           cp_model.MODEL_INVALID: "MODEL_INVALID", cp_model.UNKNOWN: "UNKNOWN"}


@dataclass
class OfflineResult:
    result: SimResult  # the best schedule found, as a simulation result
    attainment: float  # its SLO attainment
    upper_bound: float  # proven upper bound on the SLO attainment of any policy
    status: str  # "schedule=OPTIMAL/FEASIBLE bound=<CP-SAT status>" (see solve_offline)
    wall_s: float
    met: int = 0  # requests on time in the schedule
    bound_met: int = 0  # proven bound on that number
    schedule_status: str = ""
    bound_status: str = ""
    stats: dict = field(default_factory=dict)


def _solver(time_limit_s: float, num_workers: int, seed: int,
            deterministic_time: float | None) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.max_time_in_seconds = max(0.05, float(time_limit_s))
    p.num_workers = max(1, int(num_workers))
    p.random_seed = int(seed)
    if deterministic_time is not None:
        p.max_deterministic_time = max(0.01, float(deterministic_time))
        if p.num_workers > 1:
            p.interleave_search = True  # deterministic parallel search
    return solver


def _served_weight_bytes(requests: Sequence[Request], cluster: Cluster) -> int:
    """Weights of every model in the trace, when they fit together (then they stay on every GPU);
    0 when they do not: the bound then lets each GPU hold the model it runs, loaded for free
    (a relaxation of placement, so still an upper bound)."""
    from ditplan.planner.placement import fits_everywhere

    models = sorted({r.model for r in requests})
    return sum(get_model(m).weight_bytes for m in models) if fits_everywhere(models, cluster, requests) else 0


def _fits(model, shape, k: int, batch: int, weights: int, memory: int) -> bool:
    return max(weights, model.weight_bytes) + model.activation_bytes(shape, k, batch) <= memory


def _degrees(model, cluster: Cluster) -> list[int]:
    return [k for k in model.sp_degrees(cluster.max_node_gpus) if cluster.blocks(k)]


# --- model 2: the relaxation -------------------------------------------------------

def _envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex envelope of (time, cost) points, non-increasing in time.

    Hull vertices by increasing time, cost strictly decreasing; past the last
    vertex the envelope stays at its cost.
    """
    front: list[tuple[float, float]] = []
    for t, c in sorted(set(points)):
        if not front or c < front[-1][1]:  # Pareto front: slower must be cheaper
            front.append((t, c))
    hull: list[tuple[float, float]] = []
    for p in front:
        while len(hull) >= 2:
            (t0, c0), (t1, c1) = hull[-2], hull[-1]
            if (c1 - c0) * (p[0] - t0) >= (p[1] - c0) * (t1 - t0):  # hull[-1] not below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _phi(hull: Sequence[tuple[float, float]], u: float) -> float:
    """Least GPU-seconds per step at an average step time of at most ``u`` seconds."""
    if u >= hull[-1][0]:
        return hull[-1][1]
    if u <= hull[0][0]:
        return hull[0][1]
    for (t0, c0), (t1, c1) in zip(hull, hull[1:]):
        if u <= t1:
            return c0 + (c1 - c0) * (u - t0) / (t1 - t0)
    return hull[-1][1]


@dataclass(frozen=True)
class _Relaxed:
    """Fastest times and cheapest GPU-seconds of one request (module doc, model 2)."""

    a: float
    d: float
    e_t: float
    e_g: float
    T: float
    steps: int
    d_t: float
    d_g: float
    hull: tuple[tuple[float, float], ...]

    @property
    def latency(self) -> float:
        return self.e_t + self.steps * self.T + self.d_t

    @property
    def feasible(self) -> bool:
        return bool(self.hull) and self.a + self.latency <= self.d + _EPS

    def inside(self, t1: float, t2: float) -> float:
        """Least GPU-seconds this request, if on time, spends inside [t1, t2]."""
        if t2 <= self.a or t1 >= self.d:
            return 0.0
        lat = self.latency
        lo, hi = max(0.0, t1 - self.a), lat - max(0.0, self.d - t2)
        delta = min(t2, self.d) - max(t1, self.a)
        if hi <= lo or delta <= 0:
            return 0.0

        def part(x0: float, x1: float) -> float:
            return max(0.0, min(hi, x1) - max(lo, x0))

        enc_end, steps_end = self.e_t, self.e_t + self.steps * self.T
        total = 0.0
        if self.e_t > 0:
            total += self.e_g * part(0.0, enc_end) / self.e_t
        if self.d_t > 0:
            total += self.d_g * part(steps_end, lat) / self.d_t
        s_in = part(enc_end, steps_end) / self.T
        if s_in > 0:
            total += s_in * _phi(self.hull, delta / s_in)
        return total


def _relaxed(requests: Sequence[Request], cluster: Cluster, cost: CostModel) -> list[_Relaxed]:
    weights = _served_weight_bytes(requests, cluster)
    memory = max(g.memory for g in cluster.gpus)
    arrivals: dict[tuple, list[float]] = {}
    for r in requests:
        arrivals.setdefault(r.batch_key(), []).append(r.arrival)
    bandwidths = {k: [None] if k == 1 else sorted({cluster.block_bandwidth(b) for b in cluster.blocks(k)})
                  for k in SP_DEGREES}
    memo: dict[tuple, tuple] = {}
    out = []
    for r in requests:
        model = r.spec
        bcap = max(1, sum(1 for t in arrivals[r.batch_key()] if t < r.deadline))
        key = (r.model, r.shape, r.steps, bcap)
        if key not in memo:
            pts: list[tuple[float, float]] = []
            for k in _degrees(model, cluster):
                for bw in bandwidths[k]:
                    for b in range(1, bcap + 1):
                        if not _fits(model, r.shape, k, b, weights, memory):
                            break
                        t = cost.step_time(model, r.shape, k, b, link_bw=bw)
                        pts.append((t, k * t / b))
            enc = [cost.encode_time(model, r.shape, b) for b in range(1, bcap + 1)]
            dec = [cost.decode_time(model, r.shape, b) for b in range(1, bcap + 1)]
            memo[key] = (min(enc), min(x / b for b, x in enumerate(enc, 1)),
                         min((t for t, _ in pts), default=math.inf),
                         min(dec), min(x / b for b, x in enumerate(dec, 1)),
                         tuple(_envelope(pts)) if pts else ())
        e_t, e_g, T, d_t, d_g, hull = memo[key]
        out.append(_Relaxed(r.arrival, r.deadline, e_t, e_g, T, r.steps, d_t, d_g, hull))
    return out


def _energy_rows(rel: list[_Relaxed], n_gpus: int) -> list[tuple[list[tuple[int, int]], int]]:
    """Rows ``sum_i w_i x_i <= cap`` over every [arrival, deadline] window that can bind."""
    live = [i for i, q in enumerate(rel) if q.feasible]
    t1s = sorted({rel[i].a for i in live})
    t2s = sorted({rel[i].d for i in live})
    rows, seen = [], set()
    for t1 in t1s:
        for t2 in t2s:
            if t2 <= t1:
                continue
            cap = math.ceil(n_gpus * (t2 - t1) * _GPU_MS * (1 + 1e-9))
            terms = []
            for i in live:
                w = math.floor(rel[i].inside(t1, t2) * _GPU_MS * (1 - 1e-9))
                if w > 0:
                    terms.append((i, w))
            if sum(w for _, w in terms) <= cap:
                continue
            key = (tuple(terms), cap)
            if key not in seen:
                seen.add(key)
                rows.append((terms, cap))
    return rows


def upper_bound_count(requests: Sequence[Request], cluster: Cluster, cost: CostModel,
                      time_limit_s: float = 5.0, num_workers: int = 1, seed: int = 0,
                      deterministic_time: float | None = None,
                      hint: Sequence[bool] | None = None) -> tuple[int, str, dict]:
    """(proven bound on how many of ``requests`` any policy gets on time, CP-SAT status, stats)."""
    t0 = time.perf_counter()
    rel = _relaxed(requests, cluster, cost)
    alone = sum(q.feasible for q in rel)
    rows = _energy_rows(rel, cluster.size)
    m = cp_model.CpModel()
    x = [m.new_bool_var(f"x{i}") for i in range(len(requests))]
    for i, q in enumerate(rel):
        if not q.feasible:
            m.add(x[i] == 0)
    for terms, cap in rows:
        m.add(sum(w * x[i] for i, w in terms) <= cap)
    m.maximize(sum(x))
    for i, h in enumerate(hint or ()):
        m.add_hint(x[i], bool(h))
    build_s = time.perf_counter() - t0
    solver = _solver(time_limit_s, num_workers, seed, deterministic_time)
    code = solver.solve(m)
    status = _STATUS.get(code, str(code))
    bound = alone  # always valid: nobody infeasible alone is on time
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        bound = min(bound, math.floor(solver.best_objective_bound + 1e-6))
    stats = {"rows": len(rows), "alone_feasible": alone, "build_s": round(build_s, 3),
             "solve_s": round(solver.wall_time, 3), "det_time": solver.deterministic_time}
    return bound, status, stats


# --- model 1: the schedule -------------------------------------------------------------

@dataclass(frozen=True)
class _Option:
    """Degree k on one aligned block, with the request's stage times on it."""

    k: int
    block: tuple[int, ...]
    enc: float  # seconds
    diff: float  # seconds, all steps at batch 1 on this block
    dec: float  # seconds

    @property
    def gpu_seconds(self) -> float:
        return self.enc + self.k * self.diff + self.dec


@dataclass(frozen=True)
class _Piece:
    option: _Option
    start: int  # tick
    steps: int


@dataclass(frozen=True)
class _Plan:
    """How one request runs in the schedule (ticks)."""

    enc_gpu: int
    enc_start: int
    pieces: tuple[_Piece, ...]
    dec_gpu: int
    dec_start: int


def _options(req: Request, cluster: Cluster, cost: CostModel, weights: int) -> list[_Option]:
    model = req.spec
    enc = cost.encode_time(model, req.shape)
    dec = cost.decode_time(model, req.shape)
    out = []
    for k in _degrees(model, cluster):
        for block in cluster.blocks(k):
            if not _fits(model, req.shape, k, 1, weights, min(cluster.gpus[g].memory for g in block)):
                continue
            bw = cluster.block_bandwidth(block) if k > 1 else None
            step = cost.step_time(model, req.shape, k, 1, link_bw=bw)
            out.append(_Option(k, tuple(block), enc, req.steps * step, dec))
    return out


def _ticks(seconds: float) -> int:
    return max(0, int(math.ceil(seconds / TICK - 1e-7)))


def _dec_latest(req: Request, dec: float) -> int:
    """Last decode start tick from which the request is on time in real seconds."""
    return int(math.floor((req.deadline - dec) / TICK + 1e-7))


def _step_ns(o: _Option, steps: int) -> int:
    return int(math.ceil(o.diff / steps * 1e9))


def _piece_ticks(o: _Option, n: int, steps: int, move: float) -> int:
    """Ticks reserved for ``n`` steps on option ``o`` after a move of up to ``move`` seconds."""
    ns = n * _step_ns(o, steps) + int(math.ceil(move * 1e9))
    return -(-ns // _TICK_NS)


def _run_ticks(o: _Option, steps: int) -> int:
    """Ticks reserved for all steps of a request on ``o`` in one piece."""
    return _piece_ticks(o, steps, steps, 0.0)


def _alone_on_time(req: Request, opts: list[_Option]) -> bool:
    """Whether the schedule model can put ``req`` on time at all (alone, fastest option)."""
    return bool(opts) and (_ticks(req.arrival) + _ticks(opts[0].enc) + min(_run_ticks(o, req.steps) for o in opts)
                           <= _dec_latest(req, opts[0].dec))


def _max_move(requests: Sequence[Request], cluster: Cluster, cost: CostModel) -> float:
    """Longest latent move a piece may pay: the request's latent over the slowest link."""
    if cluster.size < 2:
        return 0.0
    slow = min(cluster.link_bandwidth(a, b) for a in range(cluster.size) for b in range(a + 1, cluster.size))
    return max((cost.transfer_time(r.spec.latent_bytes(r.shape), slow) for r in requests), default=0.0)


def _contiguous(req: Request, o: _Option, s: int) -> _Plan:
    """Encode, all steps and decode back to back on ``o``'s block (encode/decode on its first GPU)."""
    e, D = _ticks(o.enc), _run_ticks(o, req.steps)
    return _Plan(o.block[0], s, (_Piece(o, s + e, req.steps),), o.block[0], s + e + D)


class _Busy:
    """Busy tick intervals per GPU, for the greedy list schedule."""

    def __init__(self, n: int) -> None:
        self.spans: list[list[tuple[int, int]]] = [[] for _ in range(n)]

    def _free(self, g: int, s: int, e: int) -> bool:
        return all(e <= a or s >= b for a, b in self.spans[g])

    def _fits(self, o: _Option, s: int, e: int, D: int, d: int) -> bool:
        return (self._free(o.block[0], s, s + e + D + d)
                and all(self._free(g, s + e, s + e + D) for g in o.block[1:]))

    def earliest(self, o: _Option, lo: int, e: int, D: int, d: int) -> int:
        cands = {lo}
        for g in o.block:
            off = 0 if g == o.block[0] else e
            cands.update(b - off for _, b in self.spans[g] if b - off >= lo)
        return next(s for s in sorted(cands) if self._fits(o, s, e, D, d))

    def add(self, o: _Option, s: int, e: int, D: int, d: int) -> None:
        self.spans[o.block[0]].append((s, s + e + D + d))
        for g in o.block[1:]:
            self.spans[g].append((s + e, s + e + D))


def _greedy(requests: Sequence[Request], opts: list[list[_Option]], n_gpus: int,
            prefer_cheap: bool) -> dict[int, _Plan]:
    """EDF list schedule, one contiguous run per request; on-time requests only."""
    busy = _Busy(n_gpus)
    out: dict[int, _Plan] = {}
    for i in sorted(range(len(requests)), key=lambda i: (requests[i].deadline, requests[i].arrival, i)):
        r = requests[i]
        best = None
        for o in opts[i]:
            e, D, d = _ticks(o.enc), _run_ticks(o, r.steps), _ticks(o.dec)
            lo, hi = _ticks(r.arrival), _dec_latest(r, o.dec) - e - D
            if hi < lo:
                continue
            s = busy.earliest(o, lo, e, D, d)
            if s > hi:
                continue
            key = (o.gpu_seconds, s) if prefer_cheap else (s + e + D, o.gpu_seconds)
            if best is None or key < best[0]:
                best = (key, o, s)
        if best is not None:
            _, o, s = best
            busy.add(o, s, _ticks(o.enc), _run_ticks(o, r.steps), _ticks(o.dec))
            out[i] = _contiguous(r, o, s)
    return out


def _plan_cost(req: Request, plan: _Plan, move: float) -> int:
    o0 = plan.pieces[0].option
    total = _ticks(o0.enc) + _ticks(o0.dec)
    for p, pc in enumerate(plan.pieces):
        total += pc.option.k * _piece_ticks(pc.option, pc.steps, req.steps, move if p else 0.0)
    return total


def _score(requests: Sequence[Request], plans: dict[int, _Plan], move: float) -> tuple[int, int]:
    """(on time, -GPU-ticks): larger is better."""
    return len(plans), -sum(_plan_cost(requests[i], pl, move) for i, pl in plans.items())


class _ScheduleModel:
    """Model 1 over the ``free`` requests; ``fixed`` plans stay as they are (busy GPU time)."""

    def __init__(self, requests: Sequence[Request], opts: list[list[_Option]], n_gpu: int, move: float,
                 pieces: int, free: Sequence[int], fixed: dict[int, _Plan]) -> None:
        self.requests, self.opts, self.move = requests, opts, move
        m = self.m = cp_model.CpModel()
        per_gpu: list[list] = [[] for _ in range(n_gpu)]
        self.ys: dict[int, cp_model.IntVar] = {}
        self.v: dict[int, dict] = {}
        costs: list = []
        worst = 0
        horizon = [math.inf, -math.inf]
        for i in free:
            r = requests[i]
            if not _alone_on_time(r, opts[i]):
                continue
            e, d = _ticks(opts[i][0].enc), _ticks(opts[i][0].dec)
            lo, dl = _ticks(r.arrival), _dec_latest(r, opts[i][0].dec)
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
                mv = move if p else 0.0
                lits, sizes = {}, {}
                for j, o in enumerate(opts[i]):
                    if lo + e + _piece_ticks(o, 1, r.steps, mv) > dl:
                        continue  # not even one step of this option fits in the window
                    full = _piece_ticks(o, r.steps, r.steps, mv)
                    lit, size = m.new_bool_var(f"l{i}_{p}_{j}"), m.new_int_var(0, full, f"D{i}_{p}_{j}")
                    m.add(size == 0).only_enforce_if(~lit)
                    m.add(size * _TICK_NS >= n * _step_ns(o, r.steps) + int(math.ceil(mv * 1e9))
                          ).only_enforce_if(lit)
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
            for g, a, b in _plan_spans(requests[i], plan, move):
                if b > horizon[0] and a < horizon[1]:
                    per_gpu[g].append(m.new_fixed_size_interval_var(a, b - a, f"F{i}_{g}_{a}"))
        for ivs in per_gpu:
            if len(ivs) > 1:
                m.add_no_overlap(ivs)
        self.count = sum(self.ys.values())
        m.maximize((worst + 1) * self.count - sum(c * x for c, x in costs))

    def hint(self, plans: dict[int, _Plan]) -> None:
        """A complete hint from ``plans`` (pieces it lacks: absent, zero steps)."""
        m, move = self.m, self.move
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
                size = _piece_ticks(pc.option, pc.steps, self.requests[i].steps, move if p else 0.0) if pc else 0
                if pc is not None:
                    m.add_hint(pv["s"], pc.start)
                    m.add_hint(pv["e"], pc.start + size)
                for j, lit in pv["lits"].items():
                    on = pc is not None and self.opts[i][j] == pc.option
                    m.add_hint(lit, on)
                    m.add_hint(pv["sizes"][j], size if on else 0)

    def plans(self, solver: cp_model.CpSolver) -> dict[int, _Plan]:
        out: dict[int, _Plan] = {}
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
                pcs.append(_Piece(self.opts[i][j], solver.value(pv["s"]), solver.value(pv["n"])))
            out[i] = _Plan(next(g for g, lit in rv["enc"].items() if val(lit)), solver.value(rv["se"]),
                           tuple(pcs), next(g for g, lit in rv["dec"].items() if val(lit)),
                           solver.value(rv["sd"]))
        return out


def _plan_spans(req: Request, plan: _Plan, move: float) -> list[tuple[int, int, int]]:
    """(gpu, start tick, end tick) of everything ``plan`` reserves."""
    o0 = plan.pieces[0].option
    out = [(plan.enc_gpu, plan.enc_start, plan.enc_start + _ticks(o0.enc)),
           (plan.dec_gpu, plan.dec_start, plan.dec_start + _ticks(o0.dec))]
    for p, pc in enumerate(plan.pieces):
        end = pc.start + _piece_ticks(pc.option, pc.steps, req.steps, move if p else 0.0)
        out.extend((g, pc.start, end) for g in pc.option.block)
    return out


class _Scheduler:
    """Model 1, solved in stages that each start from the best schedule so far."""

    def __init__(self, requests: Sequence[Request], cluster: Cluster, cost: CostModel,
                 num_workers: int = 1, seed: int = 0) -> None:
        self.requests, self.n_gpu = requests, cluster.size
        self.num_workers, self.seed = num_workers, seed
        weights = _served_weight_bytes(requests, cluster)
        self.opts = [_options(r, cluster, cost, weights) for r in requests]
        self.move = _max_move(requests, cluster, cost)
        self.best: dict[int, _Plan] = max((_greedy(requests, self.opts, self.n_gpu, cheap) for cheap in (True, False)),
                                          key=self.score)
        self.stats: dict = {"greedy_on_time": len(self.best)}

    def score(self, plans: dict[int, _Plan]) -> tuple[int, int]:
        return _score(self.requests, plans, self.move)

    def _solve(self, model: _ScheduleModel, time_limit_s: float,
               deterministic_time: float | None) -> tuple[dict[int, _Plan] | None, str, float]:
        solver = _solver(time_limit_s, self.num_workers, self.seed, deterministic_time)
        code = solver.solve(model.m)
        status = _STATUS.get(code, str(code))
        found = model.plans(solver) if code in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None
        return found, status, solver.deterministic_time

    def full(self, pieces: int, time_limit_s: float, deterministic_time: float | None,
             max_on_time: int | None) -> tuple[str, float]:
        """Solve the whole trace at once; returns (status, deterministic time used)."""
        model = _ScheduleModel(self.requests, self.opts, self.n_gpu, self.move, pieces,
                               range(len(self.requests)), {})
        if max_on_time is not None and model.ys:
            model.m.add(model.count <= max_on_time)
        model.hint(self.best)
        found, status, det = self._solve(model, time_limit_s, deterministic_time)
        if found is not None and self.score(found) >= self.score(self.best):
            self.best = found
        return status, det

    def _possible(self, i: int) -> bool:
        return _alone_on_time(self.requests[i], self.opts[i])

    def _neighbours(self, m: int, size: int) -> list[int]:
        """Missed request ``m`` and the ``size - 1`` on-time requests using most GPU-time in its window."""
        r = self.requests[m]
        lo, hi = r.arrival / TICK, r.deadline / TICK

        def overlap(i: int) -> float:
            return sum(max(0.0, min(b, hi) - max(a, lo))
                       for _, a, b in _plan_spans(self.requests[i], self.best[i], self.move))

        near = sorted((-overlap(i), i) for i in self.best)
        return [m] + [i for w, i in near[:size - 1] if w < 0]

    def improve(self, pieces: int, window: int, time_limit_s: float,
                deterministic_time: float | None) -> dict:
        """Large-neighbourhood search: re-solve a few requests at a time, the rest fixed.

        Each sweep frees, in turn, ``window`` requests consecutive by arrival
        (sliding by half a window), then each missed request with the
        ``window - 1`` on-time ones that use most GPU-time inside its window.
        Neighbourhoods are solved with up to ``pieces`` diffuse pieces a
        request and kept when the whole schedule improves; sweeps repeat
        while one improves and budget is left.
        """
        t0 = time.perf_counter()
        det_left = deterministic_time
        order = sorted(range(len(self.requests)), key=lambda i: (self.requests[i].arrival, i))
        window = max(1, min(window, len(order)))
        stride = max(1, window // 2)
        slides = [order[s:s + window] for s in range(0, max(1, len(order) - window + stride), stride)]
        n_hoods = len(slides) + sum(1 for i in order if i not in self.best and self._possible(i))
        per = max(0.25, time_limit_s / n_hoods)
        det_per = None if deterministic_time is None else max(0.02, deterministic_time / n_hoods)
        stats = {"lns_solves": 0, "lns_improved": 0}
        while True:
            better = False
            missed = [i for i in order if i not in self.best and self._possible(i)]
            for hood in [*slides, *([m] for m in missed)]:
                wall_left = time_limit_s - (time.perf_counter() - t0)
                if wall_left <= 0.05 or (det_left is not None and det_left <= 0.01):
                    return stats
                if len(hood) == 1:  # a missed request: take its neighbours now, from the current best
                    if hood[0] in self.best:
                        continue
                    hood = self._neighbours(hood[0], window)
                fixed = {i: pl for i, pl in self.best.items() if i not in hood}
                model = _ScheduleModel(self.requests, self.opts, self.n_gpu, self.move, pieces, hood, fixed)
                if not model.ys:
                    continue
                model.hint(self.best)
                # With a deterministic budget the wall clock is only a safety cap, so runs repeat.
                found, _, used = self._solve(model, wall_left if det_left is not None else min(per, wall_left),
                                             None if det_left is None else min(det_left, det_per))
                stats["lns_solves"] += 1
                if det_left is not None:
                    det_left -= used
                if found is not None and self.score({**fixed, **found}) > self.score(self.best):
                    self.best, better = {**fixed, **found}, True
                    stats["lns_improved"] += 1
            if not better:
                return stats


def schedule(requests: Sequence[Request], cluster: Cluster, cost: CostModel, time_limit_s: float = 10.0,
             num_workers: int = 1, seed: int = 0, deterministic_time: float | None = None,
             pieces: int = 2, window: int = 6, max_on_time: int | None = None) -> tuple[dict[int, _Plan], str, dict]:
    """Best schedule found (module doc, model 1): ({request index: plan} of on-time requests, status, stats).

    Greedy, then the one-piece model on the whole trace (``FULL_SHARE`` of
    the budget), then large-neighbourhood search with ``pieces`` pieces and
    neighbourhoods of ``window`` requests on the rest. ``max_on_time`` (a
    proven bound) caps the count so CP-SAT can prove optimality sooner. The
    status is the whole-trace solve's.
    """
    t0 = time.perf_counter()
    sched = _Scheduler(requests, cluster, cost, num_workers, seed)
    det_full = None if deterministic_time is None else deterministic_time * FULL_SHARE
    status, used = sched.full(1, time_limit_s * FULL_SHARE, det_full, max_on_time)
    sched.stats["full_on_time"] = len(sched.best)
    at_bound = max_on_time is not None and len(sched.best) >= max_on_time
    wall_rest = time_limit_s - (time.perf_counter() - t0)
    if not (status == "OPTIMAL" and (pieces == 1 or at_bound)) and wall_rest > 0.1:
        det_rest = None if deterministic_time is None else max(0.0, deterministic_time - used)
        sched.stats.update(sched.improve(pieces, window, wall_rest, det_rest))
    sched.stats["on_time"] = len(sched.best)
    return sched.best, status, sched.stats


def to_sim_result(requests: Sequence[Request], cluster: Cluster, cost: CostModel,
                  plans: dict[int, _Plan], solver_ms: float = 0.0) -> SimResult:
    """Segments and outcomes of a schedule; requests without a plan run afterwards, best effort."""
    statuses = [RequestStatus(r) for r in requests]
    segments: list[Segment] = []
    tail = [0] * cluster.size  # tick after the last work on each GPU

    def occupy(gpus, end_tick: int) -> None:
        for g in gpus:
            tail[g] = max(tail[g], end_tick)

    def place(i: int, plan: _Plan) -> None:
        r, st = requests[i], statuses[i]
        model = r.spec
        enc, dec = cost.encode_time(model, r.shape), cost.decode_time(model, r.shape)
        t = plan.enc_start * TICK
        segments.append(Segment((r.id,), Stage.ENCODE, (plan.enc_gpu,), 0, t, t + enc))
        occupy((plan.enc_gpu,), plan.enc_start + _ticks(enc))
        latent: tuple[int, ...] = (plan.enc_gpu,)
        prev_end = None
        for p, pc in enumerate(plan.pieces):
            o, t = pc.option, pc.start * TICK
            mv = 0.0
            if p and set(latent) != set(o.block):  # the simulator's move rule
                mv = cost.transfer_time(model.latent_bytes(r.shape), cluster.transfer_bandwidth(latent, o.block))
                st.migrations += 1
            if p and o.k != st.sp:
                st.sp_changes += 1
            if prev_end is not None and t > prev_end + 1e-9:
                st.preemptions += 1
            end = t + mv + pc.steps * (o.diff / r.steps)
            segments.append(Segment((r.id,), Stage.DIFFUSE, o.block, pc.steps, t, end))
            occupy(o.block, pc.start + _ticks(end - t))
            latent, prev_end, st.sp = o.block, end, o.k
        t = plan.dec_start * TICK
        segments.append(Segment((r.id,), Stage.DECODE, (plan.dec_gpu,), 0, t, t + dec))
        occupy((plan.dec_gpu,), plan.dec_start + _ticks(dec))
        st.state, st.finish, st.encoded = RequestState.DONE, t + dec, True
        st.steps_done, st.latent_gpus = r.steps, (plan.dec_gpu,)

    for i, plan in sorted(plans.items()):
        place(i, plan)
    weights = _served_weight_bytes(requests, cluster)
    for i in sorted(set(range(len(requests))) - set(plans), key=lambda i: (requests[i].arrival, i)):
        best = None
        for o in _options(requests[i], cluster, cost, weights):
            e = _ticks(o.enc)
            s = max([_ticks(requests[i].arrival), tail[o.block[0]]] + [tail[g] - e for g in o.block[1:]])
            key = (s + e + _run_ticks(o, requests[i].steps) + _ticks(o.dec), o.gpu_seconds)
            if best is None or key < best[0]:
                best = (key, o, s)
        if best is None:  # fits no block: it can never run
            statuses[i].state = RequestState.FAILED
        else:
            place(i, _contiguous(requests[i], best[1], best[2]))
    segments.sort(key=lambda g: (g.start, g.gpus))
    return SimResult(POLICY_NAME, statuses, segments, [solver_ms], 0, 1,
                     max((g.end for g in segments), default=0.0))


def _on_time(st: RequestStatus) -> bool:
    return st.state is RequestState.DONE and st.finish <= st.request.deadline + 1e-9


def solve_offline(requests: Sequence[Request], cluster: Cluster, cost: CostModel,
                  time_limit_s: float = 20.0, num_workers: int = 1, seed: int = 0,
                  deterministic_time: float | None = None, pieces: int = 2,
                  window: int = 6) -> OfflineResult:
    """Best schedule found and a proven SLO-attainment upper bound for ``requests`` (module doc).

    ``time_limit_s`` caps the wall-clock time of all solves together: the
    bound (at most 20 %, usually well under a second), then the schedule
    (``FULL_SHARE`` of the rest for the one-piece whole-trace solve, the rest
    for the search with ``pieces`` pieces and neighbourhoods of ``window``
    requests; it stops early once a proven optimum is reached).
    ``deterministic_time`` (CP-SAT deterministic seconds, shared out the same
    way) makes the result repeatable for a seed on any machine, the wall
    clock then being only a safety cap; with ``num_workers > 1`` it also
    switches CP-SAT to its deterministic interleaved parallel search.
    Without it, runs repeat only while no wall-clock limit cuts a search.

    ``status`` reads ``schedule=OPTIMAL`` when the schedule's count meets the
    proven bound (no policy does better), else ``schedule=FEASIBLE``;
    ``bound=OPTIMAL`` when the relaxation was solved to optimality.
    The bound assumes the noise-free cost model (``SimConfig.noise = 0``).
    """
    t0 = time.perf_counter()
    requests = list(requests)
    n = len(requests)
    if n == 0:
        return OfflineResult(SimResult(POLICY_NAME, [], [], [0.0], 0, 1, 0.0), 1.0, 1.0,
                             "schedule=OPTIMAL bound=OPTIMAL", 0.0, 0, 0, "OPTIMAL", "OPTIMAL")
    det_left = deterministic_time

    def budget(share: float) -> tuple[float, float | None]:
        wall = max(0.05, (time_limit_s - (time.perf_counter() - t0)) * share)
        return wall, (None if det_left is None else max(0.01, det_left * share))

    def spent(stats: dict) -> None:
        nonlocal det_left
        if det_left is not None:
            det_left = max(0.0, det_left - stats.get("det_time", 0.0))

    wall, det = budget(0.2)
    bound, bstatus, bstats = upper_bound_count(requests, cluster, cost, wall, num_workers, seed, det)
    spent(bstats)
    wall, det = budget(1.0)
    plans, sstatus, sstats = schedule(requests, cluster, cost, wall, num_workers, seed, det,
                                      pieces=pieces, window=window, max_on_time=bound)
    stats = {"bound": bstats, "schedule": sstats}
    result = to_sim_result(requests, cluster, cost, plans, solver_ms=(time.perf_counter() - t0) * 1e3)
    met = sum(_on_time(st) for st in result.requests)
    if met > bound:  # impossible while the relaxation is valid; never report a bound below a schedule
        stats["bound_below_schedule"] = (bound, met)
        bound = met
    sstats["cpsat_status"] = sstatus
    sstatus = "OPTIMAL" if met >= bound else "FEASIBLE"
    return OfflineResult(result, met / n, bound / n, f"schedule={sstatus} bound={bstatus}",
                         time.perf_counter() - t0, met, bound, sstatus, bstatus, stats)
