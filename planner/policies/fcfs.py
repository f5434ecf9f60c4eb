"""Static-degree baselines: xDiT-style fixed SP (``fcfs-spK``) and TetriServe's RSSP.

Both serve first come, first served with head-of-line blocking, the way a
fixed-degree serving deployment does: a request takes an aligned block when
it starts and keeps it for its whole life (encode, all diffuse steps in one
go, decode), and when the request at the head of the queue finds no free
block, nothing behind it starts either. They differ only in the degree a
request gets: ``fcfs-spK`` uses min(K, the model's max), ``rssp`` the
smallest degree whose standalone latency fits the request's SLO.
"""
from __future__ import annotations

from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import Policy, register
from ditplan.planner.policies.kit.blocks import BlockAllocator
from ditplan.planner.policies.kit.timing import Timing, TimingTable
from ditplan.planner.request import RequestStatus, Stage
from ditplan.planner.state import PlannerState


class FcfsPolicy(Policy):
    """First come, first served; each request holds one block of a static degree."""

    name = "fcfs"
    degree = 1

    def __init__(self) -> None:
        self._times = TimingTable()

    def degree_for(self, state: PlannerState, status: RequestStatus, times: Timing) -> int:
        return max(k for k in times.degrees if k <= self.degree)

    def plan(self, state: PlannerState) -> RoundPlan:
        table = self._times.bind(state)
        alloc = BlockAllocator(state)
        out: list[Assignment] = []
        fresh: list[RequestStatus] = []
        # Started requests first: each runs its next stage on the block it holds.
        for st in state.waiting():
            if not st.latent_gpus:
                fresh.append(st)
                continue
            a = self._continue(state, alloc, st, table.of(st))
            if a is not None:
                out.append(a)
        # New requests in arrival order; the first that does not fit blocks the rest.
        for st in fresh:
            t = table.of(st)
            k = self.degree_for(state, st, t)
            blk = alloc.take(k, (), t.act[k])
            if blk is None:
                break
            out.append(Assignment((st.id,), Stage.ENCODE, blk))
        return RoundPlan(tuple(out), solver=self.name)

    @staticmethod
    def _continue(state: PlannerState, alloc: BlockAllocator, st: RequestStatus,
                  t: Timing) -> Assignment | None:
        stage = st.next_stage
        k = len(st.latent_gpus)
        if stage is Stage.DIFFUSE and k not in t.degrees:
            k = max(t.degrees)
        need = t.act[k] if stage is Stage.DIFFUSE else 0
        blk = alloc.take(k, st.latent_gpus, need)
        if blk is None:
            return None
        steps = st.remaining_steps if stage is Stage.DIFFUSE else 0
        return Assignment((st.id,), stage, blk, steps)


@register("fcfs-sp1")
class FcfsSp1(FcfsPolicy):
    name, degree = "fcfs-sp1", 1


@register("fcfs-sp2")
class FcfsSp2(FcfsPolicy):
    name, degree = "fcfs-sp2", 2


@register("fcfs-sp4")
class FcfsSp4(FcfsPolicy):
    name, degree = "fcfs-sp4", 4


@register("fcfs-sp8")
class FcfsSp8(FcfsPolicy):
    name, degree = "fcfs-sp8", 8


def rssp_degree(times: Timing, steps: int, slo_s: float) -> int:
    """Smallest degree whose standalone latency fits ``slo_s``, else the fastest one.

    Standalone latency = encode + steps x step time(k) + decode, on an empty
    cluster (TetriServe's static Resolution-Specific SP).
    """
    fixed = times.encode + times.decode
    for k in times.degrees:
        if fixed + steps * times.step[k] <= slo_s:
            return k
    return min(times.degrees, key=lambda k: (times.step[k], k))


@register("rssp")
class RsspPolicy(FcfsPolicy):
    """FCFS where each request's degree is fixed by its resolution and SLO."""

    name = "rssp"
    degree = 8

    def degree_for(self, state: PlannerState, status: RequestStatus, times: Timing) -> int:
        req = status.request
        return rssp_degree(times, req.steps, req.deadline - req.arrival)

