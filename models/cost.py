"""Cost model: step and stage times for (model, shape, SP degree, batch, GPU).

Two layers:

* a **roofline** per step, ``overhead + a*compute + g*comm + weights``, from
  the model's shape (FLOPs, Ulysses all-to-all bytes, weight bytes read) and
  the GPU; ``overhead`` (host-side, GPU-independent), ``a`` and ``g`` are fitted
  per model on the published tables (non-negative least squares on relative
  error); the weight read is a physical floor and is not fitted;
* **profile tables** interpolated log-log in sequence tokens, which the cost
  model reproduces exactly at profiled points. A query the tables do not cover
  (another GPU kind, batch, link, or a shape outside the table) is anchored on
  the nearest table value and scaled by the roofline ratio, so shapes and GPUs
  without a table still get an estimate. Models with no table at all use the
  roofline with the median coefficients of the fitted models.

On top, a running service refines step times from measured reports (``models/refine.py``):
``with_corrections`` gives a ``CorrectedCostModel``, a view whose step times are the prior (the two
layers above) times a factor per (model, shape, SP degree, batch).

VAE decode does not take an SP degree: it does not speed up with k (GenServe).
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from ditplan.models.catalog import BF16_BYTES, CATALOG, ModelSpec, Shape
from ditplan.models.gpus import GpuKind, get_gpu
from ditplan.models.profiles import Profile, builtin_profiles

if TYPE_CHECKING:
    from ditplan.models.csp import CspPredictor

STAGE_OVERHEAD_S = 0.005
VAE_EFFICIENCY = 0.35  # fraction of peak a conv VAE decoder reaches (estimate)
ENCODER_EFFICIENCY = 0.5


@dataclass(frozen=True)
class RooflineTerms:
    """Uncalibrated seconds of one denoising step on one GPU of the group."""

    compute: float  # FLOPs / peak FLOP/s
    weights: float  # weight bytes / memory bandwidth
    comm: float  # all-to-all bytes / link bandwidth

    def as_row(self) -> tuple[float, float, float]:
        return (1.0, self.compute, self.comm)


@dataclass(frozen=True)
class Calibration:
    """Fitted roofline coefficients of one model."""

    overhead_s: float
    compute_scale: float
    comm_scale: float
    source: str = "fit"

    def predict(self, t: RooflineTerms) -> float:
        return self.overhead_s + self.compute_scale * t.compute + self.comm_scale * t.comm + t.weights


def default_link_bw(gpu: GpuKind, sp: int) -> float:
    """Bandwidth of the slowest link inside an aligned block of ``sp`` GPUs."""
    if sp == 1:
        return math.inf
    if gpu.link == "nvswitch" or (gpu.link == "nvlink-pairs" and sp == 2):
        return gpu.link_bw
    return gpu.pcie_bw


def roofline_terms(model: ModelSpec, shape: Shape, sp: int, batch: int, gpu: GpuKind,
                   link_bw: float | None = None) -> RooflineTerms:
    seq = model.seq_tokens(shape)
    linear = 2.0 * model.params_b * 1e9 * seq
    attention = 4.0 * model.layers * seq * seq * model.hidden
    if not model.joint_text and model.text_tokens:
        attention += 4.0 * model.layers * seq * model.text_tokens * model.hidden  # cross-attn
    compute = batch * (linear + attention) / sp / gpu.bf16_flops
    weights = model.params_b * 1e9 * BF16_BYTES / gpu.mem_bw
    comm = 0.0
    if sp > 1:
        bw = default_link_bw(gpu, sp) if link_bw is None else link_bw
        # Ulysses: 4 all-to-alls a layer (q, k, v, out), each moving the local
        # shard's (k-1)/k share.
        per_gpu = 4 * model.layers * (seq / sp) * model.hidden * BF16_BYTES * batch * (sp - 1) / sp
        comm = per_gpu / bw
    return RooflineTerms(compute, weights, comm)


def nnls(rows: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative least squares by enumerating active sets (a handful of unknowns)."""
    n = rows.shape[1]
    best, best_err = np.zeros(n), math.inf
    for r in range(1, n + 1):
        for cols in itertools.combinations(range(n), r):
            sol, *_ = np.linalg.lstsq(rows[:, cols], target, rcond=None)
            if np.any(sol < 0):
                continue
            full = np.zeros(n)
            full[list(cols)] = sol
            err = float(np.sum((rows @ full - target) ** 2))
            if err < best_err:
                best, best_err = full, err
    return best


def fit_calibration(model: ModelSpec, gpu: GpuKind,
                    points: Iterable[tuple[Shape, int, int, float]]) -> Calibration:
    """Fit the roofline to (shape, sp, batch, seconds) points, minimising relative error."""
    pts = list(points)
    terms = [roofline_terms(model, s, k, b, gpu) for s, k, b, _ in pts]
    rows = np.array([t.as_row() for t in terms])
    obs = np.array([t for *_, t in pts])
    floor = np.array([t.weights for t in terms])
    coef = nnls(rows / obs[:, None], 1.0 - floor / obs)
    return Calibration(*map(float, coef))


@dataclass
class _Table:
    """Step times of one (model, GPU, sp, batch) against sequence tokens."""

    tokens: list[int]
    seconds: list[float]

    def lookup(self, tokens: int) -> tuple[int, float]:
        """(anchor tokens, seconds): exact/interpolated inside, nearest edge outside."""
        xs, ys = self.tokens, self.seconds
        if tokens <= xs[0]:
            return xs[0], ys[0]
        if tokens >= xs[-1]:
            return xs[-1], ys[-1]
        i = bisect.bisect_left(xs, tokens)
        if xs[i] == tokens:
            return tokens, ys[i]
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        w = (math.log(tokens) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return tokens, math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))


class CostModel:
    """Step and stage times on one GPU kind."""

    corrections: Mapping[tuple[str, Shape, int, int], float] = MappingProxyType({})  # none: the prior

    def __init__(self, gpu: GpuKind | str = "H100", profiles: Sequence[Profile] | None = None) -> None:
        self.gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
        self.profiles = list(builtin_profiles() if profiles is None else profiles)
        self._tables: dict[tuple[str, str, int, int], _Table] = {}
        grouped: dict[tuple[str, str, int, int], dict[int, list[float]]] = {}
        for prof in self.profiles:
            for p in prof.points:
                tok = CATALOG[p.model].seq_tokens(p.shape)
                grouped.setdefault((p.model, prof.gpu, p.sp, p.batch), {}).setdefault(tok, []).append(p.step_s)
        for key, by_tok in grouped.items():
            toks = sorted(by_tok)
            self._tables[key] = _Table(toks, [float(np.mean(by_tok[t])) for t in toks])
        self._stage_points = {(s.model, prof.gpu, s.stage, s.batch, CATALOG[s.model].seq_tokens(s.shape)
                               if s.stage == "encode" else s.shape): s.seconds
                              for prof in self.profiles for s in prof.stages}
        self._batch_rules = next((p.batch_rules for p in self.profiles if p.batch_rules), ())
        self.calibrations = self._fit_all()
        self._cache: dict[tuple, float] = {}

    # --- calibration -------------------------------------------------------
    def _fit_all(self) -> dict[str, Calibration]:
        fitted: dict[str, Calibration] = {}
        for name, model in CATALOG.items():
            for prof in self.profiles:
                pts = [(p.shape, p.sp, p.batch, p.step_s) for p in prof.points if p.model == name]
                if len(pts) >= 4:
                    fitted[name] = fit_calibration(model, get_gpu(prof.gpu), pts)
                    break
        if fitted:
            med = np.median([[c.overhead_s, c.compute_scale, c.comm_scale]
                             for c in fitted.values()], axis=0)
            prior = Calibration(*map(float, med), source="median of fitted models")
        else:
            prior = Calibration(0.01, 1.0, 1.0, source="uncalibrated roofline")
        return {name: fitted.get(name, prior) for name in CATALOG}

    def roofline_step(self, model: ModelSpec, shape: Shape, sp: int, batch: int = 1,
                      gpu: GpuKind | None = None, link_bw: float | None = None) -> float:
        g = gpu or self.gpu
        return self.calibrations[model.name].predict(roofline_terms(model, shape, sp, batch, g, link_bw))

    # --- step time ---------------------------------------------------------
    def _anchor(self, model: ModelSpec, sp: int, batch: int) -> tuple[_Table, GpuKind, int] | None:
        for gpu_name in (self.gpu.name, *sorted({g for (_, g, _, _) in self._tables} - {self.gpu.name})):
            for b in (batch, 1):
                table = self._tables.get((model.name, gpu_name, sp, b))
                if table is not None:
                    return table, get_gpu(gpu_name), b
        return None

    def step_time(self, model: ModelSpec, shape: Shape, sp: int, batch: int = 1,
                  link_bw: float | None = None) -> float:
        """Seconds of one denoising step of a batch on an SP group of degree ``sp``."""
        key = (model.name, shape, sp, batch, link_bw)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if not model.legal_sp(sp):
            raise ValueError(f"{model.name} does not run at SP degree {sp} (max {model.max_sp})")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        query = self.roofline_step(model, shape, sp, batch, self.gpu, link_bw)
        anchor = self._anchor(model, sp, batch)
        if anchor is None:
            value = query
        else:
            table, table_gpu, table_batch = anchor
            tokens = model.seq_tokens(shape)
            anchor_tokens, seconds = table.lookup(tokens)
            anchor_shape = shape if anchor_tokens == tokens else _shape_with_tokens(model, shape, anchor_tokens)
            base = self.roofline_step(model, anchor_shape, sp, table_batch, table_gpu)
            value = seconds * query / base
        self._cache[key] = value
        return value

    prior_step_time = step_time  # without online corrections, on a corrected view too

    def with_corrections(self, factors: Mapping[tuple[str, Shape, int, int], float]) -> "CorrectedCostModel":
        """This cost model with its step times scaled by ``factors[(model, shape, sp, batch)]``
        (``StepRefiner.corrections()``)."""
        return CorrectedCostModel(self, factors)

    @property
    def csp(self) -> "CspPredictor":
        """The CSP batch step-time predictor fitted on this cost model (``models/csp.py``); shared with
        every corrected view of it."""
        pred = self.__dict__.get("_csp")
        if pred is None:
            from ditplan.models.csp import CspPredictor

            pred = self._csp = CspPredictor(self)
        return pred

    def batch_step_time(self, model: ModelSpec, shapes: Sequence[Shape], sp: int,
                        link_bw: float | None = None) -> float:
        """Seconds of one denoising step of a batch of ``shapes``: a same-shape batch by
        :meth:`step_time`, a mixed-resolution (CSP) batch by the CSP predictor."""
        from ditplan.models.csp import is_csp

        if not shapes:
            raise ValueError("a batch needs at least one member")
        if is_csp(model, shapes):
            return self.csp.step_time(model, shapes, sp)
        if len(set(shapes)) > 1:
            raise ValueError(f"{model.name} has no CSP batches: it cannot batch shapes "
                             f"{', '.join(sorted({str(s) for s in shapes}))} together")
        return self.step_time(model, shapes[0], sp, len(shapes), link_bw)

    def stage_time(self, stage: str, model: ModelSpec, shapes: Sequence[Shape]) -> float:
        """Seconds of a batched ``encode`` or ``decode`` of ``shapes``: per shape, in batches of its limit
        (these stages do not mix resolutions, ``models/csp.py``)."""
        from ditplan.models.csp import shape_groups

        if stage not in ("encode", "decode"):
            raise ValueError(f"stage must be encode or decode, not {stage!r}")
        time_of = self.encode_time if stage == "encode" else self.decode_time
        groups = shape_groups(shapes, lambda s: self.max_batch(model, s)) if len(set(shapes)) > 1 \
            else [(shapes[0], len(shapes))]
        return sum(time_of(model, s, n) for s, n in groups)

    def min_step_time(self, model: ModelSpec, shape: Shape, max_sp: int = 8) -> float:
        return min(self.step_time(model, shape, k) for k in model.sp_degrees(max_sp))

    def best_sp(self, model: ModelSpec, shape: Shape, max_sp: int = 8) -> int:
        return min(model.sp_degrees(max_sp), key=lambda k: (self.step_time(model, shape, k), k))

    # --- stages ------------------------------------------------------------
    def encode_time(self, model: ModelSpec, shape: Shape, batch: int = 1) -> float:
        """Text encoders: once a request, on one GPU."""
        measured = self._stage_points.get((model.name, self.gpu.name, "encode", batch, model.seq_tokens(shape)))
        if measured is not None:
            return measured
        flops = 2.0 * model.text_encoder_params_b * 1e9 * model.text_tokens * batch
        weights = model.text_encoder_params_b * 1e9 * BF16_BYTES
        return (STAGE_OVERHEAD_S + flops / (self.gpu.bf16_flops * ENCODER_EFFICIENCY)
                + weights / self.gpu.mem_bw)

    def decode_time(self, model: ModelSpec, shape: Shape, batch: int = 1) -> float:
        """VAE decode: no SP speed-up, so it always runs on one GPU."""
        measured = self._stage_points.get((model.name, self.gpu.name, "decode", batch, shape))
        if measured is not None:
            return measured
        flops = model.decode_flops_per_px * shape.height * shape.width * shape.frames * batch
        return STAGE_OVERHEAD_S + flops / (self.gpu.bf16_flops * VAE_EFFICIENCY)

    def ideal_latency(self, model: ModelSpec, shape: Shape, steps: int, max_sp: int = 8) -> float:
        """Standalone latency on an empty cluster at the fastest SP degree."""
        return (self.encode_time(model, shape) + steps * self.min_step_time(model, shape, max_sp)
                + self.decode_time(model, shape))

    # --- batching & transfers ---------------------------------------------
    def max_batch(self, model: ModelSpec, shape: Shape) -> int:
        """Largest useful batch by tokens (Hetu-DiT's rule for SD3/FLUX); 1 for video."""
        if model.kind == "video":
            return 1
        tokens = model.image_tokens(shape)
        for max_tokens, batch in self._batch_rules:
            if max_tokens is None or tokens <= max_tokens:
                return batch
        return 1

    @staticmethod
    def transfer_time(nbytes: int, bandwidth: float) -> float:
        """Latent move between GPU groups: a fixed launch cost plus bytes over the link."""
        if math.isinf(bandwidth):
            return 0.0
        return 0.002 + nbytes / bandwidth


class CorrectedCostModel(CostModel):
    """A view of a cost model whose step times are the prior's times a factor per (model, shape, sp,
    batch) where one is given. A new object, so memos keyed by the cost model's identity
    (``TimingTable``) start afresh; tables, calibrations and the prior's cache are shared, so a view is
    cheap to make, and the plain ``CostModel.step_time`` pays nothing for corrections it has none of."""

    def __init__(self, prior: CostModel, factors: Mapping[tuple[str, Shape, int, int], float]) -> None:
        self.__dict__.update(prior.__dict__)
        self._prior = prior
        self._factors = dict(factors)
        self.corrections = MappingProxyType(self._factors)
        self._corrected: dict[tuple, float] = {}  # this view's step times

    @property
    def csp(self) -> "CspPredictor":
        """The prior's CSP predictor: its refits (``CspPredictor.observe``) serve every view."""
        return self._prior.csp

    def step_time(self, model: ModelSpec, shape: Shape, sp: int, batch: int = 1,
                  link_bw: float | None = None) -> float:
        key = (model.name, shape, sp, batch, link_bw)
        hit = self._corrected.get(key)
        if hit is None:
            hit = self._corrected[key] = (self.prior_step_time(model, shape, sp, batch, link_bw)
                                          * self._factors.get(key[:4], 1.0))
        return hit


def _shape_with_tokens(model: ModelSpec, like: Shape, tokens: int) -> Shape:
    """A square(ish) shape of the same frame count whose sequence has ``tokens`` tokens."""
    text = model.text_tokens if model.joint_text else 0
    per_frame = max(1, (tokens - text)) / math.ceil(model.latent_frames(like) / model.patch_t)
    side = math.sqrt(per_frame) * model.vae_spatial * model.patch
    side_px = max(1, int(round(side)))
    return Shape(side_px, side_px, like.frames)
