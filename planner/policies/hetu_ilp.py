"""TridentServe's dispatcher (arXiv 2510.02838; code: PKU-DAIR/Hetu-DiT) as a ditplan policy.

Written from the public description and dispatcher of Hetu-DiT: a one-shot
integer program, solved with PuLP/CBC, picks which queued tasks start now,
each at an SP degree k in {1, 2, 4, 8} on one machine (node).

**Tasks.** Queued requests (nothing dispatched yet) in deadline order; images
with the same ``batch_key()`` and progress are merged into one task of up to
``cost.max_batch`` requests (Hetu-DiT merges same-shape queued images). The
ILP sees at most ``MAX_TASKS`` tasks, the earliest deadlines first.

**Degrees.** k is allowed for a task if its parallel efficiency
``(T1 / Tk) / k >= 0.8`` (diffuse step times at the task's batch size, on a
nominal k-block) and its activations fit a free k-block of that node. If no
degree passes both (k = 1 does not fit in memory), the smallest degree that
fits is allowed: avoiding OOM beats the efficiency rule.

**Runtime and reward.** ``run(k) = encode + steps x Tk + decode`` from now.
Each member request earns ``ON_TIME_REWARD`` = 1000 if ``now + run(k)`` is
within its deadline, else a lateness-scaled reward: the share of the run
that fits before the deadline, ``1000 x (deadline - now) / run(k)``, rounded
down and clipped to [1, 999] (an already overdue request earns 1). So on-time
requests dominate, a task that misses by little beats one that misses by a
lot, and a faster degree never earns less. A task's reward is the sum over
its members.

**ILP.** Binary ``x[t, k, n]``; at most one option per task; per node n and
level j in {1, 2, 4, 8}: ``sum over k >= j of (k / j) x[t, k, n] <= free
aligned j-blocks of n`` (exact for buddy blocks: the chosen degrees can be
placed largest first); objective ``sum reward x - IDLE_PENALTY x idle GPUs``
(``IDLE_PENALTY`` = 1 per GPU left idle, as Hetu-DiT's slack term: among
equal rewards, use the GPUs). CBC runs single-threaded with ``msg=False``
and a ``CBC_TIME_LIMIT_S`` limit, so a solve is deterministic; if CBC finds
no solution, a greedy fallback (deadline order, best option that packs)
dispatches instead and the plan says ``fallback=True``.

**Cadence.** A solve happens at a plan call iff some task is queued, some
GPU is free to dispatch on, and either ``SOLVE_INTERVAL_S`` = 0.5 s have
passed since the last solve or a GPU is free now that was not free to
dispatch on right after the last solve ("GPUs freed up"). Arrivals alone do
not trigger a solve. While tasks stay queued the plan asks to be woken at
the next 0.5 s tick (``RoundPlan.wake_at``).

**Execution.** A dispatched task is bound to its block: encode on the
block's first GPU (the rest of the block is held for it), then all of its
diffuse steps in one assignment on the whole block (non-preemptive, as in
Hetu-DiT), then decode downscaled to one GPU of the block, freeing the rest.

**Placement.** When the models do not all fit on every GPU, hetu-ilp runs
on the ``stages`` placement of Hetu-DiT's disaggregated encode/decode
workers (``use_disaggregated_encode_decode``; ``planner.placement.
stage_placement``): a few GPUs per node hold the text encoders and VAEs and
run every encode and decode, the rest hold backbones. A task then encodes on
a free encode GPU of its node (a dispatch needs one; the ILP counts them per
node) while its diffuse block is held, and decodes on a free decode GPU.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import ditplan.planner.solvers  # noqa: F401  (loads ortools' libhighs before pulp's highspy)
import pulp

from ditplan.models.catalog import SP_DEGREES
from ditplan.planner.plan import Assignment, PlanStats, RoundPlan
from ditplan.planner.policies.base import Policy, register
from ditplan.planner.policies.kit.blocks import BlockAllocator
from ditplan.planner.policies.kit.packing import packing_fits
from ditplan.planner.policies.kit.rounds import deadline_order
from ditplan.planner.policies.kit.timing import Timing, TimingTable, batch_limit
from ditplan.planner.request import RequestState, RequestStatus, Stage
from ditplan.planner.solvers.pulp_vars import new_var
from ditplan.planner.state import PlannerState

ON_TIME_REWARD = 1000
IDLE_PENALTY = 1.0
SOLVE_INTERVAL_S = 0.5
CBC_TIME_LIMIT_S = 5.0
MAX_TASKS = 64
_EPS = 1e-9


def _cbc() -> pulp.LpSolver:
    """The CBC binary bundled with PuLP: quiet, one thread (deterministic), time-limited."""
    with warnings.catch_warnings():  # PuLP 3.3 announces PULP_CBC_CMD's removal in 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=CBC_TIME_LIMIT_S, threads=1)


@dataclass(slots=True, eq=False)
class _Task:
    members: list[RequestStatus]
    times: Timing
    degrees: tuple[int, ...] = ()  # allowed by efficiency and memory, ascending

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.members)

    @property
    def lead(self) -> RequestStatus:
        return self.members[0]

    def runtime(self, k: int) -> float:
        t = self.times
        enc = 0.0 if self.lead.encoded else t.encode
        return enc + self.lead.remaining_steps * t.step[k] + t.decode

    def reward(self, now: float, k: int) -> int:
        run = self.runtime(k)
        total = 0
        for m in self.members:
            left = m.request.deadline - now
            if run <= left + _EPS:
                total += ON_TIME_REWARD
            else:
                total += int(min(ON_TIME_REWARD - 1, max(1.0, ON_TIME_REWARD * left / run)))
        return total


def efficient_degrees(times: Timing) -> tuple[int, ...]:
    """Degrees whose parallel efficiency (T1 / Tk) / k is at least 0.8 (k = 1 always)."""
    return tuple(k for k in times.degrees if times.efficient(k))



@dataclass
class IlpInfo:
    """One solve of the placement ILP."""

    vars: int
    tasks: int
    status: str  # PuLP's status name
    launched: int = 0


@dataclass
class HetuStats(PlanStats):
    """A plan of hetu-ilp: whether it solved its ILP this time, and why."""

    queued_tasks: int = 0
    solved: bool = False
    trigger: str | None = None  # "interval" (the solve cadence) or "freed" (GPUs came free)
    ilp: IlpInfo | None = None

@register("hetu-ilp")
class HetuIlpPolicy(Policy):
    """Hetu-DiT's ILP dispatcher: efficient degrees, deadline rewards, 0.5 s cadence."""

    name = "hetu-ilp"
    split_placement = "stages"  # its placement when the models do not all fit (see the module doc)

    def __init__(self) -> None:
        self._times = TimingTable()
        self.reset()

    def reset(self) -> None:
        self._bound: dict[tuple[str, ...], tuple[int, ...]] = {}  # dispatched task -> its block
        self._last_solve: float | None = None
        self._free_after_solve: frozenset[int] = frozenset()
        self.solves = 0

    # --- the plan ------------------------------------------------------------------
    def plan(self, state: PlannerState) -> RoundPlan:
        now = state.now
        times = self._times.bind(state)
        alloc = BlockAllocator(state)
        by_id = {r.id: r for r in state.requests}
        out: list[Assignment] = []

        # 1. Dispatched tasks go on: hold, diffuse on the bound block, decode on one GPU.
        out.extend(self._continue(state, alloc, by_id))
        bound_ids = {i for ids in self._bound for i in ids} | {i for a in out for i in a.request_ids}
        for st in sorted(state.waiting(), key=deadline_order):  # stray decodes (robustness)
            if st.id not in bound_ids and st.next_stage is Stage.DECODE and alloc.free_count():
                blk = _take_holder(state, alloc, st, "vae")
                if blk is not None:
                    out.append(Assignment((st.id,), Stage.DECODE, blk))

        # 2. Queued tasks; solve on the cadence.
        tasks = self._tasks(state, times, bound_ids)
        free = frozenset(alloc.free_gpus())
        stats = HetuStats(queued_tasks=len(tasks))
        fallback = False
        if tasks and free:
            due = self._last_solve is None or now - self._last_solve >= SOLVE_INTERVAL_S - _EPS
            freed = bool(free - self._free_after_solve)
            if due or freed:
                launched, fallback, info = self._solve(state, alloc, tasks[:MAX_TASKS])
                stats.ilp = info
                stats.solved, stats.trigger = True, "interval" if due else "freed"
                self._last_solve = now
                self.solves += 1
                dispatched = set()
                for task, blk, enc in launched:
                    out.append(self._start(task, blk, enc))
                    dispatched.add(task.ids)
                tasks = [t for t in tasks if t.ids not in dispatched]
                self._free_after_solve = frozenset(alloc.free_gpus())
        wake = None
        if tasks:
            tick = (self._last_solve if self._last_solve is not None else now) + SOLVE_INTERVAL_S
            wake = tick if tick > now + _EPS else now + SOLVE_INTERVAL_S
        return RoundPlan(tuple(out), wake_at=wake, solver=self.name, fallback=fallback, stats=stats)

    # --- dispatched tasks ----------------------------------------------------------
    def _continue(self, state: PlannerState, alloc: BlockAllocator,
                  by_id: dict[str, RequestStatus]) -> list[Assignment]:
        for ids in [ids for ids in self._bound if any(i not in by_id for i in ids)]:
            del self._bound[ids]  # finished
        out = []
        for ids, blk in sorted(self._bound.items(), key=lambda kv: deadline_order(by_id[kv[0][0]])):
            ms = [by_id[i] for i in ids]
            lead = ms[0]
            if all(m.in_flight for m in ms):
                if lead.state is RequestState.RUNNING and lead.encoded and lead.steps_done == 0:
                    for g in blk:  # encoding: keep the (rest of the) block for its diffuse
                        if alloc.is_free((g,)):
                            alloc.take(1, (g,))
                continue
            if any(m.in_flight for m in ms) or len({m.next_stage for m in ms}) > 1:
                continue  # out of step; wait until the batch is together again
            stage = lead.next_stage
            if stage is Stage.DIFFUSE:
                req = lead.request
                act = req.spec.activation_bytes(req.shape, len(blk), len(ms))
                got = alloc.take(len(blk), blk, act) or alloc.take(len(blk), lead.latent_gpus, act)
                if got is not None and not state.placement.runs(got, req.model, Stage.DIFFUSE):
                    alloc.release(got)
                    got = None
                if got is not None:
                    self._bound[ids] = got
                    out.append(Assignment(ids, Stage.DIFFUSE, got, lead.remaining_steps))
            elif stage is Stage.DECODE:
                got = _take_holder(state, alloc, lead, "vae")
                if got is not None:
                    del self._bound[ids]
                    out.append(Assignment(ids, Stage.DECODE, got))
            elif stage is Stage.ENCODE:  # dispatched but never started: back to the queue
                del self._bound[ids]
        return out

    def _start(self, task: _Task, blk: tuple[int, ...], enc: tuple[int, ...] | None) -> Assignment:
        self._bound[task.ids] = blk
        if not task.lead.encoded:
            return Assignment(task.ids, Stage.ENCODE, enc or blk[:1])
        return Assignment(task.ids, Stage.DIFFUSE, blk, task.lead.remaining_steps)

    # --- queued tasks --------------------------------------------------------------
    def _tasks(self, state: PlannerState, times: TimingTable, bound_ids: set[str]) -> list[_Task]:
        groups: dict[tuple, list[RequestStatus]] = {}
        for st in sorted(state.waiting(), key=deadline_order):
            if st.id in bound_ids or st.next_stage not in (Stage.ENCODE, Stage.DIFFUSE):
                continue
            req = st.request
            key = ("video", st.id) if req.kind == "video" else (req.batch_key(), st.next_stage, st.steps_done)
            groups.setdefault(key, []).append(st)
        tasks = []
        for members in groups.values():
            cap = batch_limit(state, members[0])
            for i in range(0, len(members), cap):
                ms = members[i:i + cap]
                tasks.append(_Task(ms, times.of(ms[0], len(ms))))
        tasks.sort(key=lambda t: deadline_order(t.lead))
        return tasks

    def _options(self, state: PlannerState, alloc: BlockAllocator, task: _Task
                 ) -> list[tuple[int, int, float]]:
        """(k, node, reward) options: allowed degrees on nodes with a free k-block that fits."""
        t = task.times
        fits: dict[int, list[int]] = {}
        model = task.lead.request.model
        for k in t.degrees:
            nodes = sorted({state.cluster.node_of(b[0]) for b in state.cluster.blocks(k)
                            if alloc.is_free(b) and alloc.headroom(b) >= t.act[k]
                            and state.placement.runs(b, model, Stage.DIFFUSE)})
            if nodes:
                fits[k] = nodes
        allowed = [k for k in efficient_degrees(t) if k in fits]
        if not allowed and fits:
            allowed = [min(fits)]  # nothing efficient fits in memory: smallest degree that does
        task.degrees = tuple(allowed)
        now = state.now
        return [(k, n, task.reward(now, k)) for k in allowed for n in fits[k]]

    def _solve(self, state: PlannerState, alloc: BlockAllocator, tasks: list[_Task]
               ) -> tuple[list[tuple[_Task, tuple[int, ...]]], bool, IlpInfo]:
        cluster = state.cluster
        caps = {}  # node -> {j: free aligned j-blocks of backbone GPUs}
        diffusers = [bool(state.placement.models_on(g)) for g in range(cluster.size)]
        for n, node in enumerate(cluster.nodes):
            caps[n] = {j: sum(1 for b in cluster.blocks(j) if b[0] in node and alloc.is_free(b)
                              and all(diffusers[g] for g in b))
                       for j in SP_DEGREES if j <= len(node)}
        # Encode GPUs apart from the backbones (stages placement): a dispatch that encodes needs one free.
        encoders = {n: sum(1 for g in node if not diffusers[g] and alloc.is_free((g,))
                           and any(c == "text" for _, c in state.placement.resident[g]))
                    for n, node in enumerate(cluster.nodes)}
        apart = {i for i, t in enumerate(tasks) if not t.lead.encoded and not _encodes_with_backbone(state, t)}
        options = {i: self._options(state, alloc, t) for i, t in enumerate(tasks)}
        prob = pulp.LpProblem("hetu_dispatch", pulp.LpMaximize)
        x: dict[tuple[int, int, int], pulp.LpVariable] = {}
        gain = {}
        for i, opts in options.items():
            for k, n, r in opts:
                v = new_var(prob, f"x_{i}_{k}_{n}", cat=pulp.LpBinary)
                x[i, k, n], gain[i, k, n] = v, r
        if not x:
            return [], False, IlpInfo(0, len(tasks), "no options")
        used = {n: pulp.lpSum(k * v for (i, k, m), v in x.items() if m == n) for n in caps}
        idle = pulp.lpSum(caps[n][1] - used[n] for n in caps)
        prob += pulp.lpSum(gain[key] * v for key, v in x.items()) - IDLE_PENALTY * idle
        for i in options:
            terms = [v for (j, k, n), v in x.items() if j == i]
            if len(terms) > 1:
                prob += pulp.lpSum(terms) <= 1, f"one_{i}"
        for n, levels in caps.items():
            for j, cap in levels.items():
                terms = [(k // j) * v for (i, k, m), v in x.items() if m == n and k >= j]
                if terms:
                    prob += pulp.lpSum(terms) <= cap, f"pack_{n}_{j}"
            terms = [v for (i, k, m), v in x.items() if m == n and i in apart]
            if terms:
                prob += pulp.lpSum(terms) <= encoders[n], f"encoders_{n}"
        status = prob.solve(_cbc())
        info = IlpInfo(len(x), len(tasks), pulp.LpStatus.get(status, str(status)))
        picks = [key for key, v in x.items() if v.value() is not None and v.value() > 0.5]
        fallback = status != pulp.LpStatusOptimal and not picks
        if fallback or not self._packs(picks, caps):
            picks, fallback = self._greedy(options, caps), True
        info.launched = len(picks)
        return self._place(state, alloc, tasks, picks), fallback, info

    @staticmethod
    def _packs(picks: list[tuple[int, int, int]], caps: dict[int, dict[int, int]]) -> bool:
        per_node: dict[int, Counter] = {}
        for i, k, n in picks:
            per_node.setdefault(n, Counter())[k] += 1
        return len({i for i, _, _ in picks}) == len(picks) and all(
            packing_fits(c, caps[n]) for n, c in per_node.items())

    @staticmethod
    def _greedy(options: dict[int, list[tuple[int, int, float]]],
                caps: dict[int, dict[int, int]]) -> list[tuple[int, int, int]]:
        """Fallback: tasks in deadline order take their best option that still packs."""
        per_node: dict[int, Counter] = {n: Counter() for n in caps}
        picks = []
        for i, opts in options.items():
            for k, n, _ in sorted(opts, key=lambda o: (-(o[2] + IDLE_PENALTY * o[0]), o[1])):
                per_node[n][k] += 1
                if packing_fits(per_node[n], caps[n]):
                    picks.append((i, k, n))
                    break
                per_node[n][k] -= 1
        return picks

    @staticmethod
    def _place(state: PlannerState, alloc: BlockAllocator, tasks: list[_Task], picks: list[tuple[int, int, int]]
               ) -> list[tuple[_Task, tuple[int, ...], tuple[int, ...] | None]]:
        """(task, block, encode GPU apart or None) for the chosen (task, k, node), largest degree
        first, buddy best fit in the node."""
        cluster = state.cluster
        out = []
        for i, k, n in sorted(picks, key=lambda p: (-p[1], deadline_order(tasks[p[0]].lead))):
            task = tasks[i]
            need = task.times.act[k]
            model = task.lead.request.model
            node = set(cluster.nodes[n])
            cands = [b for b in cluster.blocks(k) if b[0] in node and alloc.is_free(b)
                     and alloc.headroom(b) >= need and state.placement.runs(b, model, Stage.DIFFUSE)]
            if not cands:
                continue
            blk = min(cands, key=lambda b: (alloc.free_chunk(b), b[0]))
            got = alloc.take(k, blk, need)
            if got is None:
                continue
            enc = None
            if not task.lead.encoded and not state.placement.holds(got[0], model, "text"):
                enc = _take_holder(state, alloc, task.lead, "text", n)
                if enc is None:  # no free encode GPU after all: not dispatched this round
                    alloc.release(got)
                    continue
            out.append((task, got, enc))
        return out


def _encodes_with_backbone(state: PlannerState, task: _Task) -> bool:
    """Some GPU holding the task's backbone also holds its text encoders (encode on the block)."""
    model = task.lead.request.model
    p = state.placement
    return any(p.holds(g, model, "text") for g in p.gpus_with(model))


def _take_holder(state: PlannerState, alloc: BlockAllocator, st: RequestStatus, component: str,
                 node: int | None = None) -> tuple[int, ...] | None:
    """Take one free GPU holding ``st``'s ``component``.

    Decode (``node`` None): where the latent is if free, else the allocator's
    best free GPU, as before placement; if that lacks the VAE, a free VAE GPU
    of the latent's node. Encode: a free GPU of ``node`` with the text encoders.
    """
    p, model = state.placement, st.request.model
    if node is None:
        got = alloc.take(1, st.latent_gpus[:1])
        if got is None or p.holds(got[0], model, component):
            return got
        alloc.release(got)
        node = state.cluster.node_of(st.latent_gpus[0]) if st.latent_gpus else 0
    for g in state.cluster.nodes[node]:
        if p.holds(g, model, component) and alloc.is_free((g,)):
            return alloc.take(1, (g,))
    return None
