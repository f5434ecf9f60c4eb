"""Summaries of a simulation in the DESIGN 3.3 what-if JSON shape, and the timeline."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from planner.request import RequestState
from planner.simulator import SimResult

DIGITS = 6


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), DIGITS)


def _pct(values: list[float], qs: Iterable[int]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": _r(np.percentile(arr, q)) for q in qs}


def met(status) -> bool:
    return status.state is RequestState.DONE and status.finish <= status.request.deadline + 1e-9


def summarize(result: SimResult) -> dict:
    """Metrics of one policy's run. A request that never finishes is a miss."""
    reqs = result.requests
    finished = [s for s in reqs if s.state is RequestState.DONE]
    latencies = [s.finish - s.request.arrival for s in finished]
    by_kind = {}
    for kind in ("image", "video"):
        group = [s for s in reqs if s.request.kind == kind]
        by_kind[kind] = _r(sum(met(s) for s in group) / len(group)) if group else None
    lat = _pct(latencies, (50, 95, 99))
    lat["mean"] = _r(np.mean(latencies)) if latencies else None
    solver = _pct(result.solver_ms, (50, 99))
    solver["max"] = _r(max(result.solver_ms)) if result.solver_ms else None
    return {
        "slo_attainment": _r(sum(met(s) for s in reqs) / len(reqs)) if reqs else None,
        "slo_attainment_by_kind": by_kind,
        "latency_s": lat,
        "gpu_seconds": _r(sum(len(seg.gpus) * (seg.end - seg.start) for seg in result.segments)),
        "preemptions": sum(s.preemptions for s in reqs),
        "sp_changes": sum(s.sp_changes for s in reqs),
        "migrations": sum(s.migrations for s in reqs),
        "requests": len(reqs),
        "finished": len(finished),
        "late_finished": sum(not met(s) for s in finished),
        "rejected": sum(s.rejected is not None for s in reqs),
        "solver_ms": solver,
        "plans": result.plans,
        "fallbacks": result.fallbacks,
        "makespan_s": _r(result.end_time),
    }


def timeline_records(result: SimResult) -> list[dict]:
    """DESIGN 3.3 timeline: one object per segment, then one per request."""
    out: list[dict] = []
    for seg in sorted(result.segments, key=lambda s: (s.start, s.gpus)):
        out.append({"type": "segment", "request_ids": list(seg.request_ids), "stage": seg.stage.value,
                    "gpus": list(seg.gpus), "sp": seg.sp, "steps": seg.steps,
                    "start": _r(seg.start), "end": _r(seg.end)})
    for s in result.requests:
        rec = {"type": "request", "id": s.id, "arrival": _r(s.request.arrival),
               "deadline": _r(s.request.deadline), "finish": _r(s.finish), "met": met(s)}
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


def read_timeline(path: str | Path) -> tuple[list[dict], dict[str, dict]]:
    """(segments, request records by id) of a timeline file."""
    segments, outcomes = [], {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["type"] == "segment":
            segments.append(rec)
        else:
            outcomes[rec["id"]] = rec
    return segments, outcomes


def write_summary(path: str | Path, summaries: dict[str, dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summaries, indent=2) + "\n")
