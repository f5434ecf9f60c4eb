"""Round-based earliest-deadline-first, and the per-request timing it shares.

Each plan walks the waiting requests by deadline. Encode and decode are
one-GPU tasks. Diffuse gets the smallest SP degree that keeps the request on
track (it could still finish by its deadline running all its remaining steps
at that degree), for about one round of steps, on a block that keeps its
latent where it is. Requests that are already late run afterwards at k = 1,
best effort, on whatever is left. A request whose block does not fit waits;
it never blocks the ones behind it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ditplan.models.catalog import Shape, get_model
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import register
from ditplan.planner.policies.blocks import BlockAllocator, activation_bytes, block_of
from ditplan.planner.request import RequestStatus, Stage
from ditplan.planner.state import PlannerState


# --- timing shared by the round-based policies ---------------------------------
@dataclass(frozen=True, slots=True)
class ShapeTimes:
    """Costs of one (model, shape) on this cluster, at batch 1."""

    degrees: tuple[int, ...]  # legal SP degrees that fit in a node
    step: dict[int, float]  # seconds per step at degree k on a nominal block
    act: dict[int, int]  # activation bytes per GPU at degree k
    tmin: float  # fastest step time over ``degrees``
    encode: float
    decode: float


class TimeTable:
    """Memo of ``ShapeTimes`` by (model, shape), valid for one cluster and cost model.

    A policy is called thousands of times a simulation on the same handful of
    shapes; the memo makes each lookup one dict hit.
    """

    def __init__(self) -> None:
        self._cluster = None
        self._cost = None
        self._memo: dict[tuple, ShapeTimes] = {}

    def bind(self, state: PlannerState) -> "TimeTable":
        if state.cluster is not self._cluster or state.cost is not self._cost:
            self._cluster, self._cost, self._memo = state.cluster, state.cost, {}
        return self

    def of(self, status: RequestStatus) -> ShapeTimes:
        req = status.request
        key = (req.model, req.shape)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self._build(req.model, req.shape)
        return hit

    def _build(self, model_name: str, shape: Shape) -> ShapeTimes:
        cluster, cost = self._cluster, self._cost
        spec = get_model(model_name)
        degrees = spec.sp_degrees(cluster.max_node_gpus)
        step = {}
        for k in degrees:
            bw = cluster.block_bandwidth(cluster.blocks(k)[0]) if k > 1 else None
            step[k] = cost.step_time(spec, shape, k, 1, link_bw=bw)
        act = {k: activation_bytes(model_name, shape, k) for k in degrees}
        return ShapeTimes(degrees, step, act, min(step.values()),
                          cost.encode_time(spec, shape), cost.decode_time(spec, shape))


def deadline_order(status: RequestStatus) -> tuple:
    req = status.request
    return (req.deadline, req.arrival, req.id)


def round_steps(round_s: float, remaining: int, step_s: float) -> int:
    """Steps that fill about one round: max(1, min(remaining, floor(round_s / step_s)))."""
    return max(1, min(remaining, math.floor(round_s / step_s + 1e-9)))


def migration_estimate(state: PlannerState, status: RequestStatus, k: int) -> float:
    """Latent move cost if the request diffuses at degree ``k`` next (0 when it stays put)."""
    lat = status.latent_gpus
    if status.steps_done == 0 or not lat or len(lat) == k:
        return 0.0
    target = block_of(state.cluster, lat[0], k)
    return state.migration_time(status, target) if target is not None else 0.0


def on_track_degrees(state: PlannerState, status: RequestStatus, t: ShapeTimes, budget: float,
                     max_k: int = 8) -> list[int]:
    """Degrees k (ascending) at which all remaining steps fit ``budget`` (deadline - now - decode)."""
    rem = status.remaining_steps
    return [k for k in t.degrees
            if k <= max_k and migration_estimate(state, status, k) + rem * t.step[k] <= budget]


def home(status: RequestStatus) -> tuple[int, ...]:
    """GPUs a diffuse block should keep: the latent once it has one (moving it costs);
    before the first step nothing is resident that a move would pay for."""
    return status.latent_gpus if status.steps_done > 0 else ()


def diffuse_assignment(state: PlannerState, status: RequestStatus, gpus: tuple[int, ...]) -> Assignment:
    """One round of diffuse steps for ``status`` on ``gpus``, sized by the real block's step time."""
    q = round_steps(state.round_s, status.remaining_steps, state.step_time(status, gpus))
    return Assignment((status.id,), Stage.DIFFUSE, gpus, q)


def take_best_effort(alloc: BlockAllocator, times: ShapeTimes, status: RequestStatus) -> tuple[int, ...] | None:
    """Smallest block that fits (k = 1 unless memory needs more), near the latent."""
    for k in times.degrees:
        blk = alloc.take(k, home(status), times.act[k])
        if blk is not None:
            return blk
    return None


def take_stage_gpu(alloc: BlockAllocator, status: RequestStatus, stage: Stage) -> tuple[int, ...] | None:
    """One GPU for encode or decode; decode stays next to the latent."""
    return alloc.take(1, status.latent_gpus if stage is Stage.DECODE else ())


# --- the policy ----------------------------------------------------------------
@register("edf")
class EdfPolicy:
    """Earliest deadline first, smallest on-track SP degree, one round of steps at a time."""

    name = "edf"

    def __init__(self) -> None:
        self._times = TimeTable()

    def plan(self, state: PlannerState) -> RoundPlan:
        times = self._times.bind(state)
        alloc = BlockAllocator(state)
        out: list[Assignment] = []
        late: list[RequestStatus] = []
        now = state.now
        for st in sorted(state.waiting(), key=deadline_order):
            if alloc.free_count() == 0:
                break
            stage = st.next_stage
            if stage is not Stage.DIFFUSE:
                blk = take_stage_gpu(alloc, st, stage)
                if blk is not None:
                    out.append(Assignment((st.id,), stage, blk))
                continue
            t = times.of(st)
            on_track = on_track_degrees(state, st, t, st.request.deadline - now - t.decode)
            if not on_track:
                late.append(st)
                continue
            for k in on_track:
                blk = alloc.take(k, home(st), t.act[k])
                if blk is not None:
                    out.append(diffuse_assignment(state, st, blk))
                    break
        for st in late:
            if alloc.free_count() == 0:
                break
            blk = take_best_effort(alloc, times.of(st), st)
            if blk is not None:
                out.append(diffuse_assignment(state, st, blk))
        return RoundPlan(tuple(out), solver=self.name)
