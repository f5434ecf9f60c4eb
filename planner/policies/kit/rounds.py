"""Per-request rules the round-based peers share: deadline order, a round's worth of steps,
the latent move a degree change costs, the degrees that keep a request on track, and the
block a stage takes.
"""
from __future__ import annotations

import math

from ditplan.planner.plan import Assignment
from ditplan.planner.policies.kit.blocks import BlockAllocator, block_of
from ditplan.planner.policies.kit.timing import Timing
from ditplan.planner.request import RequestStatus, Stage
from ditplan.planner.state import PlannerState


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


def on_track_degrees(state: PlannerState, status: RequestStatus, t: Timing, budget: float,
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


def take_best_effort(alloc: BlockAllocator, t: Timing, status: RequestStatus) -> tuple[int, ...] | None:
    """Smallest block that fits (k = 1 unless memory needs more), near the latent."""
    for k in t.degrees:
        blk = alloc.take(k, home(status), t.act[k])
        if blk is not None:
            return blk
    return None


def take_stage_gpu(alloc: BlockAllocator, status: RequestStatus, stage: Stage) -> tuple[int, ...] | None:
    """One GPU for encode or decode; decode stays next to the latent."""
    return alloc.take(1, status.latent_gpus if stage is Stage.DECODE else ())
