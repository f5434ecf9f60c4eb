"""Summaries of a simulation in the what-if JSON shape (docs/architecture.md, Contracts), and the timeline."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ditplan.planner.request import RequestState
from ditplan.planner.sim_result import SimResult

DIGITS = 6


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), DIGITS)


def _pct(values: list[float], qs: Iterable[int]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": _r(np.percentile(arr, q)) for q in qs}


def summarize(result: SimResult) -> dict:
    """Metrics of one policy's run. A request that never finishes is a miss."""
    reqs = result.requests
    finished = [s for s in reqs if s.state is RequestState.DONE]
    latencies = [s.finish - s.request.arrival for s in finished]
    by_kind = {}
    for kind in ("image", "video"):
        group = [s for s in reqs if s.request.kind == kind]
        by_kind[kind] = _r(sum(s.met for s in group) / len(group)) if group else None
    lat = _pct(latencies, (50, 95, 99))
    lat["mean"] = _r(np.mean(latencies)) if latencies else None
    solver = _pct(result.solver_ms, (50, 99))
    solver["max"] = _r(max(result.solver_ms)) if result.solver_ms else None
    return {
        "slo_attainment": _r(sum(s.met for s in reqs) / len(reqs)) if reqs else None,
        "slo_attainment_by_kind": by_kind,
        "latency_s": lat,
        "gpu_seconds": _r(sum(len(seg.gpus) * (seg.end - seg.start) for seg in result.segments)),
        "preemptions": sum(s.preemptions for s in reqs),
        "sp_changes": sum(s.sp_changes for s in reqs),
        "migrations": sum(s.migrations for s in reqs),
        "requests": len(reqs),
        "finished": len(finished),
        "late_finished": sum(not s.met for s in finished),
        "rejected": sum(s.rejected is not None for s in reqs),
        "solver_ms": solver,
        "plans": result.plans,
        "fallbacks": result.fallbacks,
        "makespan_s": _r(result.end_time),
        "weight_loads": len(result.weight_loads),
        "weight_load_s": _r(sum(e.end - e.start for e in result.weight_loads)),
    }


def unfinished_reasons(result: SimResult) -> list[str]:
    """Why requests were left unfinished, one line per model (empty when all ended)."""
    placement = result.placement or result.initial_placement
    by_model: dict[str, int] = {}
    for s in result.requests:
        if s.state is not RequestState.DONE and s.rejected is None:
            by_model[s.request.model] = by_model.get(s.request.model, 0) + 1
    out = []
    for model, n in sorted(by_model.items()):
        gpus = placement.gpus_with(model) if placement is not None else ()
        if placement is None:
            why = "unfinished when the run ended"
        elif not gpus:
            why = (f"no GPU holds {model}'s weights (placement: {placement.describe()}) and "
                   f"policy {result.policy} loads none; try --placement or a placing policy (cpsat)")
        else:
            why = f"{model} is on GPUs {list(gpus)} but the run ended first (horizon, or the policy gave up)"
        out.append(f"{n} request(s) of {model}: {why}")
    return out


def timeline_records(result: SimResult) -> list[dict]:
    """timeline (docs/architecture.md, Contracts): weights resident at the start (loads at 0..0), segments and the
    plans' loads and unloads by time, then one object per request."""
    out: list[dict] = []
    if result.initial_placement is not None:
        for g, res in enumerate(result.initial_placement.resident):
            for model, comp in sorted(res):
                out.append({"type": "load", "gpu": g, "model": model, "component": comp,
                            "start": 0.0, "end": 0.0, "initial": True})
    for e in result.weight_events:
        out.append({"type": e.kind, "gpu": e.gpu, "model": e.model, "component": e.component,
                    "start": _r(e.start), "end": _r(e.end)})
    for seg in sorted(result.segments, key=lambda s: (s.start, s.gpus)):
        out.append({"type": "segment", "request_ids": list(seg.request_ids), "stage": seg.stage.value,
                    "gpus": list(seg.gpus), "sp": seg.sp, "steps": seg.steps,
                    "start": _r(seg.start), "end": _r(seg.end)})
    for s in result.requests:
        rec = {"type": "request", "id": s.id, "arrival": _r(s.request.arrival),
               "deadline": _r(s.request.deadline), "finish": _r(s.finish), "met": s.met}
        if s.rejected is not None:
            rec["rejected"] = s.rejected
        out.append(rec)
    return out


def write_timeline(path: str | Path, result: SimResult) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rec in timeline_records(result):
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")


def read_timeline(path: str | Path) -> tuple[list[dict], dict[str, dict], list[dict]]:
    """(segments, request records by id, load and unload records) of a timeline file."""
    segments, outcomes, weights = [], {}, []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["type"] == "segment":
            segments.append(rec)
        elif rec["type"] in ("load", "unload"):
            weights.append(rec)
        else:
            outcomes[rec["id"]] = rec
    return segments, outcomes, weights


def write_summary(path: str | Path, summaries: dict[str, dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summaries, indent=2) + "\n")
