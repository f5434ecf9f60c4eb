"""The worker runtime: one process per device, SPMD over a command stream.

Every rank of the world sees every command (``Worker.handle``); ranks outside a command's group skip it
at once, so commands for disjoint groups do not wait on each other's collectives. Request state lives on
the ranks of the request's current group, replicated on each of them: the prompt embeddings (``cond``),
the latent and the scheduler (the checkpoint's own, positioned at the next step).

A request goes encode -> diffuse (any number of runs, pauses, migrations) -> decode, each stage on the ranks
the plan gives it (docs/architecture.md, hand-offs between stages):

* ``encode``: ``specs`` (``LatentSpec``s of one model), ``model``, ``rank``: that rank runs the model's text
  encoders (``text`` component) on each request's prompt; the embeddings stay there, the request's group is
  ``(rank,)``. Its measured seconds go to ``on_stage``.
* ``run``: ``rids`` (one, or a batch of requests of one family on the same group), ``steps``: run that many
  denoising steps on the group (``backbone``); the first run draws the seeded initial latent on every rank of
  the group (the pipeline's ``prepare_latents``). The group's lead records measured step times. A batch whose
  members differ in shape or step position runs as one CSP batch (``models/torch/csp.py``: tokens packed,
  attention per image, each member its own timestep, input scaling and scheduler step; SDXL: the patched
  U-Net, ``models/torch/csp_unet.py``) when its family has a CSP forward (``CSP_FAMILIES``), for as many
  steps as its member with the fewest left has; otherwise it is refused.
  ``cache`` (optional): request -> a class name in the Worker's ``cache_policies``, whose ``CachePolicy``
  turns on the patch cache for that request (CSP forward, degree 1); absent or ``"off"``: no cache.
* ``migrate``: ``rid``, ``ranks``: move the state to another aligned block (any degree). The old group's lead
  sends a header (step, scheduler, tensor shapes) and the tensors point-to-point to every new member that
  lacks them (gather is implicit: the state is replicated in the old group); old members outside the new
  group drop it. This is how embeddings reach a diffuse block without the encode GPU and how a latent reaches
  a decode GPU outside its last diffuse block.
* ``decode``: ``rids``, ``rank``: on that rank (the request's group must be ``(rank,)``: migrate first) the
  VAE (``vae``) turns each latent into pixels, written as PNG under ``out_dir``; the state is dropped on every
  rank. Its measured seconds go to ``on_stage``.
* ``pause`` / ``resume``: ``rid``: nothing moves; ``setstep``: ``rid``, ``step``: position the scheduler;
  ``release``: ``rid``: drop the state; ``fetch``: ``rid``: latent, embeddings and step on the group's lead.
* ``load``: ``rank``, ``model``, ``component``, ``family``: on that rank only, build the component (tiny
  seeded, or a local checkpoint: ``ModelSource``) and move it to the device; backbones get SP hooks.
  ``unload``: drop it (``gc.collect()``, ``torch.cuda.empty_cache()`` on CUDA) and report whether it is
  really gone (a weak reference).

Modules are keyed by (catalog model, component); ``encode`` names the model (else the request's family is
the key, as callers that hold modules by family do). A stage needs its component on every rank that runs it:
once any ``load``/``unload`` has been seen (every rank sees every command, so all ranks agree) a missing one
is an error (``MissingWeights``, raised on every rank of the group, so no collective waits); before that
(no placement: every model everywhere) it is built on first use.
"""
from __future__ import annotations

import copy
import gc
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ditplan.executor.outputs import write_frames
from ditplan.executor.parallel import BlockGroups, SPContext
from ditplan.executor.sequence_parallel import SP_FAMILIES, enable_sequence_parallel
from ditplan.models.torch import LatentSpec, ModelSource, family, set_timesteps, to_frames
from ditplan.models.torch.csp import CSP_FAMILIES, SeqShard, csp_predict
from ditplan.models.torch.patch_cache import CachePolicy, PatchCache, RequestCache


@dataclass
class ResidentRequest:
    """A request resident on its ranks: embeddings, then latent and scheduler, kept across pauses."""

    spec: LatentSpec
    ranks: tuple[int, ...]
    cond: dict[str, torch.Tensor]  # the encode stage's output, batch dim 1
    latent: torch.Tensor | None = None  # drawn at the first diffuse step
    scheduler: object | None = None
    step: int = 0  # steps done
    paused: bool = False
    step_times: list[float] = field(default_factory=list)
    cache: RequestCache | None = None  # its patch cache (CSP runs with a cache policy); not migrated

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"cond/{k}": v for k, v in sorted(self.cond.items())}
        if self.latent is not None:
            out["latent"] = self.latent
        return out


class MissingWeights(RuntimeError):
    """A stage on a rank that does not hold the module it needs (with a placement)."""


COMPONENTS = ("backbone", "text", "vae")


def module_size(model) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers) of a module."""
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return params, nbytes


class Worker:
    def __init__(self, rank: int, world: int, source: ModelSource | None = None, device: str | None = None,
                 out_dir: str | Path | None = None, modules: dict[tuple[str, str], object] | None = None,
                 cache_policies: dict[str, CachePolicy] | None = None, csp_attention: str = "loop") -> None:
        """``source`` builds modules on load (or first use); ``modules``: held from the start, keyed by
        (model or family, component); ``out_dir``: where decode writes PNGs (None: nowhere);
        ``cache_policies``: request class -> patch-cache policy (a run's ``cache`` names them); ``csp_attention``:
        the CSP forward's per-image attention (``models/torch/csp.py``, ``ATTENTION``)."""
        self.rank, self.world = rank, world
        # NCCL (CUDA) needs device tensors; gloo (CPU) host ones
        self.device = torch.device(device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                                              else "cpu"))
        self.groups = BlockGroups(rank, world)
        self.ctx = SPContext(self.groups)
        self.source = source or ModelSource()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.cache_policies = dict(cache_policies or {})
        self.csp_attention = csp_attention
        self.modules: dict[tuple[str, str], object] = {}  # (catalog model or family, component) -> module
        self.placed = False  # a load or unload was seen: modules come only from loads
        for (key, comp), module in (modules or {}).items():
            self._hold(key, comp, key, module)
        self.on_weight = None  # on_weight(cmd, op, info): called on the acting rank after load/unload/lazy build
        self.model_of: dict[str, str] = {}  # request -> module key
        self.specs: dict[str, LatentSpec] = {}  # every request, on every rank
        self.where: dict[str, tuple[int, ...]] = {}  # its current group, on every rank
        self.states: dict[str, ResidentRequest] = {}  # only on the ranks of its group
        self.on_step = None  # on_step(cmd, index, steps, seconds): called on the lead after each step
        self.on_stage = None  # on_stage(cmd, seconds): called on the rank that ran an encode or decode
        self.should_stop = None  # should_stop(cmd, index) on the lead: stop this run at a step boundary
        self.stopped = False  # the last run stopped early

    # --- commands -------------------------------------------------------------------------------
    def handle(self, cmd: dict):
        return getattr(self, "_" + cmd["op"])(cmd)

    # --- weights ----------------------------------------------------------------------------------
    def _hold(self, key: str, comp: str, family_name: str, module) -> None:
        module = module.to(self.device)
        if comp == "backbone" and family_name in SP_FAMILIES:
            enable_sequence_parallel(module, family_name, self.ctx)
        self.modules[key, comp] = module

    def held(self) -> dict[str, int]:
        """What this rank holds: ``model/component`` -> parameters."""
        return {f"{k}/{c}": module_size(m)[0] for (k, c), m in sorted(self.modules.items())}

    def _built(self, key: str, family_name: str, comp: str) -> dict:
        t0 = time.perf_counter()
        self._hold(key, comp, family_name, self.source.build(family_name, comp))
        self._sync()
        params, nbytes = module_size(self.modules[key, comp])
        return {"module": True, "params": params, "bytes": nbytes, "seconds": time.perf_counter() - t0}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _load(self, cmd):
        self.placed = True
        if self.rank != cmd["rank"]:
            return None
        key, comp = cmd["model"], cmd["component"]
        if (key, comp) in self.modules:  # already built here: nothing to do
            params, nbytes = module_size(self.modules[key, comp])
            info = {"module": True, "params": params, "bytes": nbytes, "seconds": 0.0}
        else:
            info = self._built(key, cmd["family"], comp)
        info.update(name=f"{key}/{comp}", held=self.held())
        if self.on_weight is not None:
            self.on_weight(cmd, "load", info)
        return info

    def _unload(self, cmd):
        self.placed = True
        if self.rank != cmd["rank"]:
            return None
        key, comp = cmd["model"], cmd["component"]
        module = self.modules.pop((key, comp), None)
        info = {"name": f"{key}/{comp}", "module": module is not None, "params": 0, "bytes": 0, "gone": True}
        if module is not None:
            info["params"], info["bytes"] = module_size(module)
            ref = weakref.ref(module)
            del module
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            info["gone"] = ref() is None  # nothing else keeps the module (and its tensors) alive
        info.update(held=self.held())
        if self.on_weight is not None:
            self.on_weight(cmd, "unload", info)
        return info

    def _module(self, cmd, rid: str, ranks, comp: str):
        """The ``comp`` module that ``rid``'s stage needs, on every rank of ``ranks`` (built lazily without a
        placement)."""
        key, fam = self.model_of.get(rid, self.specs[rid].family), self.specs[rid].family
        if (key, comp) not in self.modules and not self.placed:
            info = self._built(key, fam, comp)
            if self.on_weight is not None:
                self.on_weight(cmd, "build", dict(info, name=f"{key}/{comp}", model=key, held=self.held()))
        have = (key, comp) in self.modules
        if self.placed and len(ranks) > 1:  # agree, so that no rank waits in a collective for a failed one
            flag = torch.tensor([int(have)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.groups.group(ranks))
            if not bool(flag.item()):
                raise MissingWeights(f"rank {self.rank}: {key}/{comp} is not resident on every rank of {ranks}"
                                     + ("" if have else " (not here)"))
        if not have:
            raise MissingWeights(f"rank {self.rank}: {key}/{comp} is not resident here"
                                 + (" (placement: load it first)" if self.placed else ""))
        return self.modules[key, comp]

    # --- stages -----------------------------------------------------------------------------------
    def _encode(self, cmd):
        rank, specs = cmd["rank"], list(cmd["specs"])
        for spec in specs:
            self.specs[spec.rid], self.where[spec.rid] = spec, (rank,)
            self.model_of[spec.rid] = cmd.get("model") or spec.family
        if self.rank != rank:
            return None
        texts = [self._module(cmd, spec.rid, (rank,), "text") for spec in specs]  # a lazy build is not encode time
        t0 = time.perf_counter()
        with torch.no_grad():
            for spec, text in zip(specs, texts):
                cond = family(spec.family).encode(text, spec, self.source.vae_scale(spec.family))
                self.states[spec.rid] = ResidentRequest(spec, (rank,), {k: v.contiguous() for k, v in cond.items()})
        self._sync()
        seconds = time.perf_counter() - t0
        if self.on_stage is not None:
            self.on_stage(cmd, seconds)
        return seconds

    def _prepare(self, st: ResidentRequest, model) -> None:
        """The initial latent (seeded: the same on every rank) and the positioned scheduler."""
        spec = st.spec
        st.scheduler = self.source.scheduler(spec.family)
        set_timesteps(st.scheduler, spec, begin=st.step)
        noise = family(spec.family).noise(model.config, spec, torch.Generator().manual_seed(spec.seed))
        st.latent = (noise * getattr(st.scheduler, "init_noise_sigma", 1.0)).to(self.device, model.dtype)

    def _run(self, cmd):
        rids = list(cmd["rids"])
        ranks = self.where[rids[0]]
        if any(self.where[r] != ranks for r in rids):
            raise ValueError(f"batch {rids} spans several groups")
        if self.rank not in ranks:
            return None
        states = [self.states[r] for r in rids]
        spec = states[0].spec
        if any(s.spec.family != spec.family for s in states):
            raise ValueError(f"batch {rids} mixes families {sorted({s.spec.family for s in states})}")
        policies = self._cache_policies(cmd, rids)
        uniform = all((s.spec.height, s.spec.width, s.spec.frames, s.step) ==
                      (spec.height, spec.width, spec.frames, states[0].step) for s in states)
        packed = not uniform or any(p is not None for p in policies)
        if packed and spec.family not in CSP_FAMILIES:
            raise ValueError(f"batch {rids} mixes shapes or step positions or asks for a patch cache, and "
                             f"{spec.family} has no CSP forward (CSP families: {', '.join(sorted(CSP_FAMILIES))})")
        fam = family(spec.family)
        if len(ranks) > 1 and not fam.sequence_parallel:
            raise ValueError(f"{spec.family} has no sequence parallelism: {rids} cannot run on {len(ranks)} ranks")
        steps = min(cmd["steps"], min(s.spec.steps - s.step for s in states))
        model = self._module(cmd, rids[0], ranks, "backbone")
        for s, policy in zip(states, policies):
            if s.latent is None:
                self._prepare(s, model)
            s.paused = False
            if policy is None:
                s.cache = None
            elif s.cache is None or s.cache.policy != policy:
                s.cache = RequestCache(policy)
        self.ctx.use(ranks)
        shard = SeqShard(self.ctx.pg, self.ctx.index, self.ctx.size) if len(ranks) > 1 else SeqShard()
        cache = PatchCache([s.cache for s in states]) if any(s.cache is not None for s in states) else None
        times = []
        with torch.no_grad():
            self.stopped = False
            for k in range(steps):
                if self._stop_here(cmd, k, ranks):
                    self.stopped = True
                    break
                t0 = time.perf_counter()
                if packed:
                    ts = [s.scheduler.timesteps[s.step] for s in states]
                    preds = csp_predict(spec.family, model, [s.spec for s in states],
                                        [_model_input(s.scheduler, s.latent, t) for s, t in zip(states, ts)],
                                        [s.cond for s in states], torch.stack(ts), shard, self.csp_attention, cache)
                else:
                    t = states[0].scheduler.timesteps[states[0].step]
                    ts = [t] * len(states)
                    x = torch.cat([_model_input(s.scheduler, s.latent, t) for s in states])
                    cond = {k: torch.cat([s.cond[k] for s in states]) for k in states[0].cond}
                    pred = fam.predict(model, spec, x, cond, t)
                    preds = [pred[i:i + 1] for i in range(len(states))]
                for s, t, p in zip(states, ts, preds):
                    s.latent = s.scheduler.step(p, t, s.latent).prev_sample
                    s.step += 1
                self._sync()
                times.append(time.perf_counter() - t0)
                if self.on_step is not None and self.rank == ranks[0]:
                    self.on_step(cmd, len(times) - 1, steps, times[-1])
        for s in states:
            s.step_times.extend(times)
        return times

    def _cache_policies(self, cmd, rids) -> list[CachePolicy | None]:
        """Each request's patch-cache policy from the run's ``cache`` (request -> class name; default off)."""
        names = cmd.get("cache") or {}
        out = []
        for rid in rids:
            name = names.get(rid, "off")
            if name != "off" and name not in self.cache_policies:
                raise ValueError(f"run {rids}: cache class {name!r} of {rid!r} is not one of the worker's "
                                 f"cache_policies ({', '.join(sorted(self.cache_policies)) or 'none'}) or 'off'")
            out.append(None if name == "off" else self.cache_policies[name])
        return out

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

    def _decode(self, cmd):
        rank, rids = cmd["rank"], list(cmd["rids"])
        if any(self.where[r] != (rank,) for r in rids):
            raise ValueError(f"decode of {rids} on rank {rank}: their latents are on "
                             f"{[self.where[r] for r in rids]} (migrate them to ({rank},) first)")
        out = None
        if self.rank == rank:
            for rid in rids:
                st = self.states[rid]
                if st.latent is None or st.step < st.spec.steps:
                    raise ValueError(f"decode of {rid} after {st.step} of its {st.spec.steps} steps")
            vaes = [self._module(cmd, rid, (rank,), "vae") for rid in rids]  # a lazy build is not decode time
            t0 = time.perf_counter()
            pixels, files = {}, {}
            with torch.no_grad():
                for rid, vae in zip(rids, vaes):
                    st = self.states[rid]
                    pixels[rid] = family(st.spec.family).decode(vae, st.latent, st.spec).float().cpu()
            self._sync()
            seconds = time.perf_counter() - t0
            for rid, px in pixels.items():  # the disk write is not part of the stage
                if self.out_dir is not None:
                    files[rid] = [str(p) for p in write_frames(self.out_dir, rid, to_frames(px))]
            if self.on_stage is not None:
                self.on_stage(cmd, seconds)
            out = {"seconds": seconds, "pixels": pixels, "files": files}
        for rid in rids:
            self._release({"rid": rid})
        return out

    # --- requests ----------------------------------------------------------------------------------
    def _setstep(self, cmd):
        """Position the request at ``step`` (the service's count), if it is not there already."""
        st = self.states.get(cmd["rid"])
        if st is not None and st.step != cmd["step"]:
            st.step = cmd["step"]
            if st.scheduler is not None:
                set_timesteps(st.scheduler, st.spec, begin=st.step)

    def _restore(self, cmd):
        """Put a checkpointed latent (``cmd["latent"]``, ``cmd["step"]`` steps in) in place of the request's
        own on the ranks of its group, which all take this command: it goes on from exactly there."""
        rid = cmd["rid"]
        st = self.states.get(rid)
        if st is None:
            return None
        if st.latent is None:  # encoded only: the scheduler and a latent of the right shape first
            self._prepare(st, self._module(cmd, rid, self.where[rid], "backbone"))
        latent = cmd["latent"]
        if latent.shape != st.latent.shape:
            raise ValueError(f"checkpoint of {rid!r}: latent {tuple(latent.shape)} does not match its "
                             f"{tuple(st.latent.shape)} (another --downscale?)")
        st.latent = latent.to(device=st.latent.device, dtype=st.latent.dtype)
        self._setstep({"rid": rid, "step": cmd["step"]})
        return None

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
            st = self.states.get(rid)
            header = None  # no state to send (its encode failed): every receiver fails too, none waits
            if st is not None:
                tensors = st.tensors()
                sched, moved = _scheduler_to(st.scheduler, torch.device("cpu"))
                header = {"step": st.step, "scheduler": sched, "moved": moved,
                          "tensors": [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]}
            for r in receivers:
                dist.send_object_list([header], dst=r)
                for x in tensors.values() if st is not None else ():
                    dist.send(x.contiguous(), r)
            if st is None:
                raise KeyError(f"rank {self.rank}: migrate of {rid}, which has no state here")
        elif self.rank in receivers:
            box = [None]
            dist.recv_object_list(box, src=src)
            header = box[0]
            if header is None:
                raise KeyError(f"rank {self.rank}: migrate of {rid}: rank {src} has no state to send")
            bufs = {k: torch.empty(shape, dtype=dtype, device=self.device) for k, shape, dtype in header["tensors"]}
            for x in bufs.values():
                dist.recv(x, src)
            sched, _ = _scheduler_to(header["scheduler"], self.device, only=header["moved"])
            self.states[rid] = ResidentRequest(
                self.specs[rid], new, {k.split("/", 1)[1]: v for k, v in bufs.items() if k.startswith("cond/")},
                latent=bufs.get("latent"), scheduler=sched, step=header["step"], paused=True)
        if self.rank in old and self.rank not in new:
            self.states.pop(rid, None)
        elif rid in self.states:
            self.states[rid].ranks = new

    def _fetch(self, cmd):
        """The request's latent, embeddings and step (on its group's lead; None elsewhere)."""
        rid = cmd["rid"]
        if self.rank == self.where[rid][0]:
            st = self.states[rid]
            return {"latent": None if st.latent is None else st.latent.detach().cpu().clone(), "step": st.step,
                    "cond": {k: v.detach().cpu().clone() for k, v in st.cond.items()}}
        return None


def _model_input(scheduler, latent: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's input scaling where it has one (EulerDiscrete divides by sqrt(sigma^2 + 1))."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latent if scale is None else scale(latent, t)


def _scheduler_to(scheduler, device: torch.device, only=None) -> tuple[object, list[str]]:
    """A copy of ``scheduler`` whose tensors (e.g. UniPC's solver history) elsewhere than ``device`` are moved
    there (``only``: just these attributes), and the names moved: what a migration ships and restores."""
    if scheduler is None:
        return None, []
    out, moved = copy.copy(scheduler), []
    for k, v in vars(scheduler).items():
        if only is not None and k not in only:
            continue
        if isinstance(v, torch.Tensor) and v.device != device:
            setattr(out, k, v.to(device))
        elif isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) and x.device != device for x in v):
            setattr(out, k, type(v)(x.to(device) if isinstance(x, torch.Tensor) else x for x in v))
        else:
            continue
        moved.append(k)
    return out, moved
