"""``ditplan executor``: torch workers that take plans from ``ditplan serve`` and report measured steps.

Process layout: the command's process is the controller (plan stream in, step reports out); it spawns
N worker processes (one per device, one torch.distributed world: gloo on CPU, NCCL with CUDA). Every
command goes, in one global order, to every worker's own queue; a worker outside the command's group
skips it at once, so groups run concurrently and collectives never deadlock (each rank runs a
subsequence of one global order). The lead of a group puts each step's measured time on a result queue;
a controller thread turns them into ``ReportProgress`` calls (one per step, ``done`` on the last).
Ranks map to the executor's GPUs in order (``--first-gpu`` offsets them).

What runs: every family of the catalog, with its real diffusers classes (``models/torch``): tiny seeded
modules (SP as planned), unless ``--checkpoint FAMILY=PATH`` names a local diffusers checkpoint. Latent sizes
are the request's pixel size divided by ``--downscale`` (default 64 with tiny models, so CPU steps stay
short), rounded up to multiples of 8. Each stage is real work on the GPU the plan gives it: encode runs the
text encoders on the assignment's first GPU (the embeddings stay there), diffuse first moves the request to
its block (the embeddings, or the latent, go point-to-point from the old group's lead), decode moves the
latent to its GPU when it is elsewhere and runs the VAE there; ``--out-dir`` receives each decoded image as
``<request id>.png`` (a video as ``<request id>/frame_0000.png``, ...). Encode and decode report their
measured seconds (``StepReport.stage_seconds``), diffuse one report per step. The executor refuses to start
when the service's deployment (or, without one, the catalog) holds a model whose family it cannot run.

A run stops at its next step boundary when its request is released (cancelled, requeued) or a report
for it is refused: the controller marks it in a shared stop table, the group's lead reads the mark before
each step and broadcasts the decision to its group, and the assignment ends with an early ``done``.

Placement (a service started with ``--models``): the first plan update after connecting carries
``initial`` loads (the weights the deployment holds per GPU); later ones carry unloads, then loads, for the
GPU's rank only. A load really builds the component on that rank (tiny seeded, or ``--checkpoint``): the
backbone (with SP hooks), the text encoders or the VAE. Initial loads run before the first
assignment and are not reported; any other is reported (``StepReport.loaded``) once its rank has built it.
An unload drops the module and collects it. Every load/unload is logged with the parameters it built or
freed and what the rank holds (``weights: GPU ...`` lines). With a placement, a stage whose component is
not resident on its GPUs is an error: logged, and the assignment ends early (done, 0 steps). Without one
(no load ever received) every model is available everywhere: a component is built on first use.

Faults: a worker rank that dies (``kill -9``, a crash) stops the world (``launch.RankDied``) and the
executor leaves, which closes its plan stream: the service marks its GPUs lost and requeues their work from
the last reported step at once (``ditplan executor`` exits 4, a lost executor 3, so a supervisor restarts
it). With ``--checkpoint-dir`` the lead of every run writes each step's latents to the host before reporting
the step (``checkpoints.py``), and an executor given a request it does not hold, some steps in, resumes it
from the checkpoint at exactly that step; without one it goes on from fresh noise at that step.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import zlib

from ditplan.executor.checkpoints import CheckpointStore, CheckpointWriter
from ditplan.executor.runtime import Worker
from ditplan.models.torch import FAMILIES, LatentSpec, ModelSource

log = logging.getLogger("ditplan.executor")


def _heads(world: int) -> int:
    return max(4, min(8, world))  # enough heads for every SP degree up to ``world``


def model_source(checkpoints: dict[str, str], world: int = 4) -> ModelSource:
    """Tiny seeded modules with heads for every SP degree up to ``world``; a family's checkpoint where given."""
    return ModelSource(dict(checkpoints), heads=_heads(world))


class UnsupportedModel(ValueError):
    """A model the executor was asked to serve whose family it has no torch implementation of."""


def check_runnable(models, families=FAMILIES) -> None:
    """Refuse, naming each, models whose family is not among ``families`` (the ones this executor runs)."""
    from ditplan.models.catalog import get_model
    bad = sorted({(m, get_model(m).family) for m in models if get_model(m).family not in families})
    if bad:
        raise UnsupportedModel("the torch executor cannot run " + ", ".join(f"{m} (family {f!r})" for m, f in bad)
                               + f"; it runs the families {', '.join(families)}")


def served_models(info) -> list[str]:
    """The models a service serves: its deployment's (``ServerInfo.placement``), else every catalog model."""
    from ditplan.models.catalog import CATALOG
    placed = {w.split("/", 1)[0] for gpu in info.placement for w in gpu}
    return sorted(placed or CATALOG)


def latent_side(pixels: int, downscale: int) -> int:
    """``pixels / downscale`` rounded up to a multiple of 8: the 2x2-patch token grid then divides by 16, so
    every SP degree up to 8 splits the image tokens evenly."""
    return -(-max(1, pixels // downscale) // 8) * 8


STOP_SLOTS = 256  # shared stop table: slot cid % STOP_SLOTS holds cid + 1 when run cid must stop


def worker_main(rank: int, world: int, commands, results, checkpoints: dict[str, str], stops=None,
                checkpoint_dir: str | None = None, out_dir: str | None = None) -> int:
    """One device: execute commands from this rank's queue until ``stop``; returns commands executed.
    ``checkpoint_dir``: where the lead of a run writes each step's latents before reporting the step;
    ``out_dir``: where decoded images go."""
    worker = Worker(rank, world, model_source(checkpoints, world), out_dir=out_dir)
    writer = CheckpointWriter(CheckpointStore(checkpoint_dir), results.put) if checkpoint_dir else None
    put = writer.put if writer is not None else (lambda item, latents=(): results.put(item))

    def on_step(cmd, i, n, seconds):
        put(("step", cmd["id"], i, n, seconds), step_latents(worker, cmd["rids"]) if writer is not None else ())

    worker.on_step = on_step
    worker.on_stage = lambda cmd, s: put(("stage", cmd["id"], s))
    worker.on_weight = lambda cmd, op, info: put(("weight", cmd["id"], rank, op, info))
    if stops is not None:
        worker.should_stop = lambda cmd, k: stops[cmd["id"] % STOP_SLOTS] == cmd["id"] + 1
    warm_up(worker)
    results.put(("ready", rank))
    done = 0
    parent = os.getppid()
    while True:
        try:
            cmd = commands.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the controller died without saying stop: do not linger
                return done
            continue
        if cmd["op"] == "stop":
            if writer is not None:
                writer.close()
            return done
        try:
            if cmd["op"] == "restore":
                restore_latent(worker, cmd)
            else:
                times = worker.handle(cmd)
                lead = cmd["op"] == "run" and rank == worker.where[cmd["rids"][0]][0]
                if lead and (times == [] or worker.stopped):
                    put(("nothing", cmd["id"]))  # stopped early or nothing left: the assignment ends
        except Exception as exc:  # noqa: BLE001 - report and go on; the controller fails the assignment
            log.exception("rank %d: %s failed", rank, cmd["op"])
            put(("error", cmd.get("id"), rank, repr(exc)))
        done += 1


def warm_up(worker: Worker) -> None:
    """Before a rank says ready: build one tiny backbone, which imports the model libraries (seconds of a
    CPU core), so the first request the rank runs is not charged for it (a module then builds in
    milliseconds). Only with tiny models: a checkpoint is loaded when its placement says so."""
    if not worker.source.checkpoints:
        worker.source.build("flux", "backbone")


def step_latents(worker: Worker, rids) -> list[tuple]:
    """On a run's lead, after a step: each request's (id, steps done, a copy of its latent) (the next step
    replaces it), for the checkpoint writer."""
    return [(rid, worker.states[rid].step, worker.states[rid].latent.detach().clone()) for rid in rids]


def restore_latent(worker: Worker, cmd: dict) -> None:
    """On every rank: the request's latent from checkpoint ``cmd["path"]`` at ``cmd["step"]``, restored by the
    ranks of its group (``Worker`` op ``restore``)."""
    if cmd["rid"] not in worker.states:
        return
    latent = CheckpointStore.load(cmd["path"], cmd["rid"], cmd["step"])
    worker.handle({"op": "restore", "id": cmd["id"], "rid": cmd["rid"], "step": cmd["step"], "latent": latent})


class Controller:
    """Turns plan updates into worker commands and step results into reports (runs in the parent)."""

    def __init__(self, link, world: int, first_gpu: int, downscale: int, commands, results, stops=None,
                 store: CheckpointStore | None = None) -> None:
        self.link, self.world, self.first_gpu, self.downscale = link, world, first_gpu, downscale
        self.commands, self.results, self.stops = commands, results, stops
        self.store = store  # latent checkpoints (None: requeued requests restart from noise)
        self.running: dict[int, tuple[str, ...]] = {}  # run command id -> request ids, until its done report
        self.where: dict[str, tuple[int, ...]] = {}  # the workers' view, mirrored
        self.runs: dict[int, tuple] = {}  # command id -> (epoch, ids, stage)
        self._ids = itertools.count()
        self.assignments_run = 0
        self.errors: list[str] = []
        # Placement: set by the first load or unload; then stages run only where their component is resident.
        self.placed = False
        self.resident: dict[int, set[tuple[str, str]]] = {}  # GPU -> (model, component), as commanded
        self.held: dict[int, dict[str, int]] = {}  # GPU -> module -> parameters, as its rank last said
        self.loads: dict[int, tuple] = {}  # load command id -> (epoch, WeightLoad, initial), until built
        self.weight_events: list[dict] = []  # every load / unload / lazy build a rank acknowledged
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_results, name="executor-results", daemon=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        ready = 0
        deadline = time.monotonic() + timeout
        while ready < self.world:
            kind, *rest = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            if kind == "ready":
                ready += 1
            elif kind == "error":
                raise RuntimeError(f"executor workers failed to start: {rest}")
        self._reader.start()

    def send(self, cmd: dict, cid: int | None = None) -> int:
        cmd = dict(cmd, id=next(self._ids) if cid is None else cid)
        for q in self.commands:
            q.put(cmd)
        return cmd["id"]

    def ranks(self, gpus) -> tuple[int, ...]:
        return tuple(g - self.first_gpu for g in gpus)

    def spec(self, rid: str) -> LatentSpec:
        from ditplan.models.catalog import get_model
        data = self.link.requests[rid]
        family = get_model(data.model).family
        if family not in FAMILIES:  # refused at start (check_runnable); never faked
            raise UnsupportedModel(f"{rid}: the torch executor cannot run {data.model} (family {family!r})")
        h, w = latent_side(data.height, self.downscale), latent_side(data.width, self.downscale)
        return LatentSpec(rid, family, h, w, data.steps, seed=zlib.crc32(rid.encode()), frames=data.frames)

    # --- stages ---------------------------------------------------------------------------------
    def _stage_cmd(self, epoch: int, ids: tuple[str, ...], stage, cmd: dict) -> None:
        """Send an encode or decode command whose rank answers with its measured seconds."""
        cid = next(self._ids)
        self.runs[cid] = (epoch, ids, stage)  # before the workers can answer
        self.running[cid] = ids
        self.send(cmd, cid)

    def encode(self, epoch: int, ids: tuple[str, ...], rank: int, model: str) -> None:
        """Encode ``ids`` on ``rank``: their embeddings stay there until a diffuse block takes them."""
        from ditplan.planner.request import Stage
        for rid in ids:  # encoded again (re-planned): the old state goes first
            if self.where.pop(rid, None) is not None:
                self.send({"op": "release", "rid": rid})
        self._stage_cmd(epoch, ids, Stage.ENCODE,
                        {"op": "encode", "specs": [self.spec(rid) for rid in ids], "model": model, "rank": rank})
        for rid in ids:
            self.where[rid] = (rank,)

    def decode(self, epoch: int, ids: tuple[str, ...], rank: int) -> bool:
        """Decode ``ids`` on ``rank``, each latent moved there first if it is elsewhere; False (nothing sent)
        if a latent is not on this executor."""
        from ditplan.planner.request import Stage
        if lost := [rid for rid in ids if rid not in self.where]:
            why = f"{ids}: decode of {lost}, whose latents this executor does not hold; ending the assignment early"
            log.error("%s", why)
            self.errors.append(why)
            return False
        for rid in ids:
            if self.where[rid] != (rank,):
                self.send({"op": "migrate", "rid": rid, "ranks": (rank,)})
        self._stage_cmd(epoch, ids, Stage.DECODE, {"op": "decode", "rids": list(ids), "rank": rank})
        for rid in ids:
            del self.where[rid]  # the workers drop the state once decoded
        return True

    def ensure(self, rid: str, ranks: tuple[int, ...], start_step: int) -> bool:
        """The request's state on ``ranks`` at ``start_step`` (its embeddings or latent moved there); a request
        this executor never encoded (requeued from elsewhere) is encoded first where its text encoders are.
        False (nothing sent) if no GPU of this executor holds them."""
        from ditplan.planner.request import Stage
        if rid not in self.where:
            model = self.link.requests[rid].model
            rank = next((r for r in (ranks[0], *range(self.world))
                         if not self.missing(model, Stage.ENCODE, (r + self.first_gpu,))), None)
            if rank is None:
                why = f"{rid}: no embeddings here and no GPU of this executor holds {model}/text"
                log.error("%s; ending the assignment early", why)
                self.errors.append(why)
                return False
            self.send({"op": "encode", "specs": [self.spec(rid)], "model": model, "rank": rank})
            self.where[rid] = (rank,)
            if self.where[rid] != ranks:
                self.send({"op": "migrate", "rid": rid, "ranks": ranks})
                self.where[rid] = ranks
            if start_step > 0:
                self.resume(rid, start_step)
        elif self.where[rid] != ranks:
            self.send({"op": "migrate", "rid": rid, "ranks": ranks})
        self.where[rid] = ranks
        self.send({"op": "setstep", "rid": rid, "step": start_step})
        return True

    def resume(self, rid: str, step: int) -> None:
        """A request new to this executor, ``step`` steps in: its latent from the checkpoint at exactly that
        step (the service's last reported one), if there is one; else it goes on from fresh noise."""
        path = self.store.find(rid, step) if self.store is not None else None
        if path is None:
            log.info("checkpoint: none for %s at step %d; going on from fresh noise", rid, step)
            return
        self.send({"op": "restore", "rid": rid, "step": step, "path": str(path)})
        self.store.note_resume(rid, step, self.link.executor_id)
        log.info("checkpoint: resuming %s at step %d from %s", rid, step, path)

    def _send(self, what: str, *args, level: int = logging.INFO, **kw) -> bool:
        """One StepReport to the service; False (logged at ``level``) if it refused it (cancelled, re-planned)."""
        from ditplan.planner.service.client import PlannerError
        from ditplan.planner.service.messages import StepReport
        try:
            self.link.report(StepReport(self.link.executor_id, *args, **kw))
            return True
        except PlannerError as exc:
            log.log(level, "%s refused: %s", what, exc.details)
            return False

    def _report(self, *args, **kw) -> bool:
        return self._send(f"report for {args[1]}", *args, **kw)

    def _report_loaded(self, epoch: int, weight) -> bool:
        return self._send(f"loaded report for {weight.model}/{weight.component} on GPU {weight.gpu}", epoch,
                          loaded=(weight,), level=logging.WARNING)

    def _report_load_failed(self, epoch: int, weight) -> None:
        self._send(f"load_failed report for {weight.model}/{weight.component} on GPU {weight.gpu}", epoch,
                   load_failed=(weight,), level=logging.WARNING)

    # --- placement ------------------------------------------------------------------------------
    def _weight_cmd(self, op: str, w, epoch: int = 0, initial: bool = False) -> None:
        from ditplan.models.catalog import get_model
        rank = w.gpu - self.first_gpu
        if not 0 <= rank < self.world:
            log.warning("%s of %s/%s for GPU %d: not one of this executor's GPUs; ignored", op, w.model,
                        w.component, w.gpu)
            return
        held = self.resident.setdefault(w.gpu, set())
        if op == "load":
            held.add((w.model, w.component))
            cid = next(self._ids)
            self.loads[cid] = (epoch, w, initial)  # before the rank can answer
            self.send({"op": "load", "rank": rank, "model": w.model, "component": w.component,
                       "family": get_model(w.model).family}, cid)
        else:
            held.discard((w.model, w.component))
            self.send({"op": "unload", "rank": rank, "model": w.model, "component": w.component})

    def missing(self, model: str, stage, gpus) -> list[int]:
        """With a placement: the GPUs of ``gpus`` that lack the component ``stage`` runs on."""
        from ditplan.models.catalog import STAGE_COMPONENT
        if not self.placed:
            return []
        comp = STAGE_COMPONENT[stage.value]
        return [g for g in gpus if (model, comp) not in self.resident.get(g, ())]

    def _on_weight(self, cid: int, rank: int, op: str, info: dict) -> None:
        gpu = rank + self.first_gpu
        self.held[gpu] = dict(info["held"])
        name = info["name"]
        if op == "build":
            note = "built on first use: no placement"
        elif op == "unload":
            note = "freed" if info["gone"] else "NOT freed: something still holds the module"
        elif (load := self.loads.pop(cid, None)) is None:
            note = "no such load command"
        elif load[2]:
            note = "initial: not reported"
        else:
            note = "reported loaded" if self._report_loaded(load[0], load[1]) else "loaded report refused"
        event = dict(info, gpu=gpu, op=op, name=name, note=note)
        self.weight_events.append(event)
        log.info("weights: GPU %d %s %s: module=%s params=%d bytes=%d%s (%s); holds %s, %d params", gpu, op, name,
                 "yes" if info["module"] else "no", info["params"], info["bytes"],
                 f" gone={'yes' if info['gone'] else 'no'}" if "gone" in info else
                 f" seconds={info.get('seconds', 0.0):.3f}", note,
                 ",".join(f"{k}={v}" for k, v in info["held"].items()) or "no-module",
                 sum(info["held"].values()))

    def stop_run(self, cid: int) -> None:
        """Ask run ``cid`` to stop at its next step boundary (its lead decides, its group follows)."""
        if self.stops is not None:
            self.stops[cid % STOP_SLOTS] = cid + 1

    def _read_results(self) -> None:
        while not self._stop.is_set():
            try:
                kind, *rest = self.results.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "step":
                cid, i, n, seconds = rest
                epoch, ids, stage = self.runs[cid]
                if i == n - 1:
                    self.running.pop(cid, None)
                if not self._report(epoch, ids, stage, 1, (seconds,), i == n - 1) and i < n - 1:
                    self.stop_run(cid)  # the service no longer wants this work
            elif kind == "stage":  # an encode or decode ended: one report with its measured seconds
                cid, seconds = rest
                if cid not in self.runs:  # an encode of a requeued request, part of its diffuse assignment
                    continue
                epoch, ids, stage = self.runs[cid]
                self.running.pop(cid, None)
                self._report(epoch, ids, stage, 0, (), True, stage_seconds=seconds)
            elif kind == "weight":
                self._on_weight(*rest)
            elif kind == "nothing" or (kind == "error" and rest[0] in self.running):
                # stopped before any step (only reported steps count; the service replans the rest);
                # an error on several ranks of a group ends the assignment once
                epoch, ids, stage = self.runs[rest[0]]
                self.running.pop(rest[0], None)
                self._report(epoch, ids, stage, 0, (), True)
                if kind == "error":
                    self.errors.append(str(rest))
            elif kind == "error" and rest[0] in self.loads:
                epoch, w, initial = self.loads.pop(rest[0])
                self.resident.get(w.gpu, set()).discard((w.model, w.component))
                log.error("weights: GPU %d load %s/%s failed: %s", w.gpu, w.model, w.component, rest[2])
                self.errors.append(str(rest))
                if not initial:  # the service frees the GPU and forgets the weights
                    self._report_load_failed(epoch, w)
            elif kind == "error":
                self.errors.append(str(rest))

    def handle(self, delta) -> None:
        from ditplan.models.catalog import STAGE_COMPONENT
        from ditplan.planner.request import Stage
        for cid, ids in list(self.running.items()):  # cancelled or requeued while running: stop at a boundary
            if set(ids) & set(delta.released):
                self.stop_run(cid)
        if delta.unloads or delta.loads:
            self.placed = True
        for w in delta.unloads:  # first, then loads in order per GPU, then the rest (one queue per rank)
            self._weight_cmd("unload", w)
        for ld in delta.loads:
            self._weight_cmd("load", ld.weight, delta.plan_epoch, ld.initial)
        for rid in delta.released:
            if self.where.pop(rid, None) is not None:
                self.send({"op": "release", "rid": rid})
        for m in delta.migrations:
            if m.request_id in self.where:
                self.where[m.request_id] = self.ranks(m.to_gpus)
                self.send({"op": "migrate", "rid": m.request_id, "ranks": self.ranks(m.to_gpus)})
        for p in delta.pauses:
            if p.request_id in self.where:
                self.send({"op": "pause", "rid": p.request_id})
        epoch = delta.plan_epoch
        for a in delta.assignments:
            if not a.lead:
                continue
            self.assignments_run += 1
            ranks, ids = self.ranks(a.gpus), tuple(a.request_ids)
            model = self.link.requests[ids[0]].model
            if lacking := self.missing(model, a.stage, a.gpus):
                why = (f"{ids}: {a.stage.value} needs {model}/{STAGE_COMPONENT[a.stage.value]}, not resident on "
                       f"GPU(s) {lacking}; ending the assignment early")
                log.error("%s", why)
                self.errors.append(why)
                self._report(epoch, ids, a.stage, 0, (), True)
            elif a.stage is Stage.ENCODE:  # one GPU runs it: the block's first
                self.encode(epoch, ids, ranks[0], model)
            elif a.stage is Stage.DECODE:
                if self.store is not None:
                    for rid in ids:
                        self.store.drop(rid)  # its last checkpoint is not needed once decode is under way
                if not self.decode(epoch, ids, ranks[0]):
                    self._report(epoch, ids, a.stage, 0, (), True)
            elif a.steps > 0:
                if all([self.ensure(rid, ranks, a.start_step) for rid in ids]):
                    cid = next(self._ids)
                    self.runs[cid] = (epoch, ids, a.stage)  # before the workers can answer
                    self.running[cid] = ids
                    self.send({"op": "run", "rids": list(ids), "steps": a.steps}, cid)
                else:
                    self._report(epoch, ids, a.stage, 0, (), True)

    def close(self) -> None:
        for q in self.commands:
            q.put({"op": "stop"})
        self._stop.set()
        if self._reader.is_alive():
            self._reader.join(5)
        for gpu in sorted(set(self.resident) | set(self.held)):
            log.info("weights at exit: GPU %d resident %s; modules %s", gpu,
                     ",".join(f"{m}/{c}" for m, c in sorted(self.resident.get(gpu, ()))) or "-",
                     ",".join(f"{k}={v}" for k, v in self.held.get(gpu, {}).items()) or "-")


class ExecutorLost(RuntimeError):
    """The service declared this executor lost and requeued its work: it must be started again."""


class RanksFailed(RuntimeError):
    """The worker ranks did not come up; ``detail`` is the failing rank's traceback."""

    def __init__(self, detail: str) -> None:
        lines = [x for x in detail.strip().splitlines() if x.strip()]
        super().__init__(f"worker ranks failed to start: {lines[-1].strip() if lines else 'no error given'}")
        self.detail = detail


def run_executor(server: str, devices: int, executor_id: str = "executor0", first_gpu: int = 0,
                 downscale: int = 64, checkpoints: dict[str, str] | None = None, token: str | None = None,
                 heartbeat_s: float = 1.0, max_idle_s: float | None = None, checkpoint_dir: str | None = None,
                 out_dir: str | None = None) -> int:
    """Serve plans with ``devices`` workers until the plan stream ends (or ``max_idle_s`` without updates);
    ``UnsupportedModel`` before any worker starts if the service serves a model this executor cannot run.

    ``checkpoint_dir``: latent checkpoints (``checkpoints.py``); ``out_dir``: decoded images. A worker rank
    that dies raises ``RankDied`` once the other ranks are stopped; leaving closes the plan stream, so the
    service requeues this executor's work at once."""
    import torch.multiprocessing as mp

    from ditplan.executor.launch import RankDied, spawn_world
    from ditplan.planner.service.client import PlannerClient, PlannerError
    from ditplan.planner.service.executor_link import ExecutorLink

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_source(checkpoints or {}, devices)
    except ValueError as exc:  # a --checkpoint family it cannot run
        raise UnsupportedModel(f"--checkpoint: {exc}") from None
    client = PlannerClient(server, token=token, timeout=30)
    try:
        check_runnable(served_models(client.info()))
    except BaseException:
        client.close()
        raise
    mpctx = mp.get_context("spawn")
    commands = [mpctx.Queue() for _ in range(devices)]
    results = mpctx.Queue()
    stops = mpctx.Array("q", STOP_SLOTS, lock=False)
    failure: list[BaseException] = []

    def world():
        try:
            spawn_world(_worker_entry, devices, commands, results, dict(checkpoints or {}), stops, checkpoint_dir,
                        out_dir,
                        timeout=float("inf"))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the controller
            failure.append(exc)
            results.put(("error", None, -1, repr(exc)))

    runner = threading.Thread(target=world, name="executor-world", daemon=True)
    runner.start()
    link = None
    lost = None
    try:
        store = CheckpointStore(checkpoint_dir) if checkpoint_dir else None
        ctl = Controller(None, devices, first_gpu, downscale, commands, results, stops, store)
        try:
            ctl.wait_ready()
        except RuntimeError:
            runner.join(30)
            if failure and isinstance(failure[0], RankDied):
                raise failure[0] from None
            raise RanksFailed(str(failure[0]) if failure else "a rank reported an error") from None
        if failure:
            raise failure[0]
        link = ExecutorLink(client, executor_id, range(first_gpu, first_gpu + devices), heartbeat_s=heartbeat_s)
        ctl.link = link
        print(f"ditplan executor {executor_id}: {devices} worker(s) on GPUs {first_gpu}..{first_gpu + devices - 1},"
              f" server {server}", flush=True)
        idle_since = time.monotonic()
        try:
            while not failure:
                try:
                    delta = link.next_update(timeout=1.0)
                except TimeoutError:
                    if max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                        break
                    continue
                except PlannerError as exc:
                    log.warning("plan stream ended: %s", exc.details)
                    if exc.code.name == "ABORTED":  # declared lost: the service requeued our work
                        lost = exc
                    break
                ctl.handle(delta)
                idle_since = time.monotonic()
        finally:
            ctl.close()
        runner.join(60)
        if failure:
            raise failure[0]
        if lost is not None:
            raise ExecutorLost(f"the service declared executor {executor_id!r} lost ({lost.details}); "
                               f"{ctl.assignments_run} assignment(s) ran; start it again to reconnect")
        return ctl.assignments_run
    finally:
        if link is not None:
            link.close()
        client.close()


def _worker_entry(rank, world, commands, results, checkpoints, stops, checkpoint_dir, out_dir):
    return worker_main(rank, world, commands[rank], results, checkpoints, stops, checkpoint_dir, out_dir)
