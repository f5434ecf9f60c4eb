"""GenServe (arXiv 2604.04335): co-serving text-to-image and text-to-video requests.

Written from GenServe's public description. A *unit* is what one assignment
serves: a video, or a batch of images. Its *on-time degrees* are the SP
degrees k at which it meets its deadline running all its remaining steps at
k (after a latent move, if any); a unit with none is *late*. A video's
*slack* is deadline - now - ``state.remaining_lower_bound``. Each plan:

1. **Decode** first: one GPU next to the latent; requests that diffused
   together decode together.
2. **Dynamic batching**: waiting images with the same ``batch_key()`` and
   the same progress (next stage, steps done), taken in deadline order, join
   the batch before them (up to ``cost.max_batch``) when the bigger batch is
   still on time at a degree no larger than the parts need apart, for no
   more GPU-seconds than apart; late images batch only with late images. A
   unit is worth its member count and has its earliest member's deadline.
3. **Running videos keep GPUs**: a video whose diffuse segment ends now
   (``state.just_paused``) and that can still be on time is reserved a block
   around its latent at its smallest on-time degree (*elastic SP*: up when it
   fell behind, down when it is ahead; a late one drops to best effort).
4. **DP allocation**: TetriServe's group knapsack (``solve_group_knapsack``)
   over the remaining free GPU count; one group per unit that can be on
   time, options its on-time degrees, value its member count (most on-time
   requests, then fewest GPUs, then earliest deadlines).
5. **Slack-based video preemption**: if the DP leaves an image unit out,
   running videos are paused at this step boundary, the one with the MOST
   slack first: blocks are released one video at a time and the DP re-run.
   A pause counts as one lost request when the video's slack is shorter
   than the pause (the longest left-out image's work at its smallest on-time
   degree). The shortest prefix of pauses whose net gain is best (and > 0)
   is kept; the other videos get their blocks back. A paused video keeps
   its latent where it is and waits like any unit, so it resumes later (or
   at once on GPUs the images left over, at whatever degree fits).
6. **Degrees**: the DP's choices; then every other unit that can be on time
   gets its smallest on-time degree that still packs (EDF), or waits for
   one; then late units get the smallest degree that packs, images before
   videos, best effort. Packing is checked by counts of aligned free blocks
   (``packing_fits``, exact for buddy blocks).
7. **Elastic scale-up**: this round's diffuse units double their degree
   while the packing fits and the doubling keeps parallel efficiency >= 0.8
   (on-time units first, EDF); then units are placed largest degree first
   near their latent (or on the buddy best fit when that keeps a larger free
   block whole and the latent move is cheap); running videos then grow in
   place into free buddy halves under the same efficiency rule.

Encode is a one-GPU stage: a unit whose next stage is encode is planned like
a diffuse unit (its degree is the block it will diffuse on); it encodes on
the block's first GPU and the policy holds the rest of the block until the
encode ends, so the diffuse that follows finds its GPUs free. Diffuse
assignments run about one round of steps (``round_steps``), so a video is
preempted only at those step boundaries.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import Policy, register
from ditplan.planner.policies.kit.blocks import BlockAllocator
from ditplan.planner.policies.kit.knapsack import KnapsackChoice, KnapsackStats, solve_group_knapsack
from ditplan.planner.policies.kit.packing import level_capacity, packing_fits
from ditplan.planner.policies.kit.rounds import deadline_order, migration_estimate, round_steps
from ditplan.planner.policies.kit.timing import Timing, TimingTable, batch_limit
from ditplan.planner.request import RequestState, RequestStatus, Stage
from ditplan.planner.state import PlannerState

# A latent move this cheap (seconds) is worth it to keep larger free blocks whole.
CHEAP_MOVE_S = 0.05


# --- units -------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class _Unit:
    members: list[RequestStatus]
    stage: Stage  # ENCODE or DIFFUSE
    times: Timing
    running: bool = False  # a video at its step boundary, holding its block
    ks: tuple[int, ...] = ()  # on-time degrees, ascending (ignoring what is free)
    slack: float = 0.0
    k: int = 0  # chosen degree
    gpus: tuple[int, ...] | None = None
    late: bool = False
    paused: bool = False

    @property
    def lead(self) -> RequestStatus:
        return self.members[0]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.members)

    @property
    def value(self) -> int:
        return len(self.members)

    @property
    def is_video(self) -> bool:
        return self.lead.request.kind == "video"

    @property
    def order(self) -> tuple:
        return deadline_order(self.lead)

    def act(self, k: int) -> int:
        return self.times.act[k]


def _gpu_seconds(u: "_Unit") -> float:
    """GPU-seconds of the unit's remaining steps at its smallest on-time degree."""
    k = u.ks[0]
    return k * u.lead.remaining_steps * u.times.step[k]


def _work_s(u: "_Unit") -> float:
    """Seconds of the unit's remaining encode and diffuse work at its smallest on-time degree."""
    enc = u.times.encode if u.stage is Stage.ENCODE else 0.0
    return enc + u.lead.remaining_steps * u.times.step[u.ks[0]]


def _buckets(state: PlannerState, waiting: list[RequestStatus], stage: Stage) -> list[list[RequestStatus]]:
    """Requests that may share a forward pass, each list in deadline order (videos alone).

    Encode and diffuse: same ``batch_key()`` and same steps done; decode: the
    requests that diffused together (same latent GPUs).
    """
    buckets: dict[tuple, list[RequestStatus]] = {}
    for st in sorted(waiting, key=deadline_order):
        req = st.request
        if req.kind == "video":
            key = ("video", st.id)
        elif stage is Stage.DECODE:
            key = (req.batch_key(), st.latent_gpus)
        else:
            key = (req.batch_key(), st.steps_done)
        buckets.setdefault(key, []).append(st)
    return list(buckets.values())


def _decode_batches(state: PlannerState, waiting: list[RequestStatus]) -> list[list[RequestStatus]]:
    out = []
    for members in _buckets(state, waiting, Stage.DECODE):
        cap = batch_limit(state, members[0])
        out.extend(members[i:i + cap] for i in range(0, len(members), cap))
    out.sort(key=lambda ms: deadline_order(ms[0]))
    return out


# --- the policy --------------------------------------------------------------------
@register("genserve")
class GenServePolicy(Policy):
    """GenServe: dynamic batching, slack-based video preemption, elastic SP, per-round DP."""

    name = "genserve"

    def __init__(self) -> None:
        self._times = TimingTable()
        self.reset()

    def reset(self) -> None:
        self._holds: list[tuple[tuple[str, ...], tuple[int, ...]]] = []  # encoding units' blocks

    def plan(self, state: PlannerState) -> RoundPlan:
        times = self._times.bind(state)
        alloc = BlockAllocator(state)
        self._apply_holds(state, alloc)
        out: list[Assignment] = []
        waiting = state.waiting()

        # 1. Decode: one GPU next to the latent, batches that diffused together.
        for ms in _decode_batches(state, [s for s in waiting if s.next_stage is Stage.DECODE]):
            if not alloc.free_count():
                break
            blk = alloc.take(1, ms[0].latent_gpus[:1])
            if blk is not None:
                out.append(Assignment(tuple(m.id for m in ms), Stage.DECODE, blk))
        if not alloc.free_count():
            return RoundPlan(tuple(out), solver=self.name)

        # 2. Units (dynamic batching); running videos are the ones at a step boundary now.
        units = self._units(state, times, waiting)
        just = getattr(state, "just_paused", frozenset())
        running = [u for u in units if u.is_video and u.stage is Stage.DIFFUSE and u.lead.id in just
                   and u.lead.latent_gpus]
        for u in running:
            u.running = True

        # 3. Running videos that can still meet their deadline keep GPUs around their
        # latent, at their smallest on-time degree (elastic SP: up when they fell
        # behind, down when they are ahead). Late ones are best effort below.
        for u in sorted(running, key=lambda u: (u.slack, u.order)):
            blk = None
            for k in u.ks:
                blk = self._take(state, alloc, u, k, defrag=k != len(u.lead.latent_gpus))
                if blk is not None:
                    break
            if blk is None:
                u.running = False  # it competes like any waiting unit
            else:
                u.gpus, u.k = blk, len(blk)
        running = [u for u in running if u.running]
        fresh = [u for u in units if not u.running]
        wanted = [u for u in fresh if u.ks]

        # 4. DP over every unit that can still be on time (value: member count).
        choice, value = self._dp(alloc, wanted)
        # 5. Images left out: pause running videos, most slack first.
        paused: list[_Unit] = []
        if any(k is None and not u.is_video for u, k in zip(wanted, choice)):
            paused, choice = self._preempt(state, alloc, running, wanted, choice, value)
        running = [u for u in running if u.running]
        fresh.extend(paused)

        # 6. Degrees for fresh units: DP choices, then work conservation, then best effort.
        caps = level_capacity(alloc)
        used: Counter = Counter()
        chosen: list[_Unit] = []
        for u, k_dp in sorted(((u, k) for u, k in zip(wanted, choice) if k is not None),
                              key=lambda x: x[0].order):
            for k in [k_dp] + [k for k in reversed(u.ks) if k < k_dp]:  # downsize if packing fails
                if self._admit(u, k, used, caps, chosen):
                    break
        for u in sorted((u for u in fresh if u.k == 0 and u.ks), key=lambda u: u.order):
            # Smallest on-time degree that packs; if none, it waits for one (it
            # can still make it), rather than starting late at a degree too small.
            any(self._admit(u, k, used, caps, chosen) for k in u.ks)
        for u in sorted((u for u in fresh if u.k == 0 and not u.ks), key=lambda u: (u.is_video, u.order)):
            u.late = any(self._admit(u, k, used, caps, chosen) for k in u.times.degrees)

        # 7. Elastic scale-up of fresh diffuse units, then placement largest first.
        self._scale_up(chosen, used, caps)
        placed: list[_Unit] = []
        for u in sorted(chosen, key=lambda u: (-u.k, u.order)):
            blk = None
            for k in [u.k] + [k for k in reversed(u.ks or u.times.degrees) if k < u.k]:  # memory
                blk = self._take(state, alloc, u, k, defrag=True)
                if blk is not None:
                    break
            if blk is not None:
                u.gpus, u.k = blk, len(blk)
                placed.append(u)
        for u in sorted(running, key=lambda u: u.order):
            self._grow(alloc, u)

        # Assignments.
        for u in sorted(running + placed, key=lambda u: u.order):
            if u.stage is Stage.ENCODE:
                out.append(Assignment(u.ids, Stage.ENCODE, u.gpus[:1]))
                if len(u.gpus) > 1:
                    self._holds.append((u.ids, u.gpus[1:]))
            else:
                out.append(self._diffuse(state, u))
        stats = KnapsackStats(dp_groups=len(wanted), dp_value=value, paused=[u.lead.id for u in paused],
                              batches=sum(1 for u in placed if u.value > 1))
        return RoundPlan(tuple(out), solver=self.name, stats=stats)

    # --- helpers -----------------------------------------------------------------
    def _apply_holds(self, state: PlannerState, alloc: BlockAllocator) -> None:
        """Keep the rest of an encoding unit's block free until its encode ends."""
        by_id = {r.id: r for r in state.requests}
        keep = []
        for ids, gpus in self._holds:
            ms = [by_id.get(i) for i in ids]
            if all(m is not None and m.state is RequestState.RUNNING and m.encoded and m.steps_done == 0
                   for m in ms):
                keep.append((ids, gpus))
                for g in gpus:
                    if alloc.is_free((g,)):
                        alloc.take(1, (g,))
        self._holds = keep

    def _units(self, state: PlannerState, times: TimingTable, waiting: list[RequestStatus]) -> list[_Unit]:
        """Encode and diffuse units, with dynamic batching (see the module doc)."""
        units = []
        for stage in (Stage.ENCODE, Stage.DIFFUSE):
            for bucket in _buckets(state, [s for s in waiting if s.next_stage is stage], stage):
                cap = batch_limit(state, bucket[0])
                cur = self._unit(state, times, bucket[:1], stage)
                for st in bucket[1:]:
                    bigger = None
                    if cur.value < cap:
                        bigger = self._unit(state, times, cur.members + [st], stage)
                        alone = self._unit(state, times, [st], stage)
                        if not bigger.ks:
                            if cur.ks or alone.ks:
                                bigger = None  # joining would make an on-time request late
                        elif cur.ks and alone.ks and (
                                bigger.ks[0] > max(cur.ks[0], alone.ks[0])
                                or _gpu_seconds(bigger) > _gpu_seconds(cur) + _gpu_seconds(alone)):
                            bigger = None  # needs a larger degree or more GPU time than apart
                    if bigger is None:
                        units.append(cur)
                        cur = self._unit(state, times, [st], stage)
                    else:
                        cur = bigger
                units.append(cur)
        units.sort(key=lambda u: u.order)
        return units

    @staticmethod
    def _unit(state: PlannerState, times: TimingTable, ms: list[RequestStatus], stage: Stage) -> _Unit:
        """A unit and its on-time degrees: k such that the latent move to a k-block
        plus all remaining steps at k fit deadline - now - decode (- encode).
        No on-time degree: the unit is late (best effort)."""
        t = times.of(ms[0], len(ms))
        deadline = min(m.request.deadline for m in ms)
        now = state.now
        budget = deadline - now - t.decode - (t.encode if stage is Stage.ENCODE else 0.0)
        u = _Unit(ms, stage, t)
        u.slack = deadline - now - max(state.remaining_lower_bound(m) for m in ms)
        rem = ms[0].remaining_steps
        u.ks = tuple(k for k in t.degrees
                     if max(migration_estimate(state, m, k) for m in ms) + rem * t.step[k] <= budget)
        return u

    def _dp(self, alloc: BlockAllocator, units: list[_Unit]) -> tuple[list[int | None], float]:
        """Group knapsack over free GPUs: the on-time degree each unit gets (None: none)."""
        max_k = alloc.largest_free_block()
        head = max((alloc.headroom((g,)) for g in alloc.free_gpus()), default=0)
        groups = [[KnapsackChoice(k, u.value, k) for k in u.ks if k <= max_k and u.act(k) <= head] for u in units]
        choice, value, _ = solve_group_knapsack(groups, alloc.free_count())
        return [None if c is None else g[c].k for g, c in zip(groups, choice)], value

    def _preempt(self, state: PlannerState, alloc: BlockAllocator, running: list[_Unit],
                 wanted: list[_Unit], choice: list[int | None], value: float
                 ) -> tuple[list[_Unit], list[int | None]]:
        """Pause running videos, most slack first, while it serves more on-time requests.

        Each candidate's block is released and the DP re-run. A pause costs
        one on-time request when the video's slack is shorter than the pause
        (the longest left-out image's work at its smallest on-time degree).
        The shortest prefix of pauses with the best net value (DP value minus
        those costs, strictly above the value without pausing) is kept; the
        other videos get their blocks back.
        """
        pause_s = max((_work_s(u) for u, k in zip(wanted, choice) if k is None and not u.is_video),
                      default=0.0)
        best_net, best_n, best_choice = value, 0, choice
        tried: list[_Unit] = []
        lost = 0
        for u in sorted(running, key=lambda u: (-u.slack, u.order)):
            alloc.release(u.gpus)
            tried.append(u)
            lost += u.slack < pause_s
            c2, v2 = self._dp(alloc, wanted)
            if v2 - lost > best_net:
                best_net, best_n, best_choice = v2 - lost, len(tried), c2
            if all(k is not None or w.is_video for k, w in zip(c2, wanted)):
                break
        for u in reversed(tried[best_n:]):  # not paused after all: give the block back
            alloc.take(len(u.gpus), u.gpus, 0)
        for u in tried[:best_n]:
            u.running, u.paused, u.gpus, u.k = False, True, None, 0
        return tried[:best_n], best_choice

    @staticmethod
    def _take(state: PlannerState, alloc: BlockAllocator, u: _Unit, k: int,
              defrag: bool) -> tuple[int, ...] | None:
        """A k-block for ``u``: around its latent, unless that splits a larger free
        block than the buddy best fit would and moving the latent there is cheap."""
        lat = u.lead.latent_gpus
        blk = alloc.peek(k, lat, u.act(k))
        if blk is None:
            return None
        if defrag and lat:
            alt = alloc.peek(k, (), u.act(k))
            if (alt is not None and alt != blk and alloc.free_chunk(alt) < alloc.free_chunk(blk)
                    and max(state.migration_time(m, alt) for m in u.members) <= CHEAP_MOVE_S):
                blk = alt
        return alloc.take(k, blk, u.act(k))

    @staticmethod
    def _admit(u: _Unit, k: int, used: Counter, caps: dict[int, int], chosen: list[_Unit]) -> bool:
        used[k] += 1
        if not packing_fits(used, caps):
            used[k] -= 1
            return False
        u.k = k
        chosen.append(u)
        return True

    @staticmethod
    def _scale_up(chosen: list[_Unit], used: Counter, caps: dict[int, int]) -> None:
        """Double degrees of diffuse units while packing fits and the doubling pays."""
        ranked = sorted((u for u in chosen if u.stage is Stage.DIFFUSE),
                        key=lambda u: (u.late, u.order))
        grown = True
        while grown:
            grown = False
            for u in ranked:
                if not u.times.doubling_pays(u.k):
                    continue
                k2 = 2 * u.k
                used[u.k] -= 1
                used[k2] += 1
                if packing_fits(used, caps):
                    u.k, grown = k2, True
                else:
                    used[k2] -= 1
                    used[u.k] += 1

    @staticmethod
    def _grow(alloc: BlockAllocator, u: _Unit) -> None:
        """A running video grows in place into free buddy halves while the doubling pays."""
        while u.times.doubling_pays(len(u.gpus)):
            k2 = 2 * len(u.gpus)
            parent = alloc.grow(u.gpus, u.act(k2))
            if parent is None:
                return
            u.gpus, u.k = parent, k2

    @staticmethod
    def _diffuse(state: PlannerState, u: _Unit) -> Assignment:
        req = u.lead.request
        k = len(u.gpus)
        bw = state.cluster.block_bandwidth(u.gpus) if k > 1 else None
        step = state.cost.step_time(req.spec, req.shape, k, u.value, link_bw=bw)
        q = round_steps(state.round_s, u.lead.remaining_steps, step)
        return Assignment(u.ids, Stage.DIFFUSE, u.gpus, q)
