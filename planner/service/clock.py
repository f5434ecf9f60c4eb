"""The service clock: Unix time for real executors, an accelerated virtual clock under --simulate."""
from __future__ import annotations

import contextlib
import threading
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

    def hold(self) -> contextlib.AbstractContextManager:
        """Real time never stands still: planning takes the time it takes."""
        return contextlib.nullcontext()


class SimClock:
    """Virtual seconds: ``start`` at creation, then ``speed`` virtual seconds per wall second.

    The service persists the clock in its journal and resumes from there after
    a restart, so virtual time stands still while the service is down. It
    also stands still while the planner solves (:meth:`hold`): planning takes
    no simulated time, as in the offline simulator, so ``--speed`` changes the
    pace of a simulation and not its outcome (at speed 20 the planner's
    wall-clock milliseconds would otherwise cost 20x as many simulated ones).
    """

    simulated = True

    def __init__(self, start: float = 0.0, speed: float = 1.0) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.start, self.speed = float(start), float(speed)
        self._t0 = time.monotonic()
        self._held: float | None = None
        self._lock = threading.Lock()

    def now(self) -> float:
        held = self._held
        if held is not None:
            return held
        return self.start + (time.monotonic() - self._t0) * self.speed

    @contextlib.contextmanager
    def hold(self):
        """Stop virtual time for the duration of the block, then resume where it stopped."""
        with self._lock:
            self._held = self.now()
        try:
            yield
        finally:
            with self._lock:
                self.start, self._t0, self._held = self._held, time.monotonic(), None

    def wall_delay(self, t: float) -> float:
        return (t - self.now()) / self.speed


class ManualClock:
    """Virtual seconds that move only when told (``advance``, ``set``): for driving a core in-process
    with ``PlannerCore.plan_once``, deterministically and with no sleeps."""

    speed = 1.0
    simulated = True

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> float:
        if dt < 0:
            raise ValueError(f"time cannot go back: advance({dt!r})")
        self._now += dt
        return self._now

    def set(self, t: float) -> float:
        return self.advance(t - self._now)

    def wall_delay(self, t: float) -> float:
        return t - self._now

    def hold(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()
