"""PatchedServe (arXiv 2501.09253; code MiRaCLeXeoN/sduss) and the two baselines it compares with.

* ``patchedserve``: one serving instance per GPU (data parallel, no SP), each batching its requests as
  CSP patches: images of any size and at any step share a forward pass (``models/csp.py``). Written from
  the paper and its public code:

  - a request is dispatched, when it first appears, to the GPU with the least work homed there
    (remaining GPU-seconds alone), and stays on it (its latent lives there);
  - each plan, per idle GPU: decode every homed request that finished diffusing (one batch); else
    encode every homed fresh request (one batch); else run one denoising step of a CSP batch;
  - the batch: homed requests sorted by slack (deadline - now - what is left at batch 1), grown
    greedily while the predictor's step time keeps every member's slack above ``margin_s``, at most
    :data:`~ditplan.models.csp.MAX_BATCH` requests and what fits in memory;
  - requests already past the point of meeting their deadline (negative slack alone) are aborted:
    rejected with the reason.
* ``nirvana-like``: the same instance per GPU with one resolution per batch (NIRVANA batches one
  resolution; its approximate cache is an executor feature, ``models/torch/csp.py``'s patch cache, which
  the simulator does not model for any policy).
* ``distrifusion``: DistriFusion's patch parallelism: each request alone over all GPUs of a node (the
  SP step time at that degree stands in for displaced patch parallelism), first come first served.
"""
from __future__ import annotations

from ditplan.models import csp
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import Policy, register
from ditplan.planner.policies.kit.blocks import BlockAllocator
from ditplan.planner.policies.kit.rounds import deadline_order, take_stage_gpu
from ditplan.planner.policies.kit.timing import TimingTable
from ditplan.planner.request import RequestStatus, Stage, batch_conflict
from ditplan.planner.state import PlannerState


class _PerGpuBatching(Policy):
    """One instance per GPU, slack-ordered greedy batches of one step (see the module doc)."""

    mix_sizes = True  # CSP: sizes (and progress) mix in one batch

    def __init__(self, margin_s: float = 0.0, max_batch: int = csp.MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        self.margin_s = margin_s
        self.max_batch = max_batch
        self._times = TimingTable()
        self.reset()

    def reset(self) -> None:
        self._home: dict[str, int] = {}

    # -- costs -------------------------------------------------------------------------
    def _left_s(self, st: RequestStatus) -> float:
        """Seconds of work left alone on one GPU."""
        t = self._times.of(st)
        return (0.0 if st.encoded else t.encode) + st.remaining_steps * t.step[1] + t.decode

    def _slack(self, state: PlannerState, st: RequestStatus) -> float:
        return st.request.deadline - state.now - self._left_s(st)

    def _step_s(self, state: PlannerState, members: list[RequestStatus]) -> float:
        spec = members[0].request.spec
        return state.cost.batch_step_time(spec, [m.request.shape for m in members], 1)

    def _compatible(self, a: RequestStatus, b: RequestStatus) -> bool:
        if self.mix_sizes:  # the one batching rule (CSP models mix sizes and progress)
            return batch_conflict([a.request, b.request], [a.steps_done, b.steps_done]) is None
        return a.request.batch_key() == b.request.batch_key() and a.steps_done == b.steps_done

    # -- dispatch ----------------------------------------------------------------------
    def _dispatch(self, state: PlannerState, live: list[RequestStatus]) -> None:
        """Home each new request on the GPU with the least work homed there."""
        load = [0.0] * state.cluster.size
        for st in live:
            g = self._home.get(st.id)
            if g is not None:
                load[g] += self._left_s(st)
        for st in sorted(live, key=deadline_order):
            if st.id in self._home:
                continue
            g = st.latent_gpus[0] if st.latent_gpus else min(range(len(load)), key=lambda i: (load[i], i))
            self._home[st.id] = g
            load[g] += self._left_s(st)

    # -- the plan ----------------------------------------------------------------------
    def plan(self, state: PlannerState) -> RoundPlan:
        self._times.bind(state)
        live = [st for st in state.requests if st.live]
        self._dispatch(state, live)
        self._home = {st.id: self._home[st.id] for st in live}
        rejections = []
        waiting: dict[int, list[RequestStatus]] = {}
        for st in state.waiting():
            if st.next_stage is not Stage.DECODE and self._slack(state, st) < 0:
                rejections.append((st.id, f"aborted: {self._left_s(st):.3f} s of work left alone, "
                                          f"{st.request.deadline - state.now:.3f} s to its deadline"))
                continue
            waiting.setdefault(self._home[st.id], []).append(st)
        headroom = self._headroom(state)
        idle = set(state.idle_gpus())
        out: list[Assignment] = []
        for g in sorted(waiting.keys() & idle):  # one instance per GPU: each plans its own requests
            a = self._gpu_plan(state, g, waiting[g], headroom[g])
            if a is not None:
                out.append(a)
        return RoundPlan(tuple(out), solver=self.name, rejections=tuple(rejections))

    @staticmethod
    def _headroom(state: PlannerState) -> list[int]:
        weights, resident = state.weight_bytes(), state.resident_bytes()
        return [g.memory - weights[g.index] - resident[g.index] for g in state.cluster.gpus]

    def _gpu_plan(self, state: PlannerState, g: int, homed: list[RequestStatus], headroom: int
                  ) -> Assignment | None:
        by_slack = sorted(homed, key=lambda st: (self._slack(state, st), st.id))
        decode = [st for st in by_slack if st.next_stage is Stage.DECODE]
        if decode:
            return Assignment(tuple(st.id for st in decode[:self.max_batch]), Stage.DECODE, (g,))
        fresh = [st for st in by_slack if st.next_stage is Stage.ENCODE]
        if fresh:
            return Assignment(tuple(st.id for st in fresh[:self.max_batch]), Stage.ENCODE, (g,))
        batch: list[RequestStatus] = []
        used = 0
        for st in by_slack:
            act = self._times.of(st).act[1]
            if len(batch) >= self.max_batch or used + act > headroom:
                continue
            if batch and not self._compatible(batch[0], st):
                continue
            trial = [*batch, st]
            step = self._step_s(state, trial)
            if not batch or all(self._slack_in(state, m, step) >= self.margin_s for m in trial):
                batch, used = trial, used + act
        if not batch:
            return None
        return Assignment(tuple(st.id for st in batch), Stage.DIFFUSE, (g,), 1)

    def _slack_in(self, state: PlannerState, st: RequestStatus, step_s: float) -> float:
        """Slack of ``st`` when each of its remaining steps takes ``step_s``."""
        t = self._times.of(st)
        return st.request.deadline - state.now - st.remaining_steps * step_s - t.decode


@register("patchedserve")
class PatchedServePolicy(_PerGpuBatching):
    """PatchedServe: per-GPU CSP batches grown by slack (see the module doc)."""

    name = "patchedserve"
    mix_sizes = True


@register("nirvana-like")
class NirvanaLikePolicy(_PerGpuBatching):
    """Per-GPU batches of one resolution, grown by slack (see the module doc)."""

    name = "nirvana-like"
    mix_sizes = False


@register("distrifusion")
class DistriFusionPolicy(Policy):
    """DistriFusion: each request alone over a whole node, first come first served (see the module doc)."""

    name = "distrifusion"

    def __init__(self) -> None:
        self._times = TimingTable()

    def plan(self, state: PlannerState) -> RoundPlan:
        times = self._times.bind(state)
        alloc = BlockAllocator(state)
        out: list[Assignment] = []
        for st in sorted(state.waiting(), key=lambda s: (s.request.arrival, s.id)):
            if alloc.free_count() == 0:
                break
            stage = st.next_stage
            if stage is not Stage.DIFFUSE:
                blk = take_stage_gpu(alloc, st, stage)
                if blk is not None:
                    out.append(Assignment((st.id,), stage, blk))
                continue
            t = times.of(st)
            k = max(t.degrees)
            blk = alloc.take(k, st.latent_gpus, t.act[k])
            if blk is not None:
                out.append(Assignment((st.id,), Stage.DIFFUSE, blk, st.remaining_steps))
        return RoundPlan(tuple(out), solver=self.name)

