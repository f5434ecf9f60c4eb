"""Validation of requests entering the service, with the trace reader's rules.

Submit, Plan and WhatIf validate each request with ``planner.traces``' own
per-line validation, so the service and ``ditplan whatif --trace`` reject the
same things (unknown model, non-positive size or steps, frames < 1, a
deadline not after the arrival, ...). Errors become ``InvalidArgument``
naming the request's position, the field and its value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ditplan.planner.errors import TraceError
from ditplan.planner.request import Request
from ditplan.planner.service.errors import AlreadyExists, InvalidArgument
from ditplan.planner.traces import IdealLatency, TraceRecord, _is_number, _validate, resolve_deadlines

MAX_ID_LEN = 256


@dataclass(frozen=True)
class RequestSpec:
    """A request as a client submits it; ``arrival`` is the acceptance time."""

    id: str
    model: str
    height: int
    width: int
    frames: int
    steps: int
    deadline: float | None = None  # absolute, service clock
    deadline_in_s: float | None = None  # relative to arrival
    slo_scale: float | None = None


def _fields(id, arrival, model, height, width, frames, steps, deadline=None, slo_scale=None,
            names: dict | None = None) -> dict:
    f = {"id": id, "arrival": arrival, "model": model, "height": height, "width": width,
         "frames": frames, "steps": steps}
    if deadline is not None:
        f["deadline"] = deadline
    if slo_scale is not None:
        f["slo_scale"] = slo_scale
    f["_names"] = {k: k for k in f} | (names or {})
    return f


def _check_id(where: str, rid: object) -> None:
    if isinstance(rid, str) and len(rid) > MAX_ID_LEN:
        raise InvalidArgument(f"{where}: field 'id' = {rid[:32]!r}... is longer than {MAX_ID_LEN} characters")


def _invalid(where: str, exc: TraceError) -> InvalidArgument:
    what = f"field {exc.field!r} = {exc.value!r} " if exc.field is not None else ""
    return InvalidArgument(f"{where}: {what}{exc.reason}")


def validate_spec(spec: RequestSpec, index: int, now: float, ideal: IdealLatency,
                  default_slo_scale: float) -> Request:
    """The admitted Request for ``spec`` arriving ``now``, or ``InvalidArgument``."""
    where = f"requests[{index}]" + (f" (id {spec.id!r})" if isinstance(spec.id, str) and spec.id else "")
    _check_id(where, spec.id)
    given = [k for k in ("deadline", "deadline_in_s", "slo_scale") if getattr(spec, k) is not None]
    if len(given) > 1:
        raise InvalidArgument(f"{where}: field {given[1]!r} = {getattr(spec, given[1])!r} "
                              f"give one of deadline, deadline_in_s, slo_scale, not {' and '.join(given)}")
    deadline = spec.deadline
    if spec.deadline_in_s is not None:
        if not _is_number(spec.deadline_in_s) or spec.deadline_in_s <= 0:
            raise InvalidArgument(f"{where}: field 'deadline_in_s' = {spec.deadline_in_s!r} "
                                  "must be a positive finite number of seconds")
        deadline = now + spec.deadline_in_s
    fields = _fields(spec.id, now, spec.model, spec.height, spec.width, spec.frames, spec.steps,
                     deadline, spec.slo_scale)
    try:
        rec = _validate("submit", index + 1, fields)
    except TraceError as exc:
        if exc.field == "deadline" and spec.deadline is not None and _is_number(spec.deadline):
            raise InvalidArgument(f"{where}: field 'deadline' = {spec.deadline!r} is in the past "
                                  f"(server time {now:.6f})") from None
        raise _invalid(where, exc) from None
    return resolve_deadlines([rec], ideal, default_slo_scale)[0]


def validate_batch(specs: Sequence[RequestSpec], now: float, ideal: IdealLatency,
                   default_slo_scale: float) -> list[Request]:
    """All-or-nothing: every spec valid and ids unique within the batch, else the first error."""
    out, seen = [], {}
    for i, spec in enumerate(specs):
        req = validate_spec(spec, i, now, ideal, default_slo_scale)
        if req.id in seen:
            raise AlreadyExists(f"requests[{i}]: field 'id' = {req.id!r} duplicates requests[{seen[req.id]}]")
        seen[req.id] = i
        out.append(req)
    return out


def validate_records(records: Sequence[dict], source: str = "records") -> list[TraceRecord]:
    """Trace records (dicts of the trace file's fields) for WhatIf; duplicate ids are INVALID_ARGUMENT, as in a file."""
    out, seen = [], {}
    for i, r in enumerate(records):
        where = f"{source}[{i}]"
        _check_id(where, r.get("id"))
        fields = _fields(**r)
        try:
            rec = _validate(source, i + 1, fields)
        except TraceError as exc:
            raise _invalid(where, exc) from None
        if rec.id in seen:
            raise InvalidArgument(f"{where}: field 'id' = {rec.id!r} duplicate id (first at {source}[{seen[rec.id]}])")
        seen[rec.id] = i
        out.append(rec)
    return sorted(out, key=lambda r: r.arrival)


def validate_request(index: int, id, model, height, width, frames, steps, arrival, deadline,
                     source: str = "requests") -> Request:
    """A fully specified request (Plan's input): trace rules, arrival >= 0 not required."""
    where = f"{source}[{index}]"
    _check_id(where, id)
    if not _is_number(arrival):
        raise InvalidArgument(f"{where}: field 'arrival' = {arrival!r} must be a finite number")
    # The trace rules want arrival >= 0 (trace time); Plan's clock may be anything, so validate
    # relative to the arrival and shift back.
    fields = _fields(id, 0.0, model, height, width, frames, steps,
                     (deadline - arrival) if _is_number(deadline) else deadline)
    try:
        rec = _validate(source, index + 1, fields)
    except TraceError as exc:
        if exc.field == "deadline":
            raise InvalidArgument(f"{where}: field 'deadline' = {deadline!r} must be after arrival ({arrival!r})") from None
        raise _invalid(where, exc) from None
    if not math.isfinite(arrival + rec.deadline):
        raise InvalidArgument(f"{where}: field 'deadline' = {deadline!r} must be a finite number")
    return Request(id=rec.id, model=rec.model, shape=rec.shape, steps=rec.steps, arrival=float(arrival),
                   deadline=float(deadline))
