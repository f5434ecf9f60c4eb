"""A connected executor's session: the GPUs it owns and its queue of plan updates."""
from __future__ import annotations

import queue
import secrets
import time

from ditplan.planner.service.messages import PlanDelta


class ExecutorSession:
    """One connected executor: the GPUs it owns and its queue of plan updates."""

    def __init__(self, executor_id: str, gpus: tuple[int, ...], heartbeats: bool, now: float) -> None:
        self.id, self.gpus, self.heartbeats = executor_id, gpus, heartbeats
        self.last_seen = time.monotonic()
        self.last_seen_service = now
        self.known: set[str] = set()  # request ids whose data this executor has
        self.closed = False
        self.close_reason = ""
        # Issued at connect, in the first update: reports and a replacing stream must carry it.
        self.secret = secrets.token_urlsafe(18)
        self._queue: queue.SimpleQueue[PlanDelta | None] = queue.SimpleQueue()

    def owns(self, secret: str) -> bool:
        return secrets.compare_digest(secret or "", self.secret)

    def push(self, delta: PlanDelta | None) -> None:
        self._queue.put(delta)

    def next(self, timeout: float) -> PlanDelta | None:
        """The next update, or None on timeout or when the session closes."""
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
