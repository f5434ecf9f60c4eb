"""Round-based earliest deadline first.

Each plan walks the waiting requests by deadline. Encode and decode are
one-GPU tasks. Diffuse gets the smallest SP degree that keeps the request on
track (it could still finish by its deadline running all its remaining steps
at that degree), for about one round of steps, on a block that keeps its
latent where it is. Requests that are already late run afterwards at k = 1,
best effort, on whatever is left. A request whose block does not fit waits;
it never blocks the ones behind it.
"""
from __future__ import annotations

from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import Policy, register
from ditplan.planner.policies.kit.blocks import BlockAllocator
from ditplan.planner.policies.kit.rounds import (deadline_order, diffuse_assignment, home, on_track_degrees,
                                                 take_best_effort, take_stage_gpu)
from ditplan.planner.policies.kit.timing import TimingTable
from ditplan.planner.request import RequestStatus, Stage
from ditplan.planner.state import PlannerState


@register("edf")
class EdfPolicy(Policy):
    """Earliest deadline first, smallest on-track SP degree, one round of steps at a time."""

    name = "edf"

    def __init__(self) -> None:
        self._times = TimingTable()

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
