"""A schedule of model 1 as a simulation result, counted by the simulator's execution rules.

Each segment starts at the tick the schedule gives it and lasts what the
simulator's rules make it last (``start_segment``, hand-offs included); it
fits inside the window the schedule reserved (``planner/offline/schedule.py``),
so the simulator running the same segments finishes every request at the
same time. Each request's state and its migration, SP-change and preemption
counters come from the same rules (``start_segment``, ``end_segment`` and
``count_preemptions`` in ``planner/execution.py``), so the offline bound and
every policy count them alike. Requests the schedule drops are appended
at the end, each on the block that finishes it first (best effort: they count
as misses unless one happens to make its deadline, which only raises
attainment).
"""
from __future__ import annotations

from typing import Sequence

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.execution import EPS, Segment, count_preemptions, end_segment, start_segment
from ditplan.planner.offline.fit import served_weight_bytes
from ditplan.planner.offline.schedule import Plan, block_choices, contiguous, dec_ticks, plan_spans, run_ticks
from ditplan.planner.plan import Assignment
from ditplan.planner.request import Request, RequestState, RequestStatus, Stage
from ditplan.planner.sim_result import SimResult
from ditplan.planner.ticks import TICK_S, ticks_up


def to_sim_result(requests: Sequence[Request], cluster: Cluster, cost: CostModel, plans: dict[int, Plan],
                  policy: str, solver_ms: float = 0.0) -> SimResult:
    """``plans`` ({request index: plan}) as the result of a run named ``policy``; requests without a plan
    run afterwards, best effort."""
    statuses = {r.id: RequestStatus(r) for r in requests}
    segments: list[Segment] = []
    tail = [0] * cluster.size  # tick after the last reserved window on each GPU
    free_at = [0.0] * cluster.size  # start_segment's GPU bookkeeping, unused: the schedule fixes the starts

    def place(r: Request, plan: Plan) -> None:
        work = [(Assignment((r.id,), Stage.ENCODE, (plan.enc_gpu,)), plan.enc_start),
                *((Assignment((r.id,), Stage.DIFFUSE, pc.choice.block, pc.steps), pc.start) for pc in plan.pieces),
                (Assignment((r.id,), Stage.DECODE, (plan.dec_gpu,)), plan.dec_start)]
        for n, (a, tick) in enumerate(work):
            seg = start_segment(cluster, cost, a, tick * TICK_S, statuses, free_at)
            _, paused = end_segment(seg, statuses)
            nxt = work[n + 1] if n + 1 < len(work) else None
            count_preemptions(paused, [nxt[0]] if nxt is not None and nxt[1] * TICK_S <= seg.end + EPS else [])
            segments.append(seg)
        for g, _, end in plan_spans(r, plan):
            tail[g] = max(tail[g], end)

    for i, plan in sorted(plans.items()):
        place(requests[i], plan)
    weights = served_weight_bytes(requests, cluster)
    for i in sorted(set(range(len(requests))) - set(plans), key=lambda i: (requests[i].arrival, i)):
        r, best = requests[i], None
        for o in block_choices(r, cluster, cost, weights):
            e = ticks_up(o.enc)
            s = max([ticks_up(r.arrival), tail[o.block[0]]] + [tail[g] - e for g in o.block[1:]])
            key = (s + e + run_ticks(o, r.steps) + dec_ticks(o), o.gpu_seconds)
            if best is None or key < best[0]:
                best = (key, o, s)
        if best is None:  # fits no block: it can never run
            statuses[r.id].state = RequestState.FAILED
        else:
            place(r, contiguous(r, best[1], best[2]))
    segments.sort(key=lambda g: (g.start, g.gpus))
    return SimResult(policy, [statuses[r.id] for r in requests], segments, [solver_ms], 0, 1,
                     max((g.end for g in segments), default=0.0))
