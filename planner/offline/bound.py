"""Model 2 of the offline bound: a relaxation whose proven optimum bounds every policy's attainment.

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
from dataclasses import dataclass
from typing import Sequence

from ortools.sat.python import cp_model

from ditplan.models.catalog import SP_DEGREES
from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.offline.fit import degrees, fits, served_weight_bytes
from ditplan.planner.request import Request
from ditplan.planner.solvers.cpsat_params import configure

_GPU_MS = 1e3  # GPU-time unit of the bound's rows: GPU-milliseconds
_EPS = 1e-9


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
    weights = served_weight_bytes(requests, cluster)
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
            for k in degrees(model, cluster):
                for bw in bandwidths[k]:
                    for b in range(1, bcap + 1):
                        if not fits(model, r.shape, k, b, weights, memory):
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
    solver = cp_model.CpSolver()
    configure(solver, deterministic_time, seed, num_workers, time_limit_s)
    code = solver.solve(m)
    status = solver.status_name(code)
    bound = alone  # always valid: nobody infeasible alone is on time
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        bound = min(bound, math.floor(solver.best_objective_bound + 1e-6))
    stats = {"rows": len(rows), "alone_feasible": alone, "build_s": round(build_s, 3),
             "solve_s": round(solver.wall_time, 3), "det_time": solver.deterministic_time}
    return bound, status, stats

