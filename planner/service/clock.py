"""The service clock: Unix time for real executors, an accelerated virtual clock under --simulate."""
from __future__ import annotations

import time


class WallClock:
    """Unix time; ``speed`` 1."""

    speed = 1.0
    simulated = False

    def now(self) -> float:
        return time.time()

    def wall_delay(self, t: float) -> float:
        """Wall seconds from now until service time ``t`` (<= 0: passed)."""
        return t - self.now()


class SimClock:
    """Virtual seconds: ``start`` at creation, then ``speed`` virtual seconds per wall second.

    The service persists the clock in its journal and resumes from there after
    a restart, so virtual time stands still while the service is down.
    """

    simulated = True

    def __init__(self, start: float = 0.0, speed: float = 1.0) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.start, self.speed = float(start), float(speed)
        self._t0 = time.monotonic()

    def now(self) -> float:
        return self.start + (time.monotonic() - self._t0) * self.speed

    def wall_delay(self, t: float) -> float:
        return (t - self.now()) / self.speed
