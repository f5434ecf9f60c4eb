"""Dispatch: a round plan becomes flights on the fleet and one ``PlanDelta`` per executor.

The policy planned on a snapshot; by the time its plan comes back, reports
may have ended or requeued work and executors may be gone, so every
assignment is re-validated against the live state (``startable``) and a
stale one is dropped, not sent. Weight changes apply only on GPUs still
owned and idle. A request whose diffuse segment just ended and that the
plan does not continue is paused where its latent is (the simulator's
``count_preemptions`` rule, docs/architecture.md).

Not thread-safe: the core calls it under its lock.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.execution import diffuse_costs, start_segment
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.request import Stage
from ditplan.planner.service.book import Flight, RequestBook, Tracked
from ditplan.planner.service.fleet import Fleet
from ditplan.planner.service.messages import AssignmentMsg, LoadMsg, MigrationMsg, PauseMsg, PlanDelta, RequestData
from ditplan.planner.service.stats import Stats

log = logging.getLogger(__name__)


@dataclass
class Dispatched:
    deltas: dict[str, PlanDelta]  # per executor id; the empty ones are not sent
    started: list[Assignment]


def dispatch(plan: RoundPlan, just_paused: list[Tracked], now: float, epoch: int, book: RequestBook, fleet: Fleet,
             cluster: Cluster, cost: CostModel, stats: Stats) -> Dispatched:
    """Start ``plan``'s still-valid assignments as flights of ``epoch``; pause the just-ended
    requests it does not continue. The caller pushes the deltas and moves the epoch."""
    deltas: dict[str, PlanDelta] = defaultdict(lambda: PlanDelta(epoch, now))
    _weight_changes(plan, now, fleet, deltas, stats)
    started: list[Assignment] = []
    for a in plan.assignments:
        if not startable(a, now, book, fleet):
            log.debug("dropping stale assignment %s", a)
            continue
        _start(a, now, epoch, book, fleet, cluster, cost, deltas)
        started.append(a)
    continued = {rid for a in started if a.stage is Stage.DIFFUSE for rid in a.request_ids}
    for t in just_paused:
        if t.id not in continued and t.status.latent_gpus:
            for eid in fleet.owners_of(t.status.latent_gpus):
                deltas[eid].pauses.append(PauseMsg(t.id, tuple(t.status.latent_gpus)))
    return Dispatched(deltas, started)


def startable(a: Assignment, now: float, book: RequestBook, fleet: Fleet) -> bool:
    for rid in a.request_ids:
        t = book.live.get(rid)
        if t is None or t.flight is not None or t.status.in_flight or t.status.next_stage is not a.stage:
            return False
        if a.stage is Stage.DIFFUSE and not 1 <= a.steps <= t.status.remaining_steps:
            return False
        if fleet.placement is not None and not fleet.placement.runs(a.gpus, t.status.request.model, a.stage):
            return False
    return all(fleet.idle(g, now) for g in a.gpus)


def _start(a: Assignment, now: float, epoch: int, book: RequestBook, fleet: Fleet, cluster: Cluster,
           cost: CostModel, deltas: dict[str, PlanDelta]) -> None:
    members = [book.live[rid] for rid in a.request_ids]
    statuses = {t.id: t.status for t in members}
    move = step = 0.0
    if a.stage is Stage.DIFFUSE:
        move, step = diffuse_costs(cluster, cost, a, [t.status for t in members])
    moves = [(t.id, t.status.latent_gpus) for t in members
             if a.stage is Stage.DIFFUSE and t.status.steps_done > 0 and t.status.latent_gpus
             and set(t.status.latent_gpus) != set(a.gpus)]
    start_step = members[0].status.steps_done
    seg = start_segment(cluster, cost, a, now, statuses, fleet.free_at)
    owners = fleet.owners_of(a.gpus)
    lead = fleet.owner[a.gpus[0]]
    flight = Flight(epoch, a, seg, frozenset(owners), lead)
    for t in members:
        t.flight, t.snap = flight, None
        book.mark_started(t)
    fleet.occupy(flight)
    for eid in sorted(owners):
        d, sess = deltas[eid], fleet.sessions[eid]
        for t in members:
            if t.id not in sess.known:
                sess.known.add(t.id)
                r = t.status.request
                d.requests.append(RequestData.from_request(r, t.reported_steps, t.reported_encoded))
        d.assignments.append(AssignmentMsg(a.request_ids, a.stage, a.gpus, a.steps, start_step,
                                           seg.end - seg.start, step, move, eid == lead))
    for rid, src in moves:
        msg = MigrationMsg(rid, tuple(src), a.gpus)
        for eid in sorted(fleet.owners_of(src) | owners):
            deltas[eid].migrations.append(msg)


def _weight_changes(plan: RoundPlan, now: float, fleet: Fleet, deltas: dict[str, PlanDelta], stats: Stats) -> None:
    """The plan's unloads (at once) and loads (their GPU busy until reported), on GPUs still owned
    and idle; each goes to the GPU's executor."""
    if not (plan.unloads or plan.loads):
        return
    if fleet.placement is None:
        log.warning("plan changes placement but the service has none (no --models): ignored")
        return
    idle = {g for g in {w.gpu for w in (*plan.unloads, *plan.loads)}
            if fleet.owner[g] is not None and fleet.busy[g] is None and g not in fleet.loading}
    holds = fleet.placement.holds
    unloads = [w for w in plan.unloads if w.gpu in idle and holds(w.gpu, w.model, w.component)]
    loads = [w for w in plan.loads if w.gpu in idle and not holds(w.gpu, w.model, w.component)]
    fleet.placement = fleet.placement.apply(unloads, loads)
    for w in unloads:
        deltas[fleet.owner[w.gpu]].unloads.append(w)
    for w in loads:
        secs = fleet.start_load(w, now)
        deltas[fleet.owner[w.gpu]].loads.append(LoadMsg(w, secs))
        stats.weight_loads += 1
        stats.weight_load_s += secs
