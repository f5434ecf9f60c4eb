"""The execution rules the simulator and the service share: how an assignment starts and ends.

An assignment runs to completion. Progress counts when it starts (the
planner's view: ``steps_done`` grows by its steps and the latent moves to its
GPUs); a request is paused by not being given more work, its latent staying
where it is; a later diffuse assignment elsewhere first pays the hand-off
(``planner.state.handoff_time``). The simulator (``planner/simulator.py``)
and the service core (``planner/service/core.py``) both call these, so a
policy sees the same world in a what-if and in production.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.request import RequestState, RequestStatus, Stage
from ditplan.planner.state import handoff_time

EPS = 1e-9


@dataclass(frozen=True)
class Segment:
    """One executed piece of work (timeline (docs/architecture.md, Contracts))."""

    request_ids: tuple[str, ...]
    stage: Stage
    gpus: tuple[int, ...]
    steps: int
    start: float
    end: float

    @property
    def sp(self) -> int:
        return len(self.gpus)


def diffuse_costs(cluster: Cluster, cost: CostModel, a: Assignment,
                  members: Sequence[RequestStatus]) -> tuple[float, float]:
    """(seconds to move the latents onto ``a.gpus``, seconds per step) of a diffuse assignment."""
    lead = members[0].request
    bw = cluster.block_bandwidth(a.gpus) if a.sp > 1 else None
    step = cost.batch_step_time(lead.spec, [st.request.shape for st in members], a.sp, link_bw=bw)
    move = max((handoff_time(cluster, cost, st, Stage.DIFFUSE, a.gpus) for st in members), default=0.0)
    return move, step


def start_segment(cluster: Cluster, cost: CostModel, a: Assignment, now: float,
                  statuses: dict[str, RequestStatus], gpu_free_at: list[float],
                  rng: np.random.Generator | None = None, noise: float = 0.0) -> Segment:
    """Start ``a`` at ``now``: update its requests and GPUs; the segment's end is predicted.

    Progress counts at the start (the planner's view): ``steps_done`` grows by
    ``a.steps``, the latent moves to ``a.gpus``. With ``noise > 0`` each step's
    time is scaled by a lognormal draw from ``rng``.
    """
    members = [statuses[rid] for rid in a.request_ids]
    lead = members[0].request
    if a.stage is Stage.DIFFUSE:
        move, step = diffuse_costs(cluster, cost, a, members)
        if noise > 0:
            work = float(np.sum(step * rng.lognormal(0.0, noise, a.steps)))
        else:
            work = step * a.steps
        for st in members:
            if st.steps_done > 0 and st.latent_gpus and set(st.latent_gpus) != set(a.gpus):
                st.migrations += 1
            if st.sp and st.sp != a.sp:
                st.sp_changes += 1
            st.sp = a.sp
            st.steps_done += a.steps
            st.state = RequestState.RUNNING
        duration = move + work
    elif a.stage is Stage.ENCODE:
        duration = cost.stage_time("encode", lead.spec, [st.request.shape for st in members])
        for st in members:
            st.encoded, st.state = True, RequestState.RUNNING
    else:
        duration = cost.stage_time("decode", lead.spec, [st.request.shape for st in members])
        duration += max(handoff_time(cluster, cost, st, Stage.DECODE, a.gpus) for st in members)
        for st in members:
            st.state = RequestState.DECODING
    for st in members:
        st.latent_gpus = a.gpus
    end = now + duration
    for g in a.gpus:
        gpu_free_at[g] = end
    return Segment(a.request_ids, a.stage, a.gpus, a.steps, now, end)


def end_segment(seg: Segment, statuses: dict[str, RequestStatus]
                ) -> tuple[list[RequestStatus], list[RequestStatus]]:
    """Apply the end of ``seg`` at ``seg.end``: (requests finished, requests paused at a step boundary)."""
    finished: list[RequestStatus] = []
    paused: list[RequestStatus] = []
    for rid in seg.request_ids:
        st = statuses[rid]
        if seg.stage is Stage.DECODE:
            st.state, st.finish = RequestState.DONE, seg.end
            finished.append(st)
        else:
            st.state = RequestState.PAUSED
            if seg.stage is Stage.DIFFUSE and st.remaining_steps > 0:
                paused.append(st)
    return finished, paused


def count_preemptions(just_paused: Iterable[RequestStatus], assignments: Iterable[Assignment]) -> int:
    """Charge a preemption to each request paused at this instant that the plan does not continue."""
    continued = {rid for a in assignments if a.stage is Stage.DIFFUSE for rid in a.request_ids}
    n = 0
    for st in just_paused:
        if st.id not in continued:
            st.preemptions += 1
            n += 1
    return n


def next_wake(plan: RoundPlan, now: float, live: Iterable[RequestStatus], round_s: float) -> float | None:
    """When to plan again if nothing else happens: the plan's ``wake_at``, else one round while work waits."""
    if plan.wake_at is not None and plan.wake_at > now + EPS:
        return plan.wake_at
    if any(not st.in_flight for st in live):
        return now + round_s
    return None
