"""Discrete-event simulator: executes RoundPlans against the cost model.

Events are arrivals, completions of assignments (step boundaries) and a
round timer. All events at one instant are applied, then the policy plans
once. Each assignment runs to completion: a request is paused simply by not
being given more work, its latent stays on its GPUs (and counts there), and a
later diffuse assignment on other GPUs first pays the latent's transfer.

Deterministic for a seed: event ties break by insertion order and step-time
noise comes from one seeded generator.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ditplan.models.cost import CostModel
from ditplan.planner.checker import check_plan
from ditplan.planner.cluster import Cluster
from ditplan.planner.placement import Placement, load_seconds, static_placement, validate_placement
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import Policy
from ditplan.planner.problem import build_problem
from ditplan.planner.execution import EPS, Segment, count_preemptions, end_segment, next_wake, start_segment
from ditplan.planner.request import Request, RequestState, RequestStatus
from ditplan.planner.sim_result import SimResult, WeightEvent
from ditplan.planner.state import PlannerState

MAX_IDLE_PLANS = 3


class PlanViolation(RuntimeError):
    """A policy produced a plan the checker rejects."""


@dataclass(frozen=True)
class SimConfig:
    round_s: float = 2.0  # re-plan timer while work waits; policies size rounds by it
    noise: float = 0.0  # sigma of lognormal step-time noise
    seed: int = 0
    horizon_s: float | None = None  # stop here; unfinished requests count as misses
    check_plans: bool = True  # run the independent checker on every plan
    record_problems: bool = False  # keep every round's RoundProblem (for solver benchmarks)
    # The starting placement: a static_placement spec (planner.placement), or the Placement itself.
    placement: str | Placement = "auto"


_ARRIVAL, _COMPLETE, _WAKE, _LOADED = 0, 1, 2, 3


class Simulator:
    def __init__(self, cluster: Cluster, cost: CostModel, policy: Policy,
                 config: SimConfig = SimConfig(),
                 on_plan: Callable[[PlannerState, RoundPlan], None] | None = None) -> None:
        self.cluster, self.cost, self.policy, self.config = cluster, cost, policy, config
        self.on_plan = on_plan

    def run(self, requests: Sequence[Request],
            progress: Callable[[int, int], None] | None = None) -> SimResult:
        cfg = self.config
        self.policy.reset()
        rng = np.random.default_rng(cfg.seed)
        statuses = {r.id: RequestStatus(r) for r in requests}
        order = [statuses[r.id] for r in requests]
        placement = cfg.placement if isinstance(cfg.placement, Placement) else static_placement(
            self.cluster, requests, self.cost, cfg.placement, split=getattr(self.policy, "split_placement", "split"))
        validate_placement(placement, self.cluster)
        initial = placement
        weight_events: list[WeightEvent] = []
        gpu_free_at = [0.0] * self.cluster.size
        live: dict[str, RequestStatus] = {}
        segments: list[Segment] = []
        round_problems: list = []
        solver_ms: list[float] = []
        fallbacks = plans = done = 0
        events: list[tuple[float, int, int, object]] = []
        seq = 0

        def push(t: float, kind: int, payload: object) -> None:
            nonlocal seq
            heapq.heappush(events, (t, seq, kind, payload))
            seq += 1

        for r in sorted(requests, key=lambda r: r.arrival):
            push(r.arrival, _ARRIVAL, r.id)
        wake_pending: set[float] = set()
        arrivals_left = len(requests)
        idle_plans = 0
        now = 0.0
        while events:
            now = events[0][0]
            if cfg.horizon_s is not None and now > cfg.horizon_s:
                now = cfg.horizon_s
                break
            just_paused: list[RequestStatus] = []
            while events and events[0][0] <= now + EPS:
                _, _, kind, payload = heapq.heappop(events)
                if kind == _ARRIVAL:
                    live[payload] = statuses[payload]
                    arrivals_left -= 1
                elif kind == _COMPLETE:
                    finished, paused = end_segment(payload, statuses)
                    for st in finished:
                        del live[st.id]
                    done += len(finished)
                    just_paused.extend(paused)
                elif kind == _WAKE:
                    wake_pending.discard(payload)  # (_LOADED: a GPU's weights are in; just plan)
            if progress is not None:
                progress(done, len(order))
            if not live or all(t > now + EPS for t in gpu_free_at):
                continue  # nothing to plan for, or no GPU to give
            state = PlannerState(now, self.cluster, self.cost, list(live.values()), gpu_free_at,
                                 placement, cfg.round_s, frozenset(st.id for st in just_paused))
            t0 = time.perf_counter()
            plan = self.policy.plan(state)
            solver_ms.append((time.perf_counter() - t0) * 1e3)
            plans += 1
            fallbacks += int(plan.fallback)
            if self.on_plan is not None:
                self.on_plan(state, plan)
            if cfg.record_problems:
                round_problems.append(build_problem(state))
            if cfg.check_plans:
                problems = check_plan(state, plan)
                if problems:
                    raise PlanViolation(f"policy {self.policy.name!r} at t={now:.3f}s: " + "; ".join(problems))
            for rid, reason in plan.rejections:
                st = live.pop(rid)
                st.state, st.rejected = RequestState.FAILED, reason
                done += 1
            placement = apply_weight_changes(self.cluster, placement, plan, now, gpu_free_at, weight_events)
            for g in {w.gpu for w in plan.loads}:
                push(gpu_free_at[g], _LOADED, g)
            for a in plan.assignments:
                seg = self._start(a, now, statuses, gpu_free_at, rng)
                segments.append(seg)
                push(seg.end, _COMPLETE, seg)
            count_preemptions(just_paused, plan.assignments)
            # Stop if the policy keeps refusing work on an idle cluster with
            # nothing left to arrive: nothing can ever change.
            in_flight = any(st.in_flight for st in live.values())
            if plan.assignments or in_flight or arrivals_left or any(t > now + EPS for t in gpu_free_at):
                idle_plans = 0
            else:
                idle_plans += 1
                if idle_plans > MAX_IDLE_PLANS:
                    break
            # Re-plan on a timer while work waits and no sooner event will.
            wake = next_wake(plan, now, live.values(), cfg.round_s)
            if wake is not None and wake not in wake_pending and (not events or events[0][0] > wake + EPS):
                wake_pending.add(wake)
                push(wake, _WAKE, wake)
        for st in order:
            if st.live:  # unfinished when the run ended: a miss
                st.state = RequestState.FAILED
        return SimResult(self.policy.name, order, segments, solver_ms, fallbacks, plans, now, round_problems,
                         initial, weight_events, placement)

    def _start(self, a: Assignment, now: float, statuses: dict[str, RequestStatus],
               gpu_free_at: list[float], rng: np.random.Generator) -> Segment:
        return start_segment(self.cluster, self.cost, a, now, statuses, gpu_free_at, rng, self.config.noise)


# --- execution semantics shared with the planning service (planner/service) ---

def apply_weight_changes(cluster: Cluster, placement: Placement, plan: RoundPlan, now: float,
                         gpu_free_at: list[float], events: list[WeightEvent] | None = None) -> Placement:
    """Apply a plan's unloads (at once) and loads (one after another per GPU, which is busy meanwhile)."""
    if not plan.unloads and not plan.loads:
        return placement
    for w in plan.unloads:
        if events is not None:
            events.append(WeightEvent("unload", w.gpu, w.model, w.component, now, now))
    for w in plan.loads:
        start = max(now, gpu_free_at[w.gpu])
        gpu_free_at[w.gpu] = start + load_seconds(cluster, w.model, w.component)
        if events is not None:
            events.append(WeightEvent("load", w.gpu, w.model, w.component, start, gpu_free_at[w.gpu]))
    return placement.apply(plan.unloads, plan.loads)


