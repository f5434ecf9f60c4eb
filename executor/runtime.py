"""The worker runtime: one process per device, SPMD over a command stream.

Every rank of the world sees every command (``Worker.handle``); ranks outside a command's group skip it
at once, so commands for disjoint groups do not wait on each other's collectives. Request state lives on
the ranks of the request's current group, replicated on each of them: the latent, its conditioning and
the scheduler (the model's own FlowMatchEulerDiscreteScheduler, positioned at the next step).

Commands (plain dicts, picklable, so a controller can broadcast them):

* ``create``: ``spec`` (a ``LatentSpec``) and ``ranks``: materialise the request on that group.
* ``run``: ``rids`` (one, or a batch of same-shape requests on the same group), ``steps``:
  run that many denoising steps; the group's lead records measured step times.
* ``pause``: ``rid``: nothing to do on the device (a run stops at a step boundary by construction); the
  latent stays where it is and the request is marked paused. ``resume`` marks it runnable again.
* ``migrate``: ``rid``, ``ranks``: move the state to another aligned block (any degree). The old group's
  lead sends latent, conditioning and step index point-to-point to every new member that lacks them
  (gather is implicit: the state is replicated in the old group); old members outside the new group drop it.
* ``release``: ``rid``: drop the state.
* ``load``: ``rank``, ``model``, ``component``, ``family``: on that rank only, make the weights resident. The
  backbone of a family the worker can build (``build``) is really constructed there (tiny seeded, or a
  checkpoint), moved to the device and given SP hooks; other components (text encoders, VAE: the encode and
  decode stages are stand-ins) and families without a torch model are recorded as resident, nothing more.
* ``unload``: ``rank``, ``model``, ``component``: on that rank only, drop the module (``gc.collect()``, and
  ``torch.cuda.empty_cache()`` on CUDA) and report whether it is really gone (a weak reference).

Modules are keyed by the catalog model (``create`` may name it with ``model``; else the request's family,
as callers that build ``Worker(rank, world, {family: model})`` do). A run needs the module on every rank of
its group: once any ``load``/``unload`` has been seen (every rank sees every command, so all ranks agree)
a missing one is an error (``MissingWeights``, raised on every rank of the group, so no collective waits);
before that (legacy: every model everywhere) it is built on first use with ``build``.
"""
from __future__ import annotations

import gc
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ditplan.executor.parallel import BlockGroups, SPContext, enable_sequence_parallel
from ditplan.models.torch import LatentSpec, make_request_tensors, make_scheduler, predict, set_timesteps, tiny_transformer


@dataclass
class ResidentRequest:
    """A request resident on its ranks: latent, conditioning and scheduler, kept across pauses."""

    spec: LatentSpec
    ranks: tuple[int, ...]
    latent: torch.Tensor
    cond: dict[str, torch.Tensor]
    scheduler: object
    step: int = 0  # steps done
    paused: bool = False
    step_times: list[float] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent] + [self.cond[k] for k in sorted(self.cond)]


class MissingWeights(RuntimeError):
    """A run on a rank that does not hold the module its request needs (with a placement)."""


SP_FAMILIES = ("flux", "sd3")


def module_size(model) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers) of a module."""
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return params, nbytes


class Worker:
    def __init__(self, rank: int, world: int, models: dict[str, object] | None = None, device: str | None = None,
                 build=None, config=None) -> None:
        """``models``: modules held from the start, keyed by model (or family); ``build(model, family)``: a new
        module for that model's backbone (None: the family has none); ``config(family)``: its config without
        building it (what ``create`` needs on a rank that does not hold the backbone)."""
        self.rank, self.world = rank, world
        # NCCL (CUDA) needs device tensors; gloo (CPU) host ones
        self.device = torch.device(device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                                              else "cpu"))
        self.groups = BlockGroups(rank, world)
        self.ctx = SPContext(self.groups)
        self.build, self.config = build, config
        self.models: dict[str, object] = {}  # key (catalog model, or family) -> module on this rank
        self.families: dict[str, str] = {}  # key -> family
        self.resident: set[tuple[str, str]] = set()  # (model, component) loaded on this rank
        self.placed = False  # a load or unload was seen: modules come only from loads
        for key, model in (models or {}).items():
            self._hold(key, key, model)
        self.on_weight = None  # on_weight(cmd, op, info): called on the acting rank after load/unload/lazy build
        self.model_of: dict[str, str] = {}  # request -> module key
        self.specs: dict[str, LatentSpec] = {}  # every request, on every rank
        self.where: dict[str, tuple[int, ...]] = {}  # its current group, on every rank
        self.states: dict[str, ResidentRequest] = {}  # only on the ranks of its group
        self.on_step = None  # on_step(cmd, index, steps, seconds): called on the lead after each step
        self.should_stop = None  # should_stop(cmd, index) on the lead: stop this run at a step boundary
        self.stopped = False  # the last run stopped early

    # --- commands -------------------------------------------------------------------------------
    def handle(self, cmd: dict):
        return getattr(self, "_" + cmd["op"])(cmd)

    # --- weights ----------------------------------------------------------------------------------
    def _hold(self, key: str, family: str, model) -> None:
        model = model.to(self.device)
        if family in SP_FAMILIES:
            enable_sequence_parallel(model, family, self.ctx)
        self.models[key], self.families[key] = model, family

    def held(self) -> dict[str, int]:
        """What this rank holds: module key -> parameters."""
        return {k: module_size(m)[0] for k, m in sorted(self.models.items())}

    def _built(self, key: str, family: str) -> dict:
        t0 = time.perf_counter()
        model = self.build(key, family) if self.build is not None else None
        if model is None:
            return {"module": False, "params": 0, "bytes": 0, "seconds": 0.0}
        self._hold(key, family, model)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        params, nbytes = module_size(self.models[key])
        return {"module": True, "params": params, "bytes": nbytes, "seconds": time.perf_counter() - t0}

    def _load(self, cmd):
        self.placed = True
        if self.rank != cmd["rank"]:
            return None
        key, comp = cmd["model"], cmd["component"]
        if comp == "backbone" and key in self.models:  # already built here: nothing to do
            params, nbytes = module_size(self.models[key])
            info = {"module": True, "params": params, "bytes": nbytes, "seconds": 0.0}
        elif comp == "backbone":
            info = self._built(key, cmd["family"])
        else:  # text encoders and VAE have no module yet (encode/decode are stand-ins): resident in name only
            info = {"module": False, "params": 0, "bytes": 0, "seconds": 0.0}
        self.resident.add((key, comp))
        info.update(name=f"{key}/{comp}", held=self.held())
        if self.on_weight is not None:
            self.on_weight(cmd, "load", info)
        return info

    def _unload(self, cmd):
        self.placed = True
        if self.rank != cmd["rank"]:
            return None
        key, comp = cmd["model"], cmd["component"]
        self.resident.discard((key, comp))
        model = self.models.pop(key, None) if comp == "backbone" else None
        if model is not None:
            self.families.pop(key, None)
        info = {"name": f"{key}/{comp}", "module": model is not None, "params": 0, "bytes": 0, "gone": True}
        if model is not None:
            info["params"], info["bytes"] = module_size(model)
            ref = weakref.ref(model)
            del model
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            info["gone"] = ref() is None  # nothing else keeps the module (and its tensors) alive
        info.update(held=self.held())
        if self.on_weight is not None:
            self.on_weight(cmd, "unload", info)
        return info

    def _module(self, cmd, rid: str, ranks):
        """The module run ``cmd`` needs, on every rank of its group (built lazily without a placement)."""
        key = self.model_of.get(rid, self.specs[rid].family)
        if key not in self.models and not self.placed and self.build is not None:
            info = self._built(key, self.specs[rid].family)
            if info["module"] and self.on_weight is not None:
                self.on_weight(cmd, "build", dict(info, model=key, held=self.held()))
        have = key in self.models
        if self.placed and len(ranks) > 1:  # agree, so that no rank waits in a collective for a failed one
            flag = torch.tensor([int(have)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.groups.group(ranks))
            if not bool(flag.item()):
                raise MissingWeights(f"rank {self.rank}: {key} backbone is not resident on every rank of {ranks}"
                                     + ("" if have else " (not here)"))
        if not have:
            raise MissingWeights(f"rank {self.rank}: {key} backbone is not resident here"
                                 + (" (placement: load it first)" if self.placed else ""))
        return self.models[key]

    def _family_config(self, spec: LatentSpec, rid: str):
        key = self.model_of.get(rid, spec.family)
        if key in self.models:
            return self.models[key]
        for k, m in self.models.items():
            if self.families.get(k) == spec.family:
                return m
        if self.config is not None:
            return _Configured(self.config(spec.family))
        raise KeyError(f"rank {self.rank}: no {spec.family} model or config for {rid}")

    # --- requests ----------------------------------------------------------------------------------
    def _create(self, cmd):
        spec, ranks = cmd["spec"], tuple(cmd["ranks"])
        self.specs[spec.rid], self.where[spec.rid] = spec, ranks
        self.model_of[spec.rid] = cmd.get("model") or spec.family
        if self.rank in ranks:
            self.states[spec.rid] = self._materialise(spec, ranks)

    def _materialise(self, spec: LatentSpec, ranks) -> ResidentRequest:
        # drawn on the CPU: same on every device kind; needs only the family's config
        t = make_request_tensors(self._family_config(spec, spec.rid), spec)
        sched = make_scheduler(spec.family)
        set_timesteps(sched, spec)
        cond = {k: v.to(self.device) for k, v in t.cond.items()}
        return ResidentRequest(spec, tuple(ranks), t.latent.to(self.device), cond, sched)

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
        model = self._module(cmd, rids[0], ranks)
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
        self.model_of.pop(cmd["rid"], None)

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


class _Configured:
    """Stands in for a module where only its ``config`` is read (``make_request_tensors``)."""

    def __init__(self, config) -> None:
        self.config = config


def tiny_models(families=("flux", "sd3"), num_attention_heads: int = 4) -> dict[str, object]:
    return {f: tiny_transformer(f, num_attention_heads=num_attention_heads) for f in families}
