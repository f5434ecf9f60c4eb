"""CSP (Compressed Sparse Patch) batches, the planner's side: who may share one, and its step time.

PatchedServe (arXiv 2501.09253; code MiRaCLeXeoN/sduss) batches images of different resolutions, and at
different steps, as one forward pass over their patches (32x32 latent pixels each): linear layers run on
all tokens together, attention stays per image. The executor runs such batches
(``models/torch/csp.py``); this module is torch-free, for the planner and the simulator.

**Latency predictor.** sduss predicts a CSP batch's step time from the number of patches per resolution and
the number of resolutions. :class:`CspPredictor` is that predictor, written so that it extends to
resolutions it never saw: per (model, SP degree),

    t = c0 + c1 * n + c2 * sum_i p_i + c3 * sum_i p_i**2 + c4 * (resolutions - 1)

with ``n`` members and ``p_i`` member i's patches: the per-member text tokens cost ``c1``, the linear layers
scale with all patches, attention with each image's own patches squared, and every extra resolution runs
its own attention calls and gathers. The coefficients are fitted (non-negative least squares on relative
error) to

* the *prior*: the cost model's step times of same-shape batches (batch 1..4 over a grid of sides), which
  pin ``c0..c3``. ``c4`` cannot be seen there and starts at :data:`RESOLUTION_PRIOR` x ``c0`` (an
  estimate, until measured);
* *measured* CSP steps (:meth:`CspPredictor.observe`: executor reports, a profile), each weighted
  ``CspConfig.measured_weight``, so a handful of reports outweighs the prior. Each report refits its
  (model, degree): five unknowns, well under a millisecond.

A batch of one shape is not CSP: the cost model's batched step time rules it (``CostModel.batch_step_time``).
Encode and decode do not mix resolutions: a CSP batch runs them per shape, in batches of the shape's
batch limit (:func:`shape_groups`).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence, TypeVar

import numpy as np

from ditplan.models.catalog import ModelSpec, Shape, get_model

if TYPE_CHECKING:
    from ditplan.models.cost import CostModel

K = TypeVar("K")
PATCH_LATENT = 32  # latent pixels per patch side: PatchedServe's 256-px patch at VAE factor 8
MAX_BATCH = 12  # requests per CSP batch (sduss's limit)
RESOLUTION_PRIOR = 0.1  # c4 before any measurement, as a fraction of c0 (estimate)
PRIOR_BATCHES = (1, 2, 3, 4)


def patch_count(model: ModelSpec, shape: Shape) -> int:
    """Patches of one request's latent."""
    lh, lw = model.latent_hw(shape)
    return math.ceil(lh / PATCH_LATENT) * math.ceil(lw / PATCH_LATENT) * model.latent_frames(shape)


def features(patches: Sequence[int], resolutions: int) -> np.ndarray:
    """The predictor's feature row of a batch: members' patch counts and the number of distinct sizes."""
    p = np.asarray(patches, dtype=float)
    return np.array([1.0, len(p), p.sum(), (p * p).sum(), max(0, resolutions - 1)])


def predict(coef: Sequence[float], patches: Sequence[int], resolutions: int) -> float:
    """Seconds of one step of a batch with these members (``coef``: :meth:`CspPredictor.coefficients`)."""
    return float(np.dot(coef, features(patches, resolutions)))


def is_csp(model: ModelSpec, shapes: Sequence[Shape]) -> bool:
    """A batch of these shapes is a CSP batch: the model supports it and the shapes differ."""
    return model.csp and len(set(shapes)) > 1


def shape_groups(shapes: Iterable[K], limit: Callable[[K], int]) -> list[tuple[K, int]]:
    """(shape, count) pieces a stage that does not mix resolutions runs: equal shapes together, in chunks
    of at most ``limit(shape)``; sorted by shape. The planner's problem data groups by batch key
    (model, shape, steps) instead, which can only split a group the executor runs whole: conservative."""
    counts: dict[K, int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    out = []
    for s in sorted(counts):
        n, cap = counts[s], max(1, limit(s))
        out += [(s, cap)] * (n // cap) + ([(s, n % cap)] if n % cap else [])
    return out


@dataclass(frozen=True)
class CspConfig:
    measured_weight: float = 10.0  # one measured step counts as this many prior points
    window: int = 64  # measured steps kept per (model, degree)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.measured_weight) and self.measured_weight > 0):
            raise ValueError(f"csp measured_weight = {self.measured_weight!r} must be a positive number")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"csp window = {self.window!r} must be an integer >= 1")


@dataclass(frozen=True)
class CspFit:
    """One (model, degree)'s fitted coefficients and what they rest on."""

    model: str
    sp: int
    coef: tuple[float, ...]
    prior_points: int
    measured_points: int
    max_rel_error: float  # over the points fitted


class CspPredictor:
    """The CSP step-time predictor of one cost model (see the module doc)."""

    def __init__(self, cost: "CostModel", config: CspConfig = CspConfig()) -> None:
        self.cost = cost
        self.config = config
        self._fits: dict[tuple[str, int], CspFit] = {}
        self._measured: dict[tuple[str, int], deque] = {}
        for prof in cost.profiles:  # measured CSP steps of a profile on this GPU kind count as reports
            if prof.gpu == cost.gpu.name:
                for c in prof.csp:
                    self.observe(c.model, c.shapes, c.sp, c.step_s)

    def _prior_points(self, model: ModelSpec, sp: int) -> list[tuple[np.ndarray, float]]:
        side = PATCH_LATENT * model.vae_spatial
        out = []
        for i in range(1, model.max_height // side + 1):
            shape = Shape(i * side, i * side)
            if shape.height * shape.width > model.max_pixels or shape.width > model.max_width:
                break
            p = patch_count(model, shape)
            for b in PRIOR_BATCHES:
                out.append((features([p] * b, 1), self.cost.step_time(model, shape, sp, b)))
        return out

    def _fit(self, model: ModelSpec, sp: int) -> CspFit:
        from ditplan.models.cost import nnls

        prior = self._prior_points(model, sp)
        measured = list(self._measured.get((model.name, sp), ()))
        rows = np.array([f for f, _ in prior + measured])
        obs = np.array([t for _, t in prior + measured])
        weight = np.array([1.0] * len(prior) + [self.config.measured_weight] * len(measured))
        scaled = rows / obs[:, None] * weight[:, None]
        if not any(f[4] > 0 for f, _ in measured):  # c4 unseen: fit the rest, then the prior share of c0
            coef = np.append(nnls(scaled[:, :4], weight), 0.0)
            coef[4] = RESOLUTION_PRIOR * coef[0]
        else:
            coef = nnls(scaled, weight)
        err = float(np.max(np.abs(rows @ coef / obs - 1.0)))
        return CspFit(model.name, sp, tuple(float(c) for c in coef), len(prior), len(measured), err)

    def fit(self, model: str, sp: int) -> CspFit:
        key = (model, sp)
        hit = self._fits.get(key)
        if hit is None:
            spec = get_model(model)
            if not spec.csp:
                raise ValueError(f"{model} has no CSP batches (catalog csp = False)")
            if not spec.legal_sp(sp):
                raise ValueError(f"{model} does not run at SP degree {sp} (max {spec.max_sp})")
            hit = self._fits[key] = self._fit(spec, sp)
        return hit

    def coefficients(self, model: str, sp: int) -> tuple[float, ...]:
        return self.fit(model, sp).coef

    def step_time(self, model: ModelSpec, shapes: Sequence[Shape], sp: int) -> float:
        """Seconds of one step of a CSP batch of ``shapes`` at degree ``sp``."""
        return predict(self.coefficients(model.name, sp), [patch_count(model, s) for s in shapes],
                       len(set(shapes)))

    def observe(self, model: str, shapes: Sequence[Shape], sp: int, seconds: float) -> None:
        """A measured step of a CSP batch: refit (model, sp) with it."""
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"csp step seconds = {seconds!r} must be a positive number")
        spec = get_model(model)
        key = (model, sp)
        pts = self._measured.setdefault(key, deque(maxlen=self.config.window))
        pts.append((features([patch_count(spec, s) for s in shapes], len(set(shapes))), float(seconds)))
        self._fits.pop(key, None)
