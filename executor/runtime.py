"""The worker runtime: one process per device, SPMD over a command stream.

Every rank of the world sees every command (``Worker.handle``); ranks outside a command's group skip it
at once, so commands for disjoint groups do not wait on each other's collectives. Request state lives on
the ranks of the request's current group, replicated on each of them: the latent, its conditioning and
the scheduler (the model's own FlowMatchEulerDiscreteScheduler, positioned at the next step).

Commands (plain dicts, picklable, so a controller can broadcast them):

* ``create``: ``spec`` (a ``RequestSpec``) and ``ranks``: materialise the request on that group.
* ``run``: ``rids`` (one, or a batch of same-shape requests on the same group), ``steps``:
  run that many denoising steps; the group's lead records measured step times.
* ``pause``: ``rid``: nothing to do on the device (a run stops at a step boundary by construction); the
  latent stays where it is and the request is marked paused. ``resume`` marks it runnable again.
* ``migrate``: ``rid``, ``ranks``: move the state to another aligned block (any degree). The old group's
  lead sends latent, conditioning and step index point-to-point to every new member that lacks them
  (gather is implicit: the state is replicated in the old group); old members outside the new group drop it.
* ``release``: ``rid``: drop the state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from executor.parallel import BlockGroups, SPContext, enable_sequence_parallel
from models.torch import RequestSpec, make_request_tensors, make_scheduler, predict, set_timesteps, tiny_transformer


@dataclass
class RequestState:
    spec: RequestSpec
    ranks: tuple[int, ...]
    latent: torch.Tensor
    cond: dict[str, torch.Tensor]
    scheduler: object
    step: int = 0  # steps done
    paused: bool = False
    step_times: list[float] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent] + [self.cond[k] for k in sorted(self.cond)]


class Worker:
    def __init__(self, rank: int, world: int, models: dict[str, object], device: str | None = None) -> None:
        self.rank, self.world = rank, world
        # NCCL (CUDA) needs device tensors; gloo (CPU) host ones
        self.device = torch.device(device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                                              else "cpu"))
        models = {f: m.to(self.device) for f, m in models.items()}
        self.groups = BlockGroups(rank, world)
        self.ctx = SPContext(self.groups)
        self.models = models
        for family, model in models.items():
            if family in ("flux", "sd3"):
                enable_sequence_parallel(model, family, self.ctx)
        self.specs: dict[str, RequestSpec] = {}  # every request, on every rank
        self.where: dict[str, tuple[int, ...]] = {}  # its current group, on every rank
        self.states: dict[str, RequestState] = {}  # only on the ranks of its group
        self.on_step = None  # on_step(cmd, index, steps, seconds): called on the lead after each step
        self.should_stop = None  # should_stop(cmd, index) on the lead: stop this run at a step boundary
        self.stopped = False  # the last run stopped early

    # --- commands -------------------------------------------------------------------------------
    def handle(self, cmd: dict):
        return getattr(self, "_" + cmd["op"])(cmd)

    def _create(self, cmd):
        spec, ranks = cmd["spec"], tuple(cmd["ranks"])
        self.specs[spec.rid], self.where[spec.rid] = spec, ranks
        if self.rank in ranks:
            self.states[spec.rid] = self._materialise(spec, ranks)

    def _materialise(self, spec: RequestSpec, ranks) -> RequestState:
        t = make_request_tensors(self.models[spec.family], spec)  # drawn on the CPU: same on every device kind
        sched = make_scheduler(spec.family)
        set_timesteps(sched, spec)
        cond = {k: v.to(self.device) for k, v in t.cond.items()}
        return RequestState(spec, tuple(ranks), t.latent.to(self.device), cond, sched)

    def _run(self, cmd):
        rids = list(cmd["rids"])
        ranks = self.where[rids[0]]
        if any(self.where[r] != ranks for r in rids):
            raise ValueError(f"batch {rids} spans several groups")
        if self.rank not in ranks:
            return None
        states = [self.states[r] for r in rids]
        spec = states[0].spec
        if any((s.spec.family, s.spec.height, s.spec.width, s.spec.frames) !=
               (spec.family, spec.height, spec.width, spec.frames) or s.step != states[0].step for s in states):
            raise ValueError(f"batch {rids} mixes shapes or step positions")
        steps = min(cmd["steps"], spec.steps - states[0].step)
        model = self.models[spec.family]
        self.ctx.use(ranks)
        times = []
        for s in states:
            s.paused = False
        with torch.no_grad():
            self.stopped = False
            for k in range(steps):
                if self._stop_here(cmd, k, ranks):
                    self.stopped = True
                    break
                t0 = time.perf_counter()
                latent = torch.cat([s.latent for s in states])
                cond = {k: torch.cat([s.cond[k] for s in states]) for k in states[0].cond}
                t = states[0].scheduler.timesteps[states[0].step]
                pred = predict(model, spec, latent, cond, t)
                for i, s in enumerate(states):
                    s.latent = s.scheduler.step(pred[i:i + 1], t, s.latent).prev_sample
                    s.step += 1
                times.append(time.perf_counter() - t0)
                if self.on_step is not None and self.rank == ranks[0]:
                    self.on_step(cmd, len(times) - 1, steps, times[-1])
        for s in states:
            s.step_times.extend(times)
        return times

    def _stop_here(self, cmd, k: int, ranks) -> bool:
        """Stop before step ``k``? The lead decides (``should_stop``) and its group follows (one broadcast)."""
        if self.should_stop is None:
            return False
        stop = self.rank == ranks[0] and bool(self.should_stop(cmd, k))
        if len(ranks) > 1:
            flag = torch.tensor([int(stop)], device=self.device)
            dist.broadcast(flag, src=ranks[0], group=self.ctx.pg)
            stop = bool(flag.item())
        return stop

    def _pause(self, cmd):
        if cmd["rid"] in self.states:
            self.states[cmd["rid"]].paused = True

    def _resume(self, cmd):
        if cmd["rid"] in self.states:
            self.states[cmd["rid"]].paused = False

    def _release(self, cmd):
        self.states.pop(cmd["rid"], None)
        self.where.pop(cmd["rid"], None)

    def _migrate(self, cmd):
        rid, new = cmd["rid"], tuple(cmd["ranks"])
        old = self.where[rid]
        self.where[rid] = new
        src = old[0]
        receivers = [r for r in new if r not in old]
        if self.rank == src:
            st = self.states[rid]
            for r in receivers:
                dist.send(torch.tensor([st.step], dtype=torch.int64, device=self.device), r)
                for x in st.tensors():
                    dist.send(x.contiguous(), r)
        elif self.rank in receivers:
            spec = self.specs[rid]
            st = self._materialise(spec, new)  # right shapes and a fresh scheduler
            step = torch.zeros(1, dtype=torch.int64, device=self.device)
            dist.recv(step, src)
            bufs = st.tensors()
            for x in bufs:
                dist.recv(x, src)
            st.latent = bufs[0]
            st.step = int(step)
            set_timesteps(st.scheduler, spec, begin=st.step)
            st.paused = True
            self.states[rid] = st
        if self.rank in old and self.rank not in new:
            self.states.pop(rid, None)
        elif rid in self.states:
            self.states[rid].ranks = new

    def _fetch(self, cmd):
        """The request's latent and step (on its group's lead; None elsewhere)."""
        rid = cmd["rid"]
        if self.rank == self.where[rid][0]:
            st = self.states[rid]
            return {"latent": st.latent.detach().cpu().clone(), "step": st.step}
        return None


def tiny_models(families=("flux", "sd3"), num_attention_heads: int = 4) -> dict[str, object]:
    return {f: tiny_transformer(f, num_attention_heads=num_attention_heads) for f in families}
