"""An executor's side of the contract: plan updates in, step reports and heartbeats out.

    link = ExecutorLink(PlannerClient(addr), "node0", gpus=range(8), heartbeat_s=1.0)
    epoch, a = link.next_assignment(timeout=5)
    ... run a.steps steps of a.request_ids on a.gpus ...
    link.report(StepReport("node0", epoch, a.request_ids, a.stage, a.steps, step_times, done=True))

A thread reads the StreamPlans stream into a queue; ``report`` is one
synchronous ReportProgress call, so a refusal (e.g. FAILED_PRECONDITION for
a stale epoch) raises at once. With ``heartbeat_s`` another thread sends an
empty report that often, which keeps the executor alive across long steps.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Iterable

from ditplan.planner.service.client import PlannerClient, PlannerError
from ditplan.planner.service.messages import AssignmentMsg, PlanDelta, RequestData, StepReport

_END = object()


class ExecutorLink:
    def __init__(self, client: PlannerClient, executor_id: str, gpus: Iterable[int],
                 heartbeat_s: float | None = None) -> None:
        self.client, self.executor_id, self.gpus = client, executor_id, tuple(gpus)
        self.requests: dict[str, RequestData] = {}  # data received so far
        self.released: set[str] = set()
        self.error: PlannerError | None = None  # how the stream ended, if with an error
        self.epoch = 0
        self.secret = ""  # the session's, from the first update: every report carries it
        self._greeted = threading.Event()
        self._updates: queue.Queue = queue.Queue()
        self._assignments: list[tuple[int, AssignmentMsg]] = []
        self._stop = threading.Event()
        self._stream = client.stream_plans(executor_id, self.gpus)
        self._reader = threading.Thread(target=self._read, name=f"plans-{executor_id}", daemon=True)
        self._reader.start()
        self._beater = None
        if heartbeat_s:
            self._beater = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
            self._beater.start()

    def _read(self) -> None:
        try:
            for delta in self._stream:
                if delta.session_secret and not self._greeted.is_set():
                    self.secret = delta.session_secret
                    self._greeted.set()
                self._updates.put(delta)
        except PlannerError as exc:
            self.error = exc
        self._updates.put(_END)

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if self._greeted.is_set():
                    self.client.report_progress([StepReport(self.executor_id, session_secret=self.secret)],
                                                timeout=every * 4)
            except PlannerError:
                if self._stop.is_set():
                    return

    def next_update(self, timeout: float = 10.0) -> PlanDelta:
        """The next plan update; ``PlannerError`` if the stream ended, ``TimeoutError`` if none came."""
        try:
            item = self._updates.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no plan update within {timeout:g} s") from None
        if item is _END:
            self._updates.put(_END)  # stay ended
            raise self.error or PlannerError(_cancelled(), "plan stream closed")
        self._absorb(item)
        return item

    def _absorb(self, d: PlanDelta) -> None:
        self.epoch = max(self.epoch, d.plan_epoch)
        for r in d.requests:
            self.requests[r.id] = r
        self.released.update(d.released)
        self._assignments.extend((d.plan_epoch, a) for a in d.assignments if a.lead)

    def poll(self) -> int:
        """Absorb the updates already received (data, releases, assignments) without waiting."""
        n = 0
        while True:
            try:
                item = self._updates.get_nowait()
            except queue.Empty:
                return n
            if item is _END:
                self._updates.put(_END)
                return n
            self._absorb(item)
            n += 1

    def next_assignment(self, timeout: float = 10.0) -> tuple[int, AssignmentMsg]:
        """The next assignment this executor leads, with its plan epoch."""
        deadline = time.monotonic() + timeout
        while not self._assignments:
            self.next_update(max(0.0, deadline - time.monotonic()))
        return self._assignments.pop(0)

    def report(self, *reports: StepReport, timeout: float | None = None) -> int:
        """Send reports (each given this session's secret); waits for the first update's secret first."""
        if not self._greeted.wait(timeout or 10.0):
            raise PlannerError(_unavailable(), "no plan update with the session's secret yet")
        return self.client.report_progress([r if r.session_secret else dataclasses.replace(r, session_secret=self.secret)
                                            for r in reports], timeout=timeout)

    def close(self) -> None:
        """Leave: the server requeues this executor's work."""
        self._stop.set()
        self._stream.cancel()
        self._reader.join(timeout=5)
        if self._beater is not None:
            self._beater.join(timeout=5)


def _cancelled():
    import grpc
    return grpc.StatusCode.CANCELLED


def _unavailable():
    import grpc
    return grpc.StatusCode.UNAVAILABLE
