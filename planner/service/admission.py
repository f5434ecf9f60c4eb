"""Validation of requests entering the service, with the trace reader's rules.

Submit, Plan and WhatIf validate each request with ``planner.traces``' own
per-line validation, so the service and ``ditplan whatif --trace`` reject the
same things (unknown model, non-positive size or steps, frames < 1, a
deadline not after the arrival, ...), the catalog's per-model bounds on
height, width, frames and steps included, and a deadline at most
``horizon_s`` (default ``traces.MAX_DEADLINE_AFTER_S``, a day) after the
arrival. Errors become ``InvalidArgument`` naming the request's position, the
field, its value (client strings cut to ``errors.SHOWN_CHARS``) and the bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ditplan.models.catalog import get_model
from ditplan.planner.cluster import Cluster
from ditplan.planner.errors import InputError, PlacementError, TraceError
from ditplan.planner.placement import Placement, check_fits
from ditplan.planner.request import Request, RequestFields
from ditplan.planner.service.errors import AlreadyExists, InvalidArgument, shown
from ditplan.planner.traces import (MAX_DEADLINE_AFTER_S, IdealLatency, TraceRecord, is_number, validate_fields,
                                    resolve_deadlines)

MAX_ID_LEN = 256


@dataclass(frozen=True)
class RequestSpec(RequestFields):
    """A request as a client submits it; ``arrival`` is the acceptance time."""

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
        raise InvalidArgument(f"{where}: field 'id' = {shown(rid, 32)} is longer than {MAX_ID_LEN} characters")


def _invalid(where: str, exc: TraceError) -> InvalidArgument:
    what = f"field {exc.field!r} = {shown(exc.value)} " if exc.field is not None else ""
    return InvalidArgument(f"{where}: {what}{exc.reason}")


def _where(source: str, index: int, rid: object) -> str:
    return f"{source}[{index}]" + (f" (id {shown(rid, 64)})" if isinstance(rid, str) and rid else "")


def _slo_deadline(where: str, slo_scale: float | None, default_slo_scale: float, rec: TraceRecord,
                  ideal: IdealLatency, horizon_s: float) -> Request:
    """``rec`` with its deadline resolved; one that lands past the horizon names 'slo_scale'."""
    try:
        return resolve_deadlines([rec], ideal, default_slo_scale, horizon_s)[0]
    except InputError:
        scale = slo_scale if slo_scale is not None else default_slo_scale
        ideal_s = ideal(rec.model, rec.shape, rec.steps)
        raise InvalidArgument(f"{where}: field 'slo_scale' = {scale!r} puts the deadline {scale * ideal_s:.6g} s "
                              f"after arrival (ideal latency {ideal_s:.6g} s); at most {horizon_s:g} s") from None


def validate_spec(spec: RequestSpec, index: int, now: float, ideal: IdealLatency,
                  default_slo_scale: float, horizon_s: float = MAX_DEADLINE_AFTER_S) -> Request:
    """The admitted Request for ``spec`` arriving ``now``, or ``InvalidArgument``.

    Its deadline (given, relative, or from the SLO scale) must be at most ``horizon_s`` after ``now``.
    """
    where = _where("requests", index, spec.id)
    _check_id(where, spec.id)
    given = [k for k in ("deadline", "deadline_in_s", "slo_scale") if getattr(spec, k) is not None]
    if len(given) > 1:
        raise InvalidArgument(f"{where}: field {given[1]!r} = {getattr(spec, given[1])!r} "
                              f"give one of deadline, deadline_in_s, slo_scale, not {' and '.join(given)}")
    deadline = spec.deadline
    if spec.deadline_in_s is not None:
        if not is_number(spec.deadline_in_s) or spec.deadline_in_s <= 0:
            raise InvalidArgument(f"{where}: field 'deadline_in_s' = {spec.deadline_in_s!r} "
                                  "must be a positive finite number of seconds")
        if spec.deadline_in_s > horizon_s:
            raise InvalidArgument(f"{where}: field 'deadline_in_s' = {spec.deadline_in_s!r} exceeds the "
                                  f"deadline horizon, {horizon_s:g} s after arrival")
        deadline = now + spec.deadline_in_s
    fields = _fields(spec.id, now, spec.model, spec.height, spec.width, spec.frames, spec.steps,
                     deadline, spec.slo_scale)
    try:
        # deadline_in_s is checked against the horizon above (now + it - now may round past it).
        rec = validate_fields("submit", index + 1, fields, horizon_s if spec.deadline_in_s is None else math.inf)
    except TraceError as exc:
        if (exc.field == "deadline" and spec.deadline is not None and is_number(spec.deadline)
                and spec.deadline <= now):
            raise InvalidArgument(f"{where}: field 'deadline' = {spec.deadline!r} is in the past "
                                  f"(server time {now:.6f})") from None
        if exc.field == "deadline" and spec.deadline is not None and is_number(spec.deadline):
            raise InvalidArgument(f"{where}: field 'deadline' = {spec.deadline!r} is more than the deadline "
                                  f"horizon after arrival (server time {now:.6f}); at most "
                                  f"{now + horizon_s:.6f} (now + {horizon_s:g} s)") from None
        raise _invalid(where, exc) from None
    return _slo_deadline(where, spec.slo_scale, default_slo_scale, rec, ideal, horizon_s)


def validate_batch(specs: Sequence[RequestSpec], now: float, ideal: IdealLatency,
                   default_slo_scale: float, horizon_s: float = MAX_DEADLINE_AFTER_S) -> list[Request]:
    """All-or-nothing: every spec valid and ids unique within the batch, else the first error."""
    out, seen = [], {}
    for i, spec in enumerate(specs):
        req = validate_spec(spec, i, now, ideal, default_slo_scale, horizon_s)
        if req.id in seen:
            raise AlreadyExists(f"requests[{i}]: field 'id' = {shown(req.id)} duplicates requests[{seen[req.id]}]")
        seen[req.id] = i
        out.append(req)
    return out


def validate_records(records: Sequence[dict], source: str = "records",
                     horizon_s: float = MAX_DEADLINE_AFTER_S) -> list[TraceRecord]:
    """Trace records (dicts of the trace file's fields) for WhatIf; duplicate ids are INVALID_ARGUMENT, as in a file."""
    out, seen = [], {}
    for i, r in enumerate(records):
        where = f"{source}[{i}]"
        _check_id(where, r.get("id"))
        fields = _fields(**r)
        try:
            rec = validate_fields(source, i + 1, fields, horizon_s)
        except TraceError as exc:
            raise _invalid(where, exc) from None
        if rec.id in seen:
            raise InvalidArgument(f"{where}: field 'id' = {shown(rec.id)} duplicate id "
                                  f"(first at {source}[{seen[rec.id]}])")
        seen[rec.id] = i
        out.append(rec)
    return sorted(out, key=lambda r: r.arrival)


def validate_request(index: int, id, model, height, width, frames, steps, arrival, deadline,
                     source: str = "requests", horizon_s: float = MAX_DEADLINE_AFTER_S) -> Request:
    """A fully specified request (Plan's input): trace rules, arrival >= 0 not required."""
    where = f"{source}[{index}]"
    _check_id(where, id)
    if not is_number(arrival):
        raise InvalidArgument(f"{where}: field 'arrival' = {arrival!r} must be a finite number")
    # The trace rules want arrival >= 0 (trace time); Plan's clock may be anything, so validate
    # relative to the arrival and shift back.
    fields = _fields(id, 0.0, model, height, width, frames, steps,
                     (deadline - arrival) if is_number(deadline) else deadline)
    try:
        rec = validate_fields(source, index + 1, fields, horizon_s)
    except TraceError as exc:
        if exc.field == "deadline" and is_number(deadline) and deadline > arrival:
            raise InvalidArgument(f"{where}: field 'deadline' = {deadline!r} is more than {horizon_s:g} s after "
                                  f"arrival ({arrival!r}); at most arrival + {horizon_s:g}") from None
        if exc.field == "deadline":
            raise InvalidArgument(f"{where}: field 'deadline' = {deadline!r} must be after arrival ({arrival!r})") from None
        raise _invalid(where, exc) from None
    if not math.isfinite(arrival + rec.deadline):
        raise InvalidArgument(f"{where}: field 'deadline' = {deadline!r} must be a finite number")
    return rec.to_request(deadline)


def unservable(r: Request, cluster: Cluster, placement: Placement | None, served: Sequence[str], policy: str,
               places_models: bool, models: set[str]) -> str | None:
    """Why a deployment can never run ``r`` (None: it can), as a message naming the field.

    With a ``placement``: ``r``'s model must be ``served`` or the policy must
    load models. Without one every model sits on every GPU, so ``models``
    (those admitted so far) plus ``r``'s must fit on the smallest GPU.
    Either way ``r``'s weights and activations must fit some GPU."""
    try:
        check_fits([r], cluster)
    except PlacementError as exc:
        return str(exc)
    if placement is not None:
        if r.model not in served and not places_models:
            return (f"field 'model' = {r.model!r} is not served here (models: {', '.join(served)}) "
                    f"and policy {policy} does not load models")
        return None
    if r.model in models:
        return None
    together = sorted(models | {r.model})
    need = sum(get_model(m).weight_bytes for m in together)
    smallest = min(g.memory for g in cluster.gpus)
    if need <= smallest:
        return None
    return (f"field 'model' = {r.model!r} does not fit beside {', '.join(sorted(models))} on every GPU "
            f"({need} bytes of weights for {', '.join(together)}; a GPU of {cluster.name} has {smallest}): "
            f"start the service with --models to place models per GPU")
