"""``ditplan profile``: measure step, encode and decode times on the local devices; write a profile.

One world of ``devices`` ranks (``spawn_world``: gloo on CPU, NCCL on CUDA; one thread per CPU rank,
as ``ditplan executor`` runs them), each a ``Worker`` holding the model's backbone built as the
executor builds it (``executor/service.py`` ``model_source``: tiny seeded, or a local checkpoint).
For every (degree k, shape, batch), the first aligned block of k ranks runs a batch of requests one
step at a time: each step is timed on the block's lead from a barrier to a device sync (the span the
executor reports: the model call and the scheduler step), the first ``warmup`` are dropped and the
median of the next ``repeats`` is the point, with their interquartile range. Blocks are measured
one after another, so no two share the CPU.

CSP batches (``csp``, ``ditplan profile --csp``): for a model the executor runs CSP batches of
(``models/torch/csp.py`` ``CSP_FAMILIES``, and flagged ``csp`` in the catalog), one batch of one request per
shape for every pair of distinct shapes and, with three or more, all of them together (``csp_mixes``), at each
degree, timed as the step points; each is a ``csp`` row (``CspPoint``). A mix whose members' latents come out
the same (the rounding below) is timed as the executor runs it: one stock batch.

Encode and decode are timed on rank 0 per (shape, batch) by what the executor runs for those
stages: the pipeline's own text encoders, and its VAE on a latent one step in (each op times itself,
without a module's first build, as the executor's reports do). Every stage row records what ran in
``stage_impl``.

Latent sizes follow the executor's rule (``latent_side``): pixels / ``downscale`` (64 for tiny
models, as ``ditplan executor`` defaults; 8, the real VAE factor, for checkpoints), rounded up to a
multiple of 8. The profile is filed under a GPU kind (``gpu``), the cost model's key: the one given
(``ditplan profile --gpu``), else the CUDA device's kind when recognised, else the default cluster's;
its provenance records the device it really ran on (docs/architecture.md, "Profiles and cost
refinement").
"""
from __future__ import annotations

import datetime
import itertools
import platform
import re
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ditplan.models.catalog import CATALOG, SP_DEGREES, Shape
from ditplan.models.gpus import GPU_KINDS
from ditplan.models.profiles import CspPoint, Profile, ProfilePoint, StagePoint

SCALES = ("tiny", "full")
DOWNSCALE = {"tiny": 64, "full": 8}
ENCODE_IMPL = "the pipeline's text encoders (models/torch/encoders.py)"
DECODE_IMPL = "the pipeline's VAE decoder (models/torch/vae.py)"


class ProfileInputError(ValueError):
    """A bad ``ditplan profile`` option; the message names the flag and the value."""


@dataclass(frozen=True)
class ProfileJob:
    """What to measure: validated by ``make_job``."""

    model: str
    scale: str  # tiny | full
    shapes: tuple[Shape, ...]
    degrees: tuple[int, ...]
    batches: tuple[int, ...]
    devices: int
    checkpoint: str | None = None
    warmup: int = 3
    repeats: int = 10
    downscale: int = 64
    gpu: str | None = None  # None: the CUDA device's kind, else ``fallback_gpu``
    fallback_gpu: str = "H100"
    command: str = ""
    timeout_s: float = 3600.0
    csp: bool = False  # also CSP batches of the shapes' mixes (``csp_mixes``)

    @property
    def family(self) -> str:
        return CATALOG[self.model].family


@dataclass(frozen=True)
class Measured:
    """One measurement's samples (seconds), warm-up dropped."""

    what: str  # "step" | "encode" | "decode" | "csp"
    shape: Shape  # csp: the mix's first member
    sp: int
    batch: int
    samples: tuple[float, ...]
    mix: tuple[Shape, ...] = ()  # csp: one shape per member

    @property
    def label(self) -> str:
        """What was measured, for progress lines: ``step 256x256 sp1 batch 1``, ``csp 256x256+512x512 sp1``."""
        if self.what == "csp":
            return f"csp {'+'.join(map(str, self.mix))} sp{self.sp}"
        where = f" sp{self.sp}" if self.what == "step" else ""
        return f"{self.what} {self.shape}{where} batch {self.batch}"

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]


# --- options ------------------------------------------------------------------------------------------
def parse_shapes(text: str) -> tuple[Shape, ...]:
    """``--shapes``: comma-separated ``SIZE`` (square), ``HxW`` or ``HxWxF`` (frames), in pixels."""
    out = []
    for item in _items("--shapes", text):
        parts = item.lower().split("x")
        if len(parts) > 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ProfileInputError(f"--shapes: {item!r} is not SIZE, HxW or HxWxF (positive pixels, frames)")
        sizes = [int(p) for p in parts]
        if len(sizes) == 1:
            sizes.append(sizes[0])
        out.append(Shape(*sizes))
    return tuple(dict.fromkeys(out))


def parse_counts(flag: str, text: str) -> tuple[int, ...]:
    """``--degrees`` / ``--batches``: comma-separated positive integers."""
    out = []
    for item in _items(flag, text):
        if not item.isdigit() or int(item) < 1:
            raise ProfileInputError(f"{flag}: {item!r} is not a positive integer")
        out.append(int(item))
    return tuple(sorted(set(out)))


def _items(flag: str, text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise ProfileInputError(f"{flag}: {text!r} must be a comma-separated list with no empty entries")
    return items


def csp_mixes(shapes: tuple[Shape, ...]) -> tuple[tuple[Shape, ...], ...]:
    """The CSP batches ``--csp`` measures: every pair of distinct shapes, then (three or more) all of them."""
    pairs = tuple(itertools.combinations(shapes, 2))
    return pairs + ((shapes,) if len(shapes) > 2 else ())


def make_job(model: str, scale: str, shapes: str, degrees: str, batches: str, devices: int,
             checkpoint: str | None = None, warmup: int = 3, repeats: int = 10, downscale: int | None = None,
             gpu: str | None = None, fallback_gpu: str = "H100", command: str = "", csp: bool = False) -> ProfileJob:
    """Validate the options of ``ditplan profile``; :class:`ProfileInputError` names the bad one."""
    from ditplan.executor.sequence_parallel import SP_FAMILIES
    from ditplan.models.torch import FAMILIES as TORCH_FAMILIES
    from ditplan.models.torch.csp import CSP_FAMILIES

    if model not in CATALOG:
        raise ProfileInputError(f"--model {model!r} is unknown; known: {', '.join(sorted(CATALOG))}")
    spec = CATALOG[model]
    if spec.family not in TORCH_FAMILIES:
        raise ProfileInputError(f"--model {model!r}: its family {spec.family!r} has no torch model in the executor "
                                f"(families with one: {', '.join(TORCH_FAMILIES)})")
    if scale not in SCALES:
        raise ProfileInputError(f"--model-scale {scale!r} must be one of {', '.join(SCALES)}")
    if scale == "full" and not checkpoint:
        raise ProfileInputError("--model-scale full needs --checkpoint PATH (a local diffusers checkpoint)")
    if scale == "tiny" and checkpoint:
        raise ProfileInputError(f"--checkpoint {checkpoint!r} is for --model-scale full; tiny models are built "
                                "from code")
    if not 1 <= devices <= max(SP_DEGREES):
        raise ProfileInputError(f"--devices {devices} must be 1..{max(SP_DEGREES)}")
    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise ProfileInputError(f"--devices {devices}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    for flag, value, low in (("--warmup", warmup, 0), ("--repeats", repeats, 1)):
        if value < low:
            raise ProfileInputError(f"{flag} {value} must be >= {low}")
    if downscale is not None and downscale < 1:
        raise ProfileInputError(f"--downscale {downscale} must be >= 1")
    sizes = parse_shapes(shapes)
    for s in sizes:
        if (bad := spec.size_problem(s.height, s.width, s.frames, 1)) is not None:
            key, value, why = bad
            raise ProfileInputError(f"--shapes: {s} ({key} {value}) {why}")
    ks = parse_counts("--degrees", degrees)
    for k in ks:
        if k not in SP_DEGREES or not spec.legal_sp(k):
            raise ProfileInputError(f"--degrees: {k} is not an SP degree of {model} "
                                    f"({', '.join(map(str, spec.sp_degrees()))})")
        if k > devices:
            raise ProfileInputError(f"--degrees: {k} needs {k} devices; --devices is {devices}")
        if k > 1 and spec.family not in SP_FAMILIES:
            raise ProfileInputError(f"--degrees: {k}: the executor has no sequence parallelism for {spec.family!r} "
                                    "yet; use --degrees 1")
    bs = parse_counts("--batches", batches)
    if csp:
        if spec.family not in CSP_FAMILIES:
            raise ProfileInputError(f"--csp: {model}'s family {spec.family!r} has no CSP forward in the executor "
                                    f"(CSP families: {', '.join(sorted(CSP_FAMILIES))})")
        if not spec.csp:
            raise ProfileInputError(f"--csp: {model} runs no CSP batches in the catalog (its csp flag is off), so a "
                                    "profile cannot carry csp rows for it")
        if len(sizes) < 2:
            raise ProfileInputError(f"--csp needs two or more distinct --shapes to mix, not {shapes!r}")
    if gpu is not None and gpu.upper() not in GPU_KINDS:
        raise ProfileInputError(f"--gpu {gpu!r} is not one of {', '.join(GPU_KINDS)}")
    return ProfileJob(model, scale, sizes, ks, bs, devices, checkpoint, warmup, repeats,
                      DOWNSCALE[scale] if downscale is None else downscale,
                      gpu.upper() if gpu else None, fallback_gpu.upper(), command, csp=csp)


# --- measurement (in every rank) ------------------------------------------------------------------------
class _Clock:
    """Times a span on the ranks of a block: from a barrier to a device sync."""

    def __init__(self, worker) -> None:
        self.worker = worker

    def _sync(self) -> None:
        if self.worker.device.type == "cuda":
            torch.cuda.synchronize(self.worker.device)

    def time(self, ranks: tuple[int, ...], fn: Callable[[], object]) -> float:
        """Seconds of ``fn()`` on this rank (every rank of ``ranks`` calls it; 0.0 elsewhere)."""
        w = self.worker
        if w.rank not in ranks:
            fn()
            return 0.0
        self._sync()
        if len(ranks) > 1:  # start together: a collective's wait is then the block's, not a straggler's
            dist.all_reduce(torch.zeros(1, device=w.device), group=w.groups.group(ranks))
        t0 = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - t0


def _specs(job: ProfileJob, tag: str, shape: Shape, batch: int, steps: int):
    from ditplan.executor.service import latent_side
    from ditplan.models.torch import LatentSpec

    h, w = latent_side(shape.height, job.downscale), latent_side(shape.width, job.downscale)
    return [LatentSpec(f"{tag}-{shape}-b{batch}-{i}", job.family, h, w, steps, seed=i, frames=shape.frames)
            for i in range(batch)]


def _steps(worker, clock: _Clock, job: ProfileJob, k: int, shape: Shape, batch: int) -> Measured:
    ranks = tuple(range(k))
    specs = _specs(job, f"k{k}", shape, batch, job.warmup + job.repeats)
    _encoded(worker, job, specs, ranks)
    run = {"op": "run", "rids": [s.rid for s in specs], "steps": 1}
    times = [clock.time(ranks, lambda: worker.handle(run)) for _ in range(job.warmup + job.repeats)]
    for s in specs:
        worker.handle({"op": "release", "rid": s.rid})
    return Measured("step", shape, k, batch, tuple(times[job.warmup:]))


def _csp_steps(worker, clock: _Clock, job: ProfileJob, k: int, mix: tuple[Shape, ...]) -> Measured:
    """One CSP batch of one request per shape of ``mix`` on the first block of ``k`` ranks, timed as ``_steps``."""
    ranks = tuple(range(k))
    steps = job.warmup + job.repeats
    specs = [s for i, shape in enumerate(mix) for s in _specs(job, f"csp-k{k}-{i}", shape, 1, steps)]
    _encoded(worker, job, specs, ranks)
    run = {"op": "run", "rids": [s.rid for s in specs], "steps": 1}
    times = [clock.time(ranks, lambda: worker.handle(run)) for _ in range(steps)]
    for s in specs:
        worker.handle({"op": "release", "rid": s.rid})
    return Measured("csp", mix[0], k, len(mix), tuple(times[job.warmup:]), mix)


def _encoded(worker, job: ProfileJob, specs, ranks: tuple[int, ...]) -> float:
    """Encode ``specs`` on the block's first rank (the real text encoders) and move them onto ``ranks``, as
    the executor does for a diffuse block; the encode's own seconds on that rank (0.0 elsewhere)."""
    seconds = worker.handle({"op": "encode", "specs": specs, "model": job.model, "rank": ranks[0]})
    if len(ranks) > 1:
        for s in specs:
            worker.handle({"op": "migrate", "rid": s.rid, "ranks": ranks})
    return seconds or 0.0


def _stages(worker, clock: _Clock, job: ProfileJob, shape: Shape, batch: int) -> tuple[Measured, Measured]:
    """Encode and decode as the executor runs them for an assignment on one GPU (rank 0): the pipeline's
    text encoders, and its VAE on a latent one step in. Each op times itself (a module's first build is not
    counted, as in the executor's reports)."""
    ranks = (0,)
    enc, dec = [], []
    for rep in range(job.warmup + job.repeats):
        specs = _specs(job, f"stage{rep}", shape, batch, 1)
        enc.append(_encoded(worker, job, specs, ranks))
        worker.handle({"op": "run", "rids": [s.rid for s in specs], "steps": 1})
        out = worker.handle({"op": "decode", "rids": [s.rid for s in specs], "rank": 0})
        dec.append(out["seconds"] if out else 0.0)
    return (Measured("encode", shape, 1, batch, tuple(enc[job.warmup:])),
            Measured("decode", shape, 1, batch, tuple(dec[job.warmup:])))


def _device(worker) -> dict:
    if worker.device.type == "cuda":
        return {"device_type": "cuda", "device": torch.cuda.get_device_name(worker.device),
                "cuda": torch.version.cuda}
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"device_type": "cpu", "device": f"cpu ({cpu})", "threads_per_rank": torch.get_num_threads()}


def _rank_main(rank: int, world: int, job: ProfileJob, events) -> dict | None:
    from ditplan.executor.runtime import Worker
    from ditplan.executor.service import model_source

    ckpts = {job.family: job.checkpoint} if job.checkpoint else {}
    worker = Worker(rank, world, model_source(ckpts, world))
    clock = _Clock(worker)
    out = []
    for k in job.degrees:
        for shape in job.shapes:
            for b in job.batches:
                m = _steps(worker, clock, job, k, shape, b)
                if rank == 0:
                    out.append(m)
                    events.put(m)
    for k in job.degrees if job.csp else ():
        for mix in csp_mixes(job.shapes):
            m = _csp_steps(worker, clock, job, k, mix)
            if rank == 0:
                out.append(m)
                events.put(m)
    for shape in job.shapes:
        for b in job.batches:
            ms = _stages(worker, clock, job, shape, b)
            if rank == 0:
                out.extend(ms)
                for m in ms:
                    events.put(m)
    return {"measured": out, "torch": torch.__version__, **_device(worker)} if rank == 0 else None


def measurements(job: ProfileJob) -> int:
    """How many ``Measured`` a run of ``job`` yields (for a progress bar)."""
    cells = len(job.shapes) * len(job.batches)
    mixes = len(csp_mixes(job.shapes)) if job.csp else 0
    return (cells + mixes) * len(job.degrees) + 2 * cells


def measure(job: ProfileJob, on_measured: Callable[[Measured], None] | None = None) -> Profile:
    """Run ``job`` on ``job.devices`` ranks; the profile (``on_measured`` sees each result as it lands)."""
    import torch.multiprocessing as mp

    from ditplan.executor.launch import spawn_world

    events = mp.get_context("spawn").Queue()
    box: dict = {}

    def world() -> None:
        try:
            box["result"] = spawn_world(_rank_main, job.devices, job, events, timeout=job.timeout_s)[0]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc
        finally:
            events.put(None)

    runner = threading.Thread(target=world, name="ditplan-profile", daemon=True)
    runner.start()
    while (m := events.get()) is not None:
        if on_measured is not None:
            on_measured(m)
    runner.join()
    if "error" in box:
        raise box["error"]
    return to_profile(job, box["result"])


def gpu_kind(device_name: str) -> str | None:
    """The GPU kind a CUDA device name names (``NVIDIA H100 80GB HBM3`` -> ``H100``), if any."""
    for name in GPU_KINDS:
        if re.search(rf"\b{re.escape(name)}\b", device_name.upper()):
            return name
    return None


def _sig(x: float) -> float:
    """Six significant digits: timer resolution is far coarser than a float's."""
    return float(f"{x:.6g}")


def to_profile(job: ProfileJob, result: dict) -> Profile:
    """The measured profile of ``job`` from rank 0's ``result``, with its provenance."""
    device_kind = gpu_kind(result["device"]) if result["device_type"] == "cuda" else None
    gpu = job.gpu or device_kind or job.fallback_gpu
    filed = "--gpu" if job.gpu else "the CUDA device's kind" if device_kind else (
        f"no GPU kind of its own: filed under {gpu}, the default cluster's kind, so what-if and serve on "
        f"{gpu} clusters use these numbers as they are (--gpu files them under another kind)")
    provenance = {
        "source": "ditplan profile",
        "device": result["device"],
        "device_type": result["device_type"],
        **{k: result[k] for k in ("cuda", "threads_per_rank") if k in result},
        "devices": job.devices,
        "torch": result["torch"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": job.command,
        "model_scale": job.scale,
        **({"checkpoint": job.checkpoint} if job.checkpoint else {}),
        "gpu_filed_as": filed,
        "latent_downscale": job.downscale,
        "method": (f"per (shape, SP degree, batch): {job.warmup} warm-up steps dropped, then the median of "
                   f"{job.repeats} steps, each timed on the block's lead from a barrier to a device sync; "
                   "iqr_s is their interquartile range. Encode and decode on one device, timed by the ops themselves."
                   + (" CSP rows: the same per (mix of shapes, one request each, SP degree)." if job.csp else "")),
        "stage_impl": {"encode": ENCODE_IMPL, "decode": DECODE_IMPL},
    }
    points, stages, csp = [], [], []
    for m in result["measured"]:
        median, iqr = _sig(m.median), _sig(m.iqr)
        if m.what == "step":
            points.append(ProfilePoint(job.model, m.shape, m.sp, m.batch, median, iqr))
        elif m.what == "csp":
            csp.append(CspPoint(job.model, m.mix, m.sp, median, iqr))
        else:
            stages.append(StagePoint(job.model, m.shape, m.what, m.batch, median, iqr,
                                     ENCODE_IMPL if m.what == "encode" else DECODE_IMPL))
    name = f"{job.model}-{job.scale}-{gpu.lower()}-{result['device_type']}"
    return Profile(name, gpu, "profile", provenance, tuple(points), tuple(stages), csp=tuple(csp))

