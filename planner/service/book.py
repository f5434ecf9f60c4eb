"""The request book: every admitted request, and the live ones indexed the way plans read them.

Live requests are split in two: *started* ones (progress, a latent, or work
in flight), which every plan sees, and *queued* fresh ones, kept sorted by
(deadline, admission order) so a plan can see the earliest deadlines first
(``window``). Entries admitted but not yet journaled are *pending*: they
exist (their ids are taken) but are invisible to clients and plans.

Not thread-safe: the core calls it under its lock.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from ditplan.planner.execution import Segment
from ditplan.planner.plan import Assignment
from ditplan.planner.request import Request, RequestStatus, Stage
from ditplan.planner.service.errors import NotFound, shown


@dataclass(eq=False)
class Flight:
    """An assignment in flight on its GPUs."""

    epoch: int
    assignment: Assignment
    segment: Segment  # predicted
    executors: frozenset[str]
    lead: str
    reported_steps: int = 0


@dataclass(eq=False)
class Tracked:
    """A request the service admitted: the planner's view and what executors reported."""

    seq: int
    status: RequestStatus  # the planner's view
    reported_steps: int = 0
    reported_encoded: bool = False
    outcome: str | None = None  # done | cancelled | rejected | failed
    flight: Flight | None = None
    pending: bool = False  # admitted, journal commit not yet confirmed: invisible
    work_gpu_s: float = 0.0  # its share of the backlog (GPU-seconds at its fastest degree)
    snap: RequestStatus | None = None  # the policy's copy of ``status``; None once ``status`` changes
    step_s_sum: float = 0.0
    step_s_n: int = 0
    stage_s: dict[Stage, float] = field(default_factory=dict)  # reported encode / decode seconds

    @property
    def id(self) -> str:
        return self.status.request.id


class RequestBook:
    def __init__(self) -> None:
        self.tracked: dict[str, Tracked] = {}  # every request, admission order
        self._by_seq: list[Tracked] = []
        self.live: dict[str, Tracked] = {}  # unfinished and visible
        self._started: dict[str, Tracked] = {}  # live with progress or work in flight: every plan sees them
        self._queued: list[tuple[float, int, str]] = []  # the other live ones, by (deadline, seq)
        self.pending_n = 0
        self._seq = 0
        self.backlog_gpu_s = 0.0  # the live requests' work_gpu_s

    # --- entries ------------------------------------------------------------
    def add(self, status: RequestStatus, **fields) -> Tracked:
        """A new entry, next in admission order (not live: see ``add_live`` and ``reserve``)."""
        t = Tracked(self._seq, status, **fields)
        self._seq += 1
        self.tracked[t.id] = t
        self._by_seq.append(t)
        return t

    def reserve(self, reqs: Sequence[Request], work_gpu_s) -> list[Tracked]:
        """Pending entries for requests whose journal write is under way."""
        out = [self.add(RequestStatus(r), pending=True, work_gpu_s=work_gpu_s(RequestStatus(r))) for r in reqs]
        self.pending_n += len(out)
        return out

    def confirm(self, tracked: Sequence[Tracked]) -> None:
        """Their journal write committed: visible and live."""
        self.pending_n -= len(tracked)
        for t in tracked:
            t.pending = False
            self.add_live(t)

    def drop(self, tracked: Sequence[Tracked]) -> None:
        """Their journal write failed: gone, ids free again."""
        self.pending_n -= len(tracked)
        for t in tracked:
            self.tracked.pop(t.id, None)
        self._by_seq = [t for t in self._by_seq if t.id in self.tracked]

    def visible(self, rid: str) -> Tracked:
        t = self.tracked.get(rid)
        if t is None or t.pending:
            raise NotFound(f"request {shown(rid)} not found")
        return t

    def unfinished(self) -> int:
        """Live and pending: what the admission limit counts."""
        return len(self.live) + self.pending_n

    # --- the live index -----------------------------------------------------
    def add_live(self, t: Tracked) -> None:
        self.live[t.id] = t
        self.backlog_gpu_s += t.work_gpu_s
        st = t.status
        if st.encoded or st.steps_done or t.flight is not None:
            self._started[t.id] = t
        else:
            bisect.insort(self._queued, (st.request.deadline, t.seq, t.id))

    def end(self, t: Tracked, outcome: str) -> None:
        """A live request ended (done, cancelled, rejected): out of the index and the backlog."""
        t.outcome = outcome
        del self.live[t.id]
        if self._started.pop(t.id, None) is None:
            self._unqueue(t)
        self.backlog_gpu_s = max(0.0, self.backlog_gpu_s - t.work_gpu_s)

    def mark_started(self, t: Tracked) -> None:
        if t.id not in self._started:
            self._unqueue(t)
            self._started[t.id] = t

    def mark_fresh(self, t: Tracked) -> None:
        """Back to no progress (its executor was lost before any report): queued by deadline again."""
        if self._started.pop(t.id, None) is not None:
            bisect.insort(self._queued, (t.status.request.deadline, t.seq, t.id))

    def _unqueue(self, t: Tracked) -> None:
        key = (t.status.request.deadline, t.seq, t.id)
        i = bisect.bisect_left(self._queued, key)
        if i < len(self._queued) and self._queued[i] == key:
            del self._queued[i]

    def started(self) -> Iterable[Tracked]:
        return self._started.values()

    def window(self, n: int) -> list[Tracked]:
        """What a plan sees, in admission order: every started request and the ``n`` queued ones with
        the earliest deadlines (0: all)."""
        n = n or len(self._queued)
        if n >= len(self._queued):
            return list(self.live.values())
        seen = list(self._started.values()) + [self.tracked[q[2]] for q in self._queued[:n]]
        seen.sort(key=lambda t: t.seq)
        return seen

    def waiting(self) -> Iterator[RequestStatus]:
        """The statuses the next wake-up depends on: the started ones and the most urgent queued one."""
        yield from (t.status for t in self._started.values())
        if self._queued:
            yield self.tracked[self._queued[0][2]].status

    # --- listing ------------------------------------------------------------
    def page(self, start_seq: int) -> Iterator[Tracked]:
        """Visible entries in admission order from ``start_seq`` on."""
        i = bisect.bisect_left(self._by_seq, start_seq, key=lambda t: t.seq) if start_seq else 0
        for j in range(i, len(self._by_seq)):
            if not (t := self._by_seq[j]).pending:
                yield t
