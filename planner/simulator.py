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
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from models.cost import CostModel
from planner.checker import check_plan
from planner.cluster import Cluster
from planner.plan import Assignment, RoundPlan
from planner.policies.base import Policy
from planner.problem import build_problem
from planner.request import Request, RequestState, RequestStatus, Stage
from planner.state import PlannerState

EPS = 1e-9
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


@dataclass(frozen=True)
class Segment:
    """One executed piece of work (DESIGN 3.3 timeline)."""

    request_ids: tuple[str, ...]
    stage: Stage
    gpus: tuple[int, ...]
    steps: int
    start: float
    end: float

    @property
    def sp(self) -> int:
        return len(self.gpus)


@dataclass
class SimResult:
    policy: str
    requests: list[RequestStatus]  # every request, trace order
    segments: list[Segment]
    solver_ms: list[float]  # wall time of each plan() call
    fallbacks: int
    plans: int
    end_time: float
    round_problems: list = field(default_factory=list)  # RoundProblem per plan, if recorded


_ARRIVAL, _COMPLETE, _WAKE = 0, 1, 2


class Simulator:
    def __init__(self, cluster: Cluster, cost: CostModel, policy: Policy,
                 config: SimConfig = SimConfig(),
                 on_plan: Callable[[PlannerState, RoundPlan], None] | None = None) -> None:
        self.cluster, self.cost, self.policy, self.config = cluster, cost, policy, config
        self.on_plan = on_plan

    def run(self, requests: Sequence[Request],
            progress: Callable[[int, int], None] | None = None) -> SimResult:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        statuses = {r.id: RequestStatus(r) for r in requests}
        order = [statuses[r.id] for r in requests]
        served = tuple(sorted({r.model for r in requests}))
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
                    seg: Segment = payload
                    for rid in seg.request_ids:
                        st = statuses[rid]
                        if seg.stage is Stage.DECODE:
                            st.state, st.finish = RequestState.DONE, seg.end
                            del live[rid]
                            done += 1
                        else:
                            st.state = RequestState.PAUSED
                            if seg.stage is Stage.DIFFUSE and st.remaining_steps > 0:
                                just_paused.append(st)
                else:
                    wake_pending.discard(payload)
            if progress is not None:
                progress(done, len(order))
            if not live or all(t > now + EPS for t in gpu_free_at):
                continue  # nothing to plan for, or no GPU to give
            state = PlannerState(now, self.cluster, self.cost, list(live.values()), gpu_free_at,
                                 served, cfg.round_s, frozenset(st.id for st in just_paused))
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
            assigned_diffuse = set()
            for a in plan.assignments:
                seg = self._start(a, now, statuses, gpu_free_at, rng)
                segments.append(seg)
                push(seg.end, _COMPLETE, seg)
                if a.stage is Stage.DIFFUSE:
                    assigned_diffuse.update(a.request_ids)
            for st in just_paused:
                if st.id not in assigned_diffuse:
                    st.preemptions += 1
            # Stop if the policy keeps refusing work on an idle cluster with
            # nothing left to arrive: nothing can ever change.
            in_flight = any(st.in_flight for st in live.values())
            if plan.assignments or in_flight or arrivals_left:
                idle_plans = 0
            else:
                idle_plans += 1
                if idle_plans > MAX_IDLE_PLANS:
                    break
            # Re-plan on a timer while work waits and no sooner event will.
            if plan.wake_at is not None and plan.wake_at > now + EPS:
                wake = plan.wake_at
            elif any(not st.in_flight for st in live.values()):
                wake = now + cfg.round_s
            else:
                wake = None
            if wake is not None and wake not in wake_pending and (not events or events[0][0] > wake + EPS):
                wake_pending.add(wake)
                push(wake, _WAKE, wake)
        for st in order:
            if st.live:  # unfinished when the run ended: a miss
                st.state = RequestState.FAILED
        return SimResult(self.policy.name, order, segments, solver_ms, fallbacks, plans, now, round_problems)

    def _start(self, a: Assignment, now: float, statuses: dict[str, RequestStatus],
               gpu_free_at: list[float], rng: np.random.Generator) -> Segment:
        members = [statuses[rid] for rid in a.request_ids]
        lead = members[0].request
        batch = len(members)
        if a.stage is Stage.DIFFUSE:
            bw = self.cluster.block_bandwidth(a.gpus) if a.sp > 1 else None
            step = self.cost.step_time(lead.spec, lead.shape, a.sp, batch, link_bw=bw)
            if self.config.noise > 0:
                work = float(np.sum(step * rng.lognormal(0.0, self.config.noise, a.steps)))
            else:
                work = step * a.steps
            move = 0.0
            for st in members:
                if st.steps_done > 0 and st.latent_gpus and set(st.latent_gpus) != set(a.gpus):
                    bwm = self.cluster.transfer_bandwidth(st.latent_gpus, a.gpus)
                    move = max(move, self.cost.transfer_time(lead.spec.latent_bytes(lead.shape), bwm))
                    st.migrations += 1
                if st.sp and st.sp != a.sp:
                    st.sp_changes += 1
                st.sp = a.sp
                st.steps_done += a.steps
                st.state = RequestState.RUNNING
            duration = move + work
        elif a.stage is Stage.ENCODE:
            duration = self.cost.encode_time(lead.spec, lead.shape, batch)
            for st in members:
                st.encoded, st.state = True, RequestState.RUNNING
        else:
            duration = self.cost.decode_time(lead.spec, lead.shape, batch)
            for st in members:
                st.state = RequestState.DECODING
        for st in members:
            st.latent_gpus = a.gpus
        end = now + duration
        for g in a.gpus:
            gpu_free_at[g] = end
        return Segment(a.request_ids, a.stage, a.gpus, a.steps, now, end)
