"""Counters of a running service; ``metrics.py`` exposes them to Prometheus at scrape time."""
from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

SOLVER_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class Stats:
    """Counters the metrics endpoint exposes (no Prometheus dependency here)."""

    plans: int = 0
    fallbacks: int = 0
    plan_violations: int = 0
    preemptions: int = 0
    submitted: int = 0
    refused: Counter = field(default_factory=Counter)  # by status code name
    executors_lost: int = 0
    requeued: int = 0
    done_met: int = 0
    done_missed: int = 0
    rejected: int = 0  # ended by the planner (--late reject)
    weight_loads: int = 0  # weight loads dispatched
    weight_load_s: float = 0.0  # their predicted seconds
    weight_load_failures: int = 0  # loads an executor reported failed
    solver_bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(SOLVER_BUCKETS_MS) + 1))
    solver_ms_sum: float = 0.0

    def observe_solver(self, ms: float) -> None:
        self.solver_ms_sum += ms
        self.solver_bucket_counts[bisect.bisect_left(SOLVER_BUCKETS_MS, ms)] += 1
