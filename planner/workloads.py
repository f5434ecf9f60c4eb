"""Built-in synthetic workloads from the papers ditplan unifies.

Each generator is ``fn(n, rate, seed, **opts) -> list[TraceRecord]``: fully
deterministic for a seed, ids ``r000000``, ``r000001``, ... in arrival order,
the first arrival at t = 0, times rounded to 6 decimals (so a written trace
reads back identical), and ``slo_scale`` left unset so the caller's
``--slo-scale`` applies.

Arrivals and request mix draw from independent streams of the seed, so at
one seed a rate sweep scales the same arrival pattern and keeps the same mix.

Every workload takes the arrival options ``arrival`` (``"poisson"`` or
``"bursty"``: gamma inter-arrivals with coefficient of variation ``cv``, same
mean rate) and ``cv`` (default 4).

Default ``n`` and ``rate`` load an 8xH100 cluster to roughly 60% of its
GPU-seconds, counting each request at SP degree 1 (its cheapest) with the
H100 cost model: moderate load, where policies differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ditplan.planner.errors import InputError
from ditplan.planner.traces import FLOAT_DECIMALS, TraceRecord

ARRIVALS = ("poisson", "bursty")
ARRIVAL_OPTIONS: dict[str, object] = {"arrival": "poisson", "cv": 4.0}
TETRISERVE_SIDES = (256, 512, 1024, 2048)
PATCHEDSERVE_SIDES = (512, 768, 1024)
GENSERVE_FRAMES = (17, 33, 49)

Generator = Callable[..., list[TraceRecord]]


@dataclass(frozen=True, eq=False)
class Workload:
    """A registered generator with its defaults."""

    name: str
    description: str
    fn: Generator
    default_n: int
    default_rate: float  # requests per second
    options: Mapping[str, object] = field(default_factory=dict)  # option -> default

    def generate(self, n: int | None = None, rate: float | None = None, seed: int = 0,
                 **opts: object) -> list[TraceRecord]:
        n = self.default_n if n is None else n
        rate = self.default_rate if rate is None else rate
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise InputError(f"workload {self.name!r} has no option {unknown[0]!r}; "
                             f"options: {', '.join(sorted(self.options))}")
        return self.fn(n, rate, seed, **{**self.options, **opts})


# --- shared pieces ------------------------------------------------------------

def _check(n: int, rate: float, seed: int) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise InputError(f"n must be an integer >= 1, got {n!r}")
    if (not isinstance(rate, (int, float, np.number)) or isinstance(rate, bool)
            or not math.isfinite(rate) or rate <= 0):
        raise InputError(f"rate must be a positive number of requests/s, got {rate!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (arrival, mix) generators of one seed."""
    a, b = np.random.SeedSequence(int(seed)).spawn(2)
    return np.random.default_rng(a), np.random.default_rng(b)


def arrival_times(rng: np.random.Generator, n: int, rate: float, arrival: str = "poisson",
                  cv: float = 4.0) -> np.ndarray:
    """``n`` arrival times from t = 0, mean rate ``rate``, rounded to 6 decimals.

    ``poisson``: exponential gaps. ``bursty``: gamma gaps, shape 1/cv^2 and
    scale cv^2/rate, so the mean gap stays 1/rate and its CV is ``cv``.
    """
    if arrival == "poisson":
        gaps = rng.standard_exponential(n) / rate
    elif arrival == "bursty":
        if not isinstance(cv, (int, float)) or isinstance(cv, bool) or not math.isfinite(cv) or cv <= 0:
            raise InputError(f"cv must be a positive number, got {cv!r}")
        shape = 1.0 / (cv * cv)
        gaps = rng.standard_gamma(shape, n) / (shape * rate)
    else:
        raise InputError(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    times = np.cumsum(gaps) - gaps[0]
    return np.round(times, FLOAT_DECIMALS)


def _records(times: np.ndarray, specs: Sequence[tuple[str, int, int, int, int]]) -> list[TraceRecord]:
    """TraceRecords from arrival times and (model, height, width, frames, steps)."""
    width = max(6, len(str(len(specs) - 1)))
    return [TraceRecord(id=f"r{i:0{width}d}", arrival=float(t) + 0.0, model=m, height=int(h),
                        width=int(w), frames=int(f), steps=int(s))
            for i, (t, (m, h, w, f, s)) in enumerate(zip(times, specs))]


def _squares(model: str, sides: np.ndarray, steps: int) -> list[tuple[str, int, int, int, int]]:
    return [(model, int(L), int(L), 1, steps) for L in sides]


# --- generators ---------------------------------------------------------------

def tetriserve_uniform(n: int, rate: float, seed: int, *, arrival: str = "poisson",
                       cv: float = 4.0) -> list[TraceRecord]:
    """FLUX.1-dev squares, side uniform over 256/512/1024/2048, 28 steps (TetriServe)."""
    return tetriserve_skewed(n, rate, seed, alpha=0.0, arrival=arrival, cv=cv)


def tetriserve_skewed(n: int, rate: float, seed: int, *, alpha: float = 1.0,
                      arrival: str = "poisson", cv: float = 4.0) -> list[TraceRecord]:
    """FLUX.1-dev squares with p(L) proportional to exp(alpha L / Lmax) (TetriServe)."""
    _check(n, rate, seed)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InputError(f"alpha must be a finite number, got {alpha!r}")
    rng_t, rng_m = _streams(seed)
    times = arrival_times(rng_t, n, rate, arrival, cv)
    sides = np.array(TETRISERVE_SIDES)
    w = np.exp(alpha * sides / sides.max())
    chosen = rng_m.choice(sides, size=n, p=w / w.sum())
    return _records(times, _squares("flux-dev", chosen, 28))


def genserve_mixed(n: int, rate: float, seed: int, *, video_share: float = 0.3,
                   arrival: str = "poisson", cv: float = 4.0) -> list[TraceRecord]:
    """SD3 1024^2 images (28 steps) mixed with CogVideoX 480x720 videos (GenServe)."""
    _check(n, rate, seed)
    if (not isinstance(video_share, (int, float)) or isinstance(video_share, bool)
            or not 0.0 <= video_share <= 1.0):
        raise InputError(f"video_share must be a number in [0, 1], got {video_share!r}")
    rng_t, rng_m = _streams(seed)
    times = arrival_times(rng_t, n, rate, arrival, cv)
    is_video = rng_m.random(n) < video_share
    frames = rng_m.choice(np.array(GENSERVE_FRAMES), size=n)
    specs = [("cogvideox-5b", 480, 720, int(f), 50) if v else ("sd3-medium", 1024, 1024, 1, 28)
             for v, f in zip(is_video, frames)]
    return _records(times, specs)


# Video shapes of the co-serving mix, per model (each model's common serving size).
COSERVE_VIDEO_HW: dict[str, tuple[int, int]] = {
    "cogvideox-5b": (480, 720), "hunyuanvideo": (544, 960), "wan2.1-t2v-14b": (480, 832)}


def coserve_mixed(n: int, rate: float, seed: int, *, video_share: float = 0.3,
                  videos: str = "cogvideox-5b", arrival: str = "poisson", cv: float = 4.0) -> list[TraceRecord]:
    """FLUX.1-dev 1024^2 images (28 steps) mixed with 17/33/49-frame videos (50 steps) of one or more
    video models (``videos``: comma-separated), which cannot all be resident on one GPU."""
    _check(n, rate, seed)
    if (not isinstance(video_share, (int, float)) or isinstance(video_share, bool)
            or not 0.0 <= video_share <= 1.0):
        raise InputError(f"video_share must be a number in [0, 1], got {video_share!r}")
    models = [m.strip() for m in str(videos).split(",") if m.strip()]
    bad = [m for m in models if m not in COSERVE_VIDEO_HW]
    if not models or bad:
        raise InputError(f"videos = {videos!r}: give video models among {', '.join(COSERVE_VIDEO_HW)}")
    rng_t, rng_m = _streams(seed)
    times = arrival_times(rng_t, n, rate, arrival, cv)
    is_video = rng_m.random(n) < video_share
    frames = rng_m.choice(np.array(GENSERVE_FRAMES), size=n)
    which = rng_m.integers(0, len(models), size=n)
    specs = []
    for v, f, w in zip(is_video, frames, which):
        if v:
            h, wd = COSERVE_VIDEO_HW[models[w]]
            specs.append((models[w], h, wd, int(f), 50))
        else:
            specs.append(("flux-dev", 1024, 1024, 1, 28))
    return _records(times, specs)


def patchedserve_mixed(n: int, rate: float, seed: int, *, arrival: str = "poisson",
                       cv: float = 4.0) -> list[TraceRecord]:
    """SD3 squares, side uniform over 512/768/1024, 28 steps (PatchedServe)."""
    _check(n, rate, seed)
    rng_t, rng_m = _streams(seed)
    times = arrival_times(rng_t, n, rate, arrival, cv)
    chosen = rng_m.choice(np.array(PATCHEDSERVE_SIDES), size=n)
    return _records(times, _squares("sd3-medium", chosen, 28))


# --- registry -----------------------------------------------------------------

WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("tetriserve-uniform",
             "FLUX.1-dev images, side uniform over 256-2048 px, 28 steps, Poisson (TetriServe, arXiv 2510.01565)",
             tetriserve_uniform, default_n=200, default_rate=0.9, options=dict(ARRIVAL_OPTIONS)),
    Workload("tetriserve-skewed",
             "FLUX.1-dev images, p(side) ~ exp(alpha*L/Lmax) skewed to large, 28 steps (TetriServe, arXiv 2510.01565)",
             tetriserve_skewed, default_n=200, default_rate=0.6,
             options={"alpha": 1.0, **ARRIVAL_OPTIONS}),
    Workload("genserve-mixed",
             "SD3 1024px images + CogVideoX 480x720 17/33/49-frame videos, Poisson or bursty (GenServe, arXiv 2604.04335)",
             genserve_mixed, default_n=200, default_rate=0.5,
             options={"video_share": 0.3, **ARRIVAL_OPTIONS}),
    Workload("coserve-mixed",
             "FLUX.1-dev 1024px images + 17/33/49-frame videos of CogVideoX (or HunyuanVideo, Wan2.1: "
             "videos=...), models that do not all fit on one GPU (placement)",
             coserve_mixed, default_n=200, default_rate=0.45,
             options={"video_share": 0.3, "videos": "cogvideox-5b", **ARRIVAL_OPTIONS}),
    Workload("patchedserve-mixed",
             "SD3 images, side uniform over 512/768/1024 px, 28 steps, Poisson (PatchedServe, arXiv 2501.09253)",
             patchedserve_mixed, default_n=400, default_rate=4.0, options=dict(ARRIVAL_OPTIONS)),
)}


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise InputError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}") from None


def generate(name: str, n: int | None = None, rate: float | None = None, seed: int = 0,
             **opts: object) -> list[TraceRecord]:
    """Records of workload ``name``; ``n``/``rate`` default to the workload's."""
    return get_workload(name).generate(n, rate, seed, **opts)
