"""What ``ditplan submit``, ``status`` and ``cancel`` do, apart from argument parsing."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ditplan.planner.request import meets
from ditplan.planner.service.client import PlannerClient, PlannerError, spec_from_record
from ditplan.planner.service.messages import RequestView
from ditplan.planner.traces import TraceRecord

SUBMIT_CHUNK = 1000  # requests per Submit call (each call is all-or-nothing)


@dataclass
class SubmitSummary:
    accepted: int
    error: PlannerError | None = None


def submit_trace(client: PlannerClient, records: Sequence[TraceRecord], replay: bool = False,
                 slo_scale: float | None = None, sleep: Callable[[float], None] = time.sleep) -> SubmitSummary:
    """Send a trace: all at once (arrival = now, deadlines shifted with it), or with ``replay`` at the
    trace's inter-arrival times on the server's clock (polled, so a simulated clock that stands still
    while the planner solves keeps the spacing). Stops at the first refusal."""
    records = sorted(records, key=lambda r: r.arrival)
    accepted = 0
    try:
        if not replay:
            for i in range(0, len(records), SUBMIT_CHUNK):
                chunk = records[i:i + SUBMIT_CHUNK]
                client.submit([spec_from_record(r, slo_scale) for r in chunk])
                accepted += len(chunk)
            return SubmitSummary(accepted)
        speed = client.info().speed or 1.0
        base = records[0].arrival if records else 0.0
        first: float | None = None  # service time of the first submit
        i = 0
        while i < len(records):
            j = i
            while j < len(records) and records[j].arrival == records[i].arrival and j - i < SUBMIT_CHUNK:
                j += 1
            if first is not None:
                target = first + records[i].arrival - base
                while (lag := target - client.info().now) > 0:
                    sleep(lag / speed)
            outs = client.submit([spec_from_record(r, slo_scale) for r in records[i:j]])
            if first is None:
                first = outs[0].arrival
            accepted += j - i
            i = j
        return SubmitSummary(accepted)
    except PlannerError as exc:
        return SubmitSummary(accepted, exc)


def status_rows(views: Sequence[RequestView], now: float) -> list[list[str]]:
    """Table rows: id, state, steps, deadline in, predicted finish in, finish in (every time in seconds
    relative to ``now``: negative is past), note."""
    def rel(t: float | None) -> str:
        return "-" if t is None else f"{t - now:+.2f}"

    return [[v.id, v.state, f"{v.steps_done}/{v.steps}", rel(v.deadline),
             rel(v.predicted_finish) if v.state not in ("done", "cancelled", "failed", "rejected") else "-",
             "-" if v.finish is None else rel(v.finish) + (" met" if meets(v.finish, v.deadline) else " late"),
             v.reason or ""]
            for v in views]


def status_json(views: Sequence[RequestView]) -> str:
    return json.dumps([v.to_dict() for v in views], indent=2)
