"""The measured timeline: the work the service's executors really ran, recorded as flights end.

A flight becomes a ``Segment`` from its dispatch (when the executors were told to start it) to the report
that ended it, on the service clock, with the diffuse steps the executors reported, not those planned. A
flight cut short by a lost executor keeps the steps reported before the loss and ends at the loss; one
that reported nothing (a diffuse flight with no step, an encode or decode that never said done) ran no
work the request keeps, and is left out, as the timeline contract has it (docs/architecture.md,
Contracts). Each plan's solve time is kept beside them. Both are capped: beyond ``cap`` entries the
oldest go (``dropped`` counts them), so a long-lived service keeps bounded memory.

Not thread-safe: the core calls it under its lock.
"""
from __future__ import annotations

import itertools
from collections import deque

import numpy as np

from ditplan.planner.execution import Segment
from ditplan.planner.request import Stage
from ditplan.planner.service.book import Flight

DEFAULT_CAP = 1_000_000


class SegmentRecorder:
    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        self._segments: deque[Segment] = deque(maxlen=cap)
        self._solver_ms: deque[float] = deque(maxlen=cap)
        self.total = 0

    def flight_ended(self, flight: Flight, end: float, done: bool = True) -> None:
        """``flight`` ended at ``end``: its executor reported it done, or (``done=False``) was lost."""
        a = flight.assignment
        steps = flight.reported_steps if a.stage is Stage.DIFFUSE else 0
        if (a.stage is Stage.DIFFUSE and steps == 0) or (a.stage is not Stage.DIFFUSE and not done):
            return
        self._segments.append(Segment(a.request_ids, a.stage, a.gpus, steps, flight.segment.start, end))
        self.total += 1

    def solved(self, ms: float) -> None:
        self._solver_ms.append(ms)

    @property
    def dropped(self) -> int:
        return self.total - len(self._segments)

    def page(self, start: int, size: int) -> tuple[list[Segment], int]:
        """Segments ``start`` .. ``start + size`` (indices since the service started; dropped ones are
        skipped) and the index after the last one returned."""
        first = max(start, self.dropped)
        kept = list(itertools.islice(self._segments, first - self.dropped, first - self.dropped + size))
        return kept, first + len(kept)

    def solver_percentiles(self) -> dict[str, float | None]:
        """p50, p99 and max of the kept solve times (ms), as the what-if JSON gives them."""
        if not self._solver_ms:
            return {"p50": None, "p99": None, "max": None}
        arr = np.fromiter(self._solver_ms, dtype=float)
        return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}
