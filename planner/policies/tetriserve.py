"""TetriServe's round-based scheduler (arXiv 2510.01565): a group-knapsack DP over GPUs.

Each round every waiting diffuse request offers options (SP degree k, steps
q filling about one round at k). An option is worth 1 if the request can
still meet its deadline after it, assuming it runs the rest at its fastest
degree; "skip this round" costs no GPU and is worth 1 if the request is still
on track after waiting a round. A DP over the idle-GPU count picks at most
one option per request to maximise the number of on-track requests, using
the fewest GPUs among the best. Then, beyond the DP:

* chosen degrees are placed on aligned blocks largest first, near each
  request's latent; what does not fit is downsized or dropped;
* requests with no on-time option get best effort at k = 1 (EDF order);
* work conservation: leftover GPUs start skipped requests early and double
  the degree of this round's diffuse assignments where the aligned parent
  block is free and the doubling keeps parallel efficiency >= 0.8
  (``Timing.doubling_pays``; elastic scale-up).
"""
from __future__ import annotations

from dataclasses import dataclass

from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import Policy, register
from ditplan.planner.policies.kit.blocks import BlockAllocator
from ditplan.planner.policies.kit.knapsack import KnapsackChoice, KnapsackStats, solve_group_knapsack
from ditplan.planner.policies.kit.rounds import (deadline_order, diffuse_assignment, home, migration_estimate,
                                                 on_track_degrees, round_steps, take_best_effort, take_stage_gpu)
from ditplan.planner.policies.kit.timing import Timing, TimingTable
from ditplan.planner.request import RequestStatus, Stage
from ditplan.planner.state import PlannerState


@dataclass(slots=True)
class _Placed:
    status: RequestStatus
    times: Timing
    gpus: tuple[int, ...]
    late: bool


def on_time_degrees(state: PlannerState, st: RequestStatus, t: Timing, budget: float,
                    max_k: int, max_headroom: int, sustained: bool = True) -> list[int]:
    """Degrees k whose one-round option keeps ``st`` on time (ascending).

    With ``sustained`` (the default) a degree counts only if running every
    remaining step at k meets ``budget`` (deadline - now - decode): under load
    the fastest degree is rarely free later, so assuming it for the rest of
    the request lets requests drift late. Otherwise the optimistic bound
    migration + q x T(k) + (remaining - q) x fastest step time is used.
    """
    rem, tmin, round_s = st.remaining_steps, t.tmin, state.round_s
    out = []
    for k in t.degrees:
        if k > max_k or t.act[k] > max_headroom:
            continue
        tk = t.step[k]
        if sustained:
            need = migration_estimate(state, st, k) + rem * tk
        else:
            q = round_steps(round_s, rem, tk)
            need = migration_estimate(state, st, k) + q * tk + (rem - q) * tmin
        if need <= budget:
            out.append(k)
    return out


@register("tetriserve-dp")
class TetriServePolicy(Policy):
    """TetriServe's per-round group-knapsack DP plus placement and work conservation."""

    name = "tetriserve-dp"

    def __init__(self) -> None:
        self._times = TimingTable()

    def plan(self, state: PlannerState) -> RoundPlan:
        table = self._times.bind(state)
        alloc = BlockAllocator(state)
        out: list[Assignment] = []
        diffuse: list[RequestStatus] = []
        # 1. Encode and decode: one GPU each, by deadline.
        for st in sorted(state.waiting(), key=deadline_order):
            stage = st.next_stage
            if stage is Stage.DIFFUSE:
                diffuse.append(st)
            elif alloc.free_count():
                blk = take_stage_gpu(alloc, st, stage)
                if blk is not None:
                    out.append(Assignment((st.id,), stage, blk))
        if not diffuse or alloc.free_count() == 0:
            return RoundPlan(tuple(out), solver=self.name)

        # 2. Options. Dominance keeps the DP small and exact: a request whose
        # skip option is worth 1 (cost 0) always skips; value-0 options never
        # beat choosing nothing; so only urgent requests' on-time options remain.
        now, round_s = state.now, state.round_s
        max_k = alloc.largest_free_block()
        max_headroom = max(alloc.headroom((g,)) for g in alloc.free_gpus())
        urgent: list[tuple[RequestStatus, Timing, list[int]]] = []
        waitable: list[tuple[RequestStatus, Timing]] = []
        late: list[tuple[RequestStatus, Timing]] = []
        for st in diffuse:
            t = table.of(st)
            rem = st.remaining_steps
            budget = st.request.deadline - now - t.decode
            if rem * t.tmin > budget:
                late.append((st, t))
            elif round_s + rem * t.step[min(t.degrees)] <= budget:
                waitable.append((st, t))  # even one GPU after a round's wait is in time
            else:
                ks = (on_time_degrees(state, st, t, budget, max_k, max_headroom)
                      or on_time_degrees(state, st, t, budget, max_k, max_headroom, sustained=False))
                if ks:
                    urgent.append((st, t, ks))
                else:
                    late.append((st, t))
        groups = [[KnapsackChoice(k, 1, k) for k in ks] for _, _, ks in urgent]
        choice, value, _ = solve_group_knapsack(groups, alloc.free_count())

        # 3. Place the DP's choices, largest degree first, near the latent.
        # Requests whose latent block is exactly their chosen size go first: they stay put.
        placed: list[_Placed] = []
        leftover: list[tuple[RequestStatus, Timing, list[int] | None]] = []
        chosen_k = {i: groups[i][j].k for i, j in enumerate(choice) if j is not None}
        order = sorted(chosen_k, key=lambda i: (
            not (len(home(urgent[i][0])) == chosen_k[i] and alloc.is_free(home(urgent[i][0]))),
            -chosen_k[i]))
        for i in order:
            st, t, ks = urgent[i]
            blk = None
            for k in reversed(ks):  # downsize to a smaller on-time degree if it does not fit
                if k <= chosen_k[i]:
                    blk = alloc.take(k, home(st), t.act[k])
                    if blk is not None:
                        break
            if blk is None:
                leftover.append((st, t, ks))
            else:
                placed.append(_Placed(st, t, blk, False))
        leftover.extend((st, t, ks) for i, (st, t, ks) in enumerate(urgent) if choice[i] is None)

        # 4. Work conservation: start skipped and dropped requests early, EDF.
        # A skipped request gets the smallest degree that finishes it in time
        # at that degree (its GPU-hour-efficient degree), else the smallest
        # on-time option.
        leftover.extend((st, t, None) for st, t in waitable)
        leftover.sort(key=lambda x: deadline_order(x[0]))
        for st, t, ks in leftover:
            if alloc.free_count() == 0:
                break
            is_urgent = ks is not None
            if ks is None:
                budget = st.request.deadline - now - t.decode
                ks = (on_track_degrees(state, st, t, budget, max_k)
                      or on_time_degrees(state, st, t, budget, max_k, max_headroom))
            blk = self._take_on_time(alloc, st, t, ks)
            if blk is not None:
                placed.append(_Placed(st, t, blk, False))
            elif is_urgent:
                late.append((st, t))

        # 5. Best effort for late requests: k = 1 on what is left, EDF.
        late.sort(key=lambda x: deadline_order(x[0]))
        for st, t in late:
            if alloc.free_count() == 0:
                break
            blk = take_best_effort(alloc, t, st)
            if blk is not None:
                placed.append(_Placed(st, t, blk, True))

        # 6. Elastic scale-up: double degrees into free buddy halves while it helps.
        if alloc.free_count() and placed:
            self._scale_up(alloc, placed)

        out.extend(diffuse_assignment(state, p.status, p.gpus) for p in placed)
        return RoundPlan(tuple(out), solver=self.name,
                         stats=KnapsackStats(dp_groups=len(groups), dp_value=value))

    @staticmethod
    def _take_on_time(alloc: BlockAllocator, st: RequestStatus, t: Timing,
                      ks: list[int]) -> tuple[int, ...] | None:
        """Keep the current block if it is on time and free, else the smallest on-time block."""
        lat = home(st)
        if lat and len(lat) in ks and alloc.is_free(lat):
            blk = alloc.take(len(lat), lat, t.act[len(lat)])
            if blk is not None:
                return blk
        for k in ks:
            blk = alloc.take(k, lat, t.act[k])
            if blk is not None:
                return blk
        return None

    @staticmethod
    def _scale_up(alloc: BlockAllocator, placed: list[_Placed]) -> None:
        """Passes in priority order (on-track first, then late; EDF), one doubling each."""
        ranked = sorted(placed, key=lambda p: (p.late, deadline_order(p.status)))
        grown = True
        while grown and alloc.free_count():
            grown = False
            for p in ranked:
                k, t = len(p.gpus), p.times
                if not t.doubling_pays(k):
                    continue  # a less efficient doubling holds GPUs that arriving requests need more
                parent = alloc.grow(p.gpus, t.act[2 * k])
                if parent is not None:
                    p.gpus, grown = parent, True
