"""Trace files: read (JSON Lines or Hetu-DiT), validate, resolve deadlines, write.

The JSON Lines contract is in docs/architecture.md (Contracts). A bad line rejects the whole file with
a :class:`TraceError` naming the source, the 1-based line, the field and its
value. Sizes, frames and steps are bounded per model by the catalog
(:meth:`ModelSpec.size_problem`) and a deadline by ``horizon_s`` after its
arrival (:data:`MAX_DEADLINE_AFTER_S` by default). Hetu-DiT's format (``Request(request_id=0, timestamp=0.0, height=...,
width=..., num_frames=..., num_inference_steps=..., prompt='...')`` one per
line) is detected per file from its first non-blank line; its lines name no
model, so the model comes from the caller or the file name's catalog family.
"""
from __future__ import annotations

import ast
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ditplan.models.catalog import CATALOG, FAMILIES, Shape, get_model, model_for_family_prefix
from ditplan.planner.errors import InputError, TraceError
from ditplan.planner.request import Request

REQUIRED_FIELDS: tuple[str, ...] = ("id", "arrival", "model", "height", "width", "frames", "steps")
OPTIONAL_FIELDS: tuple[str, ...] = ("deadline", "slo_scale")
# Payload some trace producers carry; the planner does not use it.
IGNORED_FIELDS: tuple[str, ...] = ("prompt", "negative_prompt")
FLOAT_DECIMALS = 6
# A deadline (given, or arrival + slo_scale x ideal latency) at most this long after its
# arrival: a day covers the longest legal request (a 129-frame 768x1360 HunyuanVideo at
# 1000 steps ideally takes ~6 h on 8 L20s) at its SLO, and keeps every time finite.
MAX_DEADLINE_AFTER_S = 86_400.0

IdealLatency = Callable[[str, Shape, int], float]


@dataclass(frozen=True)
class TraceRecord:
    """One trace line before its deadline is resolved."""

    id: str
    arrival: float
    model: str
    height: int
    width: int
    frames: int
    steps: int
    deadline: float | None = None
    slo_scale: float | None = None
    line: int = field(default=0, compare=False)  # 1-based line in its file (0: not from a file)

    @property
    def shape(self) -> Shape:
        return Shape(self.height, self.width, self.frames)

    def to_request(self, deadline: float) -> Request:
        """The request this record describes, with its resolved absolute ``deadline``."""
        return Request(id=self.id, model=self.model, shape=self.shape, steps=self.steps,
                       arrival=float(self.arrival), deadline=float(deadline))

    @classmethod
    def from_request(cls, r: Request) -> "TraceRecord":
        """A record that reads back as ``r`` (its deadline absolute)."""
        return cls(r.id, r.arrival, r.model, r.shape.height, r.shape.width, r.shape.frames, r.steps, r.deadline)

    def to_json(self) -> str:
        """One JSON line (no newline), keys in contract order, floats rounded."""
        obj: dict[str, object] = {
            "id": self.id,
            "arrival": _round(self.arrival),
            "model": self.model,
            "height": self.height,
            "width": self.width,
            "frames": self.frames,
            "steps": self.steps,
        }
        if self.deadline is not None:
            obj["deadline"] = _round(self.deadline)
        if self.slo_scale is not None:
            obj["slo_scale"] = _round(self.slo_scale)
        return json.dumps(obj, ensure_ascii=True, allow_nan=False)


def _round(x: float) -> float:
    return round(float(x), FLOAT_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


# --- reading ----------------------------------------------------------------

def read_trace(path: str | os.PathLike[str], *, model: str | None = None,
               horizon_s: float = MAX_DEADLINE_AFTER_S) -> list[TraceRecord]:
    """Read and validate a trace; records sorted by (arrival, line order).

    ``model`` names the model of lines that name none (every Hetu-DiT line);
    without it a Hetu-DiT file's model comes from its name's catalog family
    (``flux_trace.txt`` -> ``flux-dev``). A given ``deadline`` must be at most
    ``horizon_s`` after its arrival.
    """
    source = str(path)
    if model is not None and model not in CATALOG:
        raise InputError(f"unknown model {model!r}; known: {', '.join(sorted(CATALOG))}")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read trace {source}: {exc.strerror or exc}") from None
    lines = _split_lines(source, data)
    if not lines:
        raise TraceError(source, 1, None, None, "empty trace: no requests")
    first_no, first = lines[0]
    if first.startswith("Request("):
        default_model = model or model_for_family_prefix(Path(path).name)
        if default_model is None:
            raise TraceError(source, first_no, None, None,
                             "Hetu-DiT trace lines name no model: pass --model NAME "
                             f"(known: {', '.join(sorted(CATALOG))}) or name the file after a "
                             f"catalog family (e.g. flux_trace.txt; families: {', '.join(sorted(FAMILIES))})")
        parse, fallback = _parse_hetu, default_model
    elif first.startswith("{"):
        parse, fallback = _parse_json, model
    else:
        raise TraceError(source, first_no, None, None,
                         f"neither JSON Lines nor Hetu-DiT 'Request(...)' format: {_snippet(first)}")
    records: list[TraceRecord] = []
    seen: dict[str, int] = {}
    for line_no, text in lines:
        fields = parse(source, line_no, text, fallback)
        rec = validate_fields(source, line_no, fields, horizon_s)
        if rec.id in seen:
            raise TraceError(source, line_no, fields["_names"]["id"], rec.id,
                             f"duplicate id (first on line {seen[rec.id]})")
        seen[rec.id] = line_no
        records.append(rec)
    # sorted() is stable, so equal arrivals keep line order.
    return sorted(records, key=lambda r: r.arrival)


def _split_lines(source: str, data: bytes) -> list[tuple[int, str]]:
    """Non-blank lines as (1-based line number, stripped text)."""
    out = []
    for no, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8-sig" if no == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(source, no, None, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        text = text.strip()
        if text:
            out.append((no, text))
    return out


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# Parsers return a dict of contract fields plus "_names": contract -> name in file.

def _parse_json(source: str, line: int, text: str, default_model: str | None) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(source, line, None, None,
                         f"invalid JSON: {exc.msg} at column {exc.colno}: {_snippet(text)}") from None
    if not isinstance(obj, dict):
        raise TraceError(source, line, None, None, f"expected a JSON object, got {type(obj).__name__}")
    known = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS) | set(IGNORED_FIELDS)
    for key in obj:
        if key not in known:
            raise TraceError(source, line, key, obj[key],
                             f"unknown field (known: {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})")
    fields = {k: obj[k] for k in REQUIRED_FIELDS if k in obj}
    fields.update({k: obj[k] for k in OPTIONAL_FIELDS if obj.get(k) is not None})  # null = absent
    if "model" not in obj and default_model is not None:
        fields["model"] = default_model
    fields["_names"] = {k: k for k in REQUIRED_FIELDS + OPTIONAL_FIELDS}
    return fields


_HETU_FIELDS = {"request_id": "id", "timestamp": "arrival", "height": "height", "width": "width",
                "num_frames": "frames", "num_inference_steps": "steps"}


def _parse_hetu(source: str, line: int, text: str, model: str | None) -> dict:
    def bad(reason: str) -> TraceError:
        return TraceError(source, line, None, None, f"{reason}: {_snippet(text)}")

    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise bad("not a Hetu-DiT 'Request(...)' line") from None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Request"):
        raise bad("not a Hetu-DiT 'Request(...)' line")
    if node.args or any(kw.arg is None for kw in node.keywords):
        raise bad("Hetu-DiT lines take keyword arguments only")
    kwargs: dict[str, object] = {}
    for kw in node.keywords:
        if kw.arg in kwargs:
            raise TraceError(source, line, kw.arg, None, "field given twice")
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, SyntaxError, TypeError):
            raise TraceError(source, line, kw.arg, ast.unparse(kw.value), "not a literal value") from None
    mapping = dict(_HETU_FIELDS)
    if "request_id_local" in kwargs:  # Hetu-DiT's own loader prefers it
        del mapping["request_id"]
        mapping = {"request_id_local": "id", **mapping}
    fields: dict = {"model": model}
    names = {"model": "model"}
    for hetu, ours in mapping.items():
        names[ours] = hetu
        if hetu not in kwargs:
            raise TraceError(source, line, hetu, None, "is missing (required in Hetu-DiT lines: "
                             + ", ".join(_HETU_FIELDS) + ")")
        value = kwargs[hetu]
        if ours == "id" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        fields[ours] = value
    fields["_names"] = names
    return fields


def validate_fields(source: str, line: int, f: dict, horizon_s: float = MAX_DEADLINE_AFTER_S) -> TraceRecord:
    """One request's fields (keyed by contract name, ``_names`` mapping them to the source's) checked against every rule of the trace format
    and the catalog's bounds; ``TraceError`` names the source, line, field and value."""
    names: dict[str, str] = f["_names"]

    def err(key: str, reason: str) -> TraceError:
        return TraceError(source, line, names.get(key, key), f.get(key), reason)

    for key in REQUIRED_FIELDS:
        if key not in f:
            raise err(key, f"is missing (required: {', '.join(REQUIRED_FIELDS)})")
    if not isinstance(f["id"], str) or not f["id"].strip():
        raise err("id", "must be a non-empty string")
    for key in ("arrival", "deadline", "slo_scale"):
        if key in f and not is_number(f[key]):
            raise err(key, "must be a finite number")
    if not isinstance(f["model"], str):
        raise err("model", "must be a string")
    for key in ("height", "width", "frames", "steps"):
        if not _is_int(f[key]):
            raise err(key, "must be an integer")
    if f["arrival"] < 0:
        raise err("arrival", "must be >= 0 (seconds from trace start)")
    spec = CATALOG.get(f["model"])
    if spec is None:
        hint = f"; did you mean {FAMILIES[f['model']]!r}?" if f["model"] in FAMILIES else ""
        raise err("model", f"unknown model{hint}; known: {', '.join(sorted(CATALOG))}")
    for key in ("height", "width", "steps"):
        if f[key] <= 0:
            raise err(key, "must be positive")
    if f["frames"] < 1:
        raise err("frames", "must be >= 1 (1 for an image)")
    if spec.kind == "image" and f["frames"] != 1:
        raise err("frames", f"{spec.name} is an image model: frames must be 1")
    if (problem := spec.size_problem(f["height"], f["width"], f["frames"], f["steps"])) is not None:
        raise err(problem[0], problem[2])
    if "deadline" in f and "slo_scale" in f:
        raise err("slo_scale", "give deadline or slo_scale, not both")
    if "slo_scale" in f and f["slo_scale"] <= 0:
        raise err("slo_scale", "must be positive")
    if "deadline" in f and f["deadline"] <= f["arrival"]:
        raise err("deadline", f"must be after arrival ({f['arrival']!r})")
    if "deadline" in f and not f["deadline"] - f["arrival"] <= horizon_s:
        raise err("deadline", f"is more than {horizon_s:g} s after arrival ({f['arrival']!r}); "
                              f"at most arrival + {horizon_s:g}")
    return TraceRecord(
        id=f["id"], arrival=float(f["arrival"]), model=f["model"], height=f["height"],
        width=f["width"], frames=f["frames"], steps=f["steps"],
        deadline=float(f["deadline"]) if "deadline" in f else None,
        slo_scale=float(f["slo_scale"]) if "slo_scale" in f else None, line=line)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A finite int or float (not a bool)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


# --- deadlines --------------------------------------------------------------

def resolve_deadlines(records: Iterable[TraceRecord], ideal_latency: IdealLatency,
                      default_slo_scale: float, horizon_s: float = MAX_DEADLINE_AFTER_S) -> list[Request]:
    """Requests with absolute deadlines, in the records' order.

    A record's own ``deadline`` wins; else ``arrival + scale x ideal_latency``
    with the record's ``slo_scale`` or ``default_slo_scale``, which must land
    at most ``horizon_s`` after the arrival (else :class:`InputError`).
    """
    if not is_number(default_slo_scale) or default_slo_scale <= 0:
        raise InputError(f"SLO scale must be a positive number, got {default_slo_scale!r}")
    cache: dict[tuple[str, Shape, int], float] = {}
    out = []
    for r in records:
        if r.deadline is not None:
            deadline = r.deadline
        else:
            key = (r.model, r.shape, r.steps)
            if key not in cache:
                ideal = float(ideal_latency(*key))
                if not (math.isfinite(ideal) and ideal > 0):
                    raise ValueError(f"ideal latency of {r.model} {r.shape} must be positive, got {ideal}")
                cache[key] = ideal
            scale = r.slo_scale or default_slo_scale
            deadline = r.arrival + scale * cache[key]
            if not deadline - r.arrival <= horizon_s:
                where = f"line {r.line}: " if r.line else ""
                raise InputError(f"{where}request {_snippet(r.id)}: field 'slo_scale' = {scale!r} puts the "
                                 f"deadline {scale * cache[key]:.6g} s after arrival ({r.model} {r.shape}, "
                                 f"{r.steps} steps, ideal {cache[key]:.6g} s); at most {horizon_s:g} s")
        out.append(r.to_request(deadline))
    return out


def ideal_latency_from(cost, max_sp: int = 8) -> IdealLatency:
    """Adapt a :class:`models.cost.CostModel` to :func:`resolve_deadlines`."""
    return lambda model, shape, steps: cost.ideal_latency(get_model(model), shape, steps, max_sp)


# --- writing ----------------------------------------------------------------

def write_trace(path: str | os.PathLike[str], records: Sequence[TraceRecord]) -> None:
    """Write JSON Lines: fixed key order, floats rounded to 6 decimals, ``\\n`` endings."""
    text = "".join(r.to_json() + "\n" for r in records)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
