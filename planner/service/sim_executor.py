"""The in-process simulated executor behind ``ditplan serve --simulate``.

It connects to the core like any executor (same session, same deltas, same
report validation) and owns every GPU. Each assignment lasts what the
simulator would charge for it: the latent move plus its steps at the cost
model's step time (times a seeded lognormal factor per step with
``noise > 0``), on the service clock (real time, or accelerated with
``--speed``). It reports once per assignment, with the measured (here:
simulated) time of each step. A weight load takes its predicted seconds,
one after another on a GPU, and is reported when it ends; initial loads
(the placement at connect) are resident at once.
"""
from __future__ import annotations

import heapq
import logging
import threading

import numpy as np

from ditplan.planner.request import Stage
from ditplan.planner.service.errors import ServiceError
from ditplan.planner.service.messages import PlanDelta, StepReport

log = logging.getLogger(__name__)

POLL_S = 0.5


class SimulatedExecutor:
    def __init__(self, core, clock, noise: float = 0.0, seed: int = 0, executor_id: str = "simulator") -> None:
        self.core, self.clock, self.noise, self.executor_id = core, clock, noise, executor_id
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ditplan-sim-executor", daemon=True)
        self.session = None
        self._load_free: dict[int, float] = {}  # GPU -> end of its last load (service clock)

    def start(self) -> None:
        self.session = self.core.connect_executor(self.executor_id, range(self.core.cluster.size), heartbeats=False)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.session is not None:
            self.session.push(None)
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        pending: list[tuple[float, int, StepReport]] = []  # (end on the service clock, seq, report)
        seq = 0
        while not self._stop.is_set() and not self.session.closed:
            timeout = self.clock.wall_delay(pending[0][0]) if pending else POLL_S
            delta = self.session.next(min(POLL_S, timeout))
            while delta is not None:
                for rep_end in self._start(delta):
                    heapq.heappush(pending, (rep_end[0], seq, rep_end[1]))
                    seq += 1
                delta = self.session.next(0)
            while pending and self.clock.wall_delay(pending[0][0]) <= 0:
                _, _, rep = heapq.heappop(pending)
                try:
                    self.core.report(rep)
                except ServiceError as exc:  # cancelled or requeued meanwhile
                    log.debug("simulated report refused: %s", exc.message)

    def _start(self, delta: PlanDelta):
        for ld in delta.loads:
            if ld.initial:
                continue
            g = ld.weight.gpu
            end = max(delta.server_time, self._load_free.get(g, delta.server_time)) + ld.predicted_s
            self._load_free[g] = end
            yield end, StepReport(self.executor_id, delta.plan_epoch, loaded=(ld.weight,),
                                  session_secret=self.session.secret)
        for a in delta.assignments:
            if not a.lead:
                continue
            if a.stage is Stage.DIFFUSE:
                if self.noise > 0:
                    steps = a.predicted_step_s * self._rng.lognormal(0.0, self.noise, a.steps)
                else:
                    steps = np.full(a.steps, a.predicted_step_s)
                duration = a.predicted_move_s + float(np.sum(steps))
                times = tuple(float(x) for x in steps)
            else:
                duration, times = a.predicted_s, ()
            rep = StepReport(self.executor_id, delta.plan_epoch, a.request_ids, a.stage, a.steps, times, True,
                             session_secret=self.session.secret)
            yield delta.server_time + duration, rep
