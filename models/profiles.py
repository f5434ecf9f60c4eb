"""Profiles: per-step latency tables with provenance.

A profile file is JSON: ``name``, ``gpu``, ``role`` (``profile`` feeds the cost
model, ``validation`` is held out for the calibration benchmark),
``provenance`` (where the numbers come from), ``points`` (one row per
measurement: model, height, width, frames, sp, batch, step_s, optional iqr_s)
and optional ``stages`` (model, height, width, frames, stage, batch, seconds,
optional iqr_s and stage_impl: what ran, e.g. ``stand-in: ...`` where the
executor has no real stage yet) and optional ``csp`` (one row per measured
mixed-resolution CSP batch step: model, ``shapes`` as [height, width, frames]
triples, one per member, sp, step_s, optional iqr_s; ``models/csp.py`` fits
its predictor to them). Published tables ship in this folder;
``ditplan profile`` measures one and writes the same format
(``Profile.to_doc``), with the provenance fields ``MEASURED_PROVENANCE``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditplan.models.catalog import CATALOG, SP_DEGREES, Shape

PROFILE_DIR = Path(__file__).with_name("profiles")
# What a measured profile's provenance records (``ditplan profile``).
MEASURED_PROVENANCE = ("source", "device", "torch", "date", "command", "model_scale")


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class ProfilePoint:
    model: str
    shape: Shape
    sp: int
    batch: int
    step_s: float
    iqr_s: float | None = None  # spread of the measurements (interquartile range), where measured

    def to_row(self) -> dict[str, Any]:
        return _row(self.model, self.shape, sp=self.sp, batch=self.batch, step_s=self.step_s, iqr_s=self.iqr_s)


@dataclass(frozen=True)
class StagePoint:
    model: str
    shape: Shape
    stage: str  # "encode" | "decode"
    batch: int
    seconds: float
    iqr_s: float | None = None
    stage_impl: str = ""  # what ran where it is not the model's real stage (e.g. "stand-in: ...")

    def to_row(self) -> dict[str, Any]:
        return _row(self.model, self.shape, stage=self.stage, batch=self.batch, seconds=self.seconds,
                    iqr_s=self.iqr_s, stage_impl=self.stage_impl or None)


@dataclass(frozen=True)
class CspPoint:
    """One measured step of a CSP batch (``models/csp.py``): one shape per member."""

    model: str
    shapes: tuple[Shape, ...]
    sp: int
    step_s: float
    iqr_s: float | None = None

    def to_row(self) -> dict[str, Any]:
        row = {"model": self.model, "shapes": [[s.height, s.width, s.frames] for s in self.shapes],
               "sp": self.sp, "step_s": self.step_s}
        if self.iqr_s is not None:
            row["iqr_s"] = self.iqr_s
        return row


def _row(model: str, shape: Shape, **fields) -> dict[str, Any]:
    row = {"model": model, "height": shape.height, "width": shape.width, "frames": shape.frames}
    row.update((k, v) for k, v in fields.items() if v is not None)
    return row


@dataclass(frozen=True)
class Profile:
    name: str
    gpu: str
    role: str
    provenance: dict[str, Any]
    points: tuple[ProfilePoint, ...]
    stages: tuple[StagePoint, ...] = ()
    batch_rules: tuple[tuple[int | None, int], ...] = field(default=())
    csp: tuple[CspPoint, ...] = ()

    def to_doc(self) -> dict[str, Any]:
        """The JSON document ``parse_profile`` reads back to an equal profile."""
        doc: dict[str, Any] = {"name": self.name, "gpu": self.gpu, "role": self.role,
                               "provenance": dict(self.provenance)}
        if self.batch_rules:
            doc["best_batch_by_tokens"] = {"rules": [{"max_tokens": t, "batch": b} for t, b in self.batch_rules]}
        doc["points"] = [p.to_row() for p in self.points]
        if self.stages:
            doc["stages"] = [s.to_row() for s in self.stages]
        if self.csp:
            doc["csp"] = [c.to_row() for c in self.csp]
        return doc

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_doc(), indent=1) + "\n")
        return path


def _require(row: dict, key: str, kind: type, where: str):
    if key not in row:
        raise ProfileError(f"{where}: missing field {key!r}")
    value = row[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProfileError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _shape(row: dict, where: str) -> Shape:
    shape = Shape(_require(row, "height", int, where), _require(row, "width", int, where),
                  int(row.get("frames", 1)))
    if min(shape.height, shape.width, shape.frames) < 1:
        raise ProfileError(f"{where}: non-positive size {shape}")
    return shape


def _spread(row: dict, where: str) -> float | None:
    return _require(row, "iqr_s", float, where) if "iqr_s" in row else None


def _sp_step(row: dict, where: str) -> tuple[int, float]:
    """A measured row's SP degree and seconds per step, checked."""
    sp = _require(row, "sp", int, where)
    if sp not in SP_DEGREES:
        raise ProfileError(f"{where}: field 'sp' = {sp!r} is not one of {SP_DEGREES}")
    step_s = _require(row, "step_s", float, where)
    if step_s <= 0:
        raise ProfileError(f"{where}: field 'step_s' = {step_s!r} must be > 0")
    return sp, step_s


def parse_profile(doc: dict[str, Any], source: str = "<profile>") -> Profile:
    from ditplan.models.gpus import GPU_KINDS

    gpu = str(doc.get("gpu", "")).upper()
    if gpu not in GPU_KINDS:
        raise ProfileError(f"{source}: field 'gpu' = {doc.get('gpu')!r} is not one of {sorted(GPU_KINDS)}")
    points = []
    for i, row in enumerate(doc.get("points", [])):
        where = f"{source}: points[{i}]"
        model = _require(row, "model", str, where)
        if model not in CATALOG:
            raise ProfileError(f"{where}: field 'model' = {model!r} is not in the catalog")
        sp, step_s = _sp_step(row, where)
        points.append(ProfilePoint(model, _shape(row, where), sp, int(row.get("batch", 1)), step_s,
                                   _spread(row, where)))
    stages = []
    for i, row in enumerate(doc.get("stages", [])):
        where = f"{source}: stages[{i}]"
        stage = _require(row, "stage", str, where)
        if stage not in ("encode", "decode"):
            raise ProfileError(f"{where}: field 'stage' = {stage!r} must be 'encode' or 'decode'")
        stages.append(StagePoint(_require(row, "model", str, where), _shape(row, where), stage,
                                 int(row.get("batch", 1)), _require(row, "seconds", float, where),
                                 _spread(row, where), str(row.get("stage_impl", ""))))
    csp = []
    for i, row in enumerate(doc.get("csp", [])):
        where = f"{source}: csp[{i}]"
        model = _require(row, "model", str, where)
        if model not in CATALOG or not CATALOG[model].csp:
            raise ProfileError(f"{where}: field 'model' = {model!r} is not a catalog model with CSP batches")
        shapes = _require(row, "shapes", list, where)
        if len(shapes) < 2 or not all(isinstance(s, list) and len(s) == 3 and all(
                isinstance(v, int) and v >= 1 for v in s) for s in shapes):
            raise ProfileError(f"{where}: field 'shapes' = {shapes!r} must list two or more "
                               f"[height, width, frames] triples of positive integers")
        sp, step_s = _sp_step(row, where)
        csp.append(CspPoint(model, tuple(Shape(*s) for s in shapes), sp, step_s, _spread(row, where)))
    rules = tuple((r.get("max_tokens"), int(r["batch"]))
                  for r in doc.get("best_batch_by_tokens", {}).get("rules", []))
    return Profile(name=str(doc.get("name", source)), gpu=gpu, role=str(doc.get("role", "profile")),
                   provenance=dict(doc.get("provenance", {})), points=tuple(points),
                   stages=tuple(stages), batch_rules=rules, csp=tuple(csp))


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc})") from None
    return parse_profile(doc, str(path))


def builtin_profiles(role: str | None = "profile") -> list[Profile]:
    """The published tables shipped with ditplan (``role=None``: all of them)."""
    out = [load_profile(p) for p in sorted(PROFILE_DIR.glob("*.json"))]
    return [p for p in out if role is None or p.role == role]
