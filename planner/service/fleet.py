"""The fleet: the cluster's GPUs, which executor owns each, what runs or loads on it, and the weights it holds.

Per GPU: its owner (an executor session, or None: lost, and it looks busy
for ``LOST_GPU_S`` to the policy), the flight running on it, when it went
idle, and the weight loads dispatched to it but not yet reported (the GPU
stays busy until the executor reports them; ``load_end`` is their predicted
end). ``placement`` is None when the deployment places no models (every
model requests name on every GPU).

Not thread-safe: the core calls it under its lock.
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

from ditplan.planner.cluster import Cluster
from ditplan.planner.placement import Placement, WeightLoad, load_seconds
from ditplan.planner.service.book import Flight
from ditplan.planner.service.errors import FailedPrecondition, InvalidArgument, shown
from ditplan.planner.service.messages import LoadMsg
from ditplan.planner.service.sessions import ExecutorSession

TOL = 1e-6
LOST_GPU_S = 3600.0  # a GPU no executor owns looks busy for this long to the policy
OVERRUN_S = 0.05  # in-flight work past its predicted end looks busy for this long


class Fleet:
    def __init__(self, cluster: Cluster, placement: Placement | None) -> None:
        n = cluster.size
        self.cluster = cluster
        self.placement = placement
        self.sessions: dict[str, ExecutorSession] = {}
        self.owner: list[str | None] = [None] * n
        self.busy: list[Flight | None] = [None] * n
        self.free_at: list[float] = [0.0] * n
        self.loading: dict[int, list[WeightLoad]] = {}  # GPU -> loads not yet reported, in order
        self.load_end: list[float] = [0.0] * n

    # --- executors ----------------------------------------------------------
    def check_gpus(self, gpus: Sequence[int]) -> tuple[int, ...]:
        """An executor's GPU list, validated against the cluster."""
        gpus = tuple(int(g) for g in gpus)
        if not gpus:
            raise InvalidArgument("field 'gpus' = [] must name at least one GPU")
        for g in gpus:
            if not 0 <= g < self.cluster.size:
                raise InvalidArgument(f"field 'gpus' = {shown(list(gpus))}: GPU {g} is not in cluster "
                                      f"{self.cluster.name} (0..{self.cluster.size - 1})")
        if len(set(gpus)) != len(gpus):
            raise InvalidArgument(f"field 'gpus' = {shown(list(gpus))} repeats a GPU")
        return gpus

    def attach(self, sess: ExecutorSession, now: float) -> list[LoadMsg]:
        """Give ``sess`` its GPUs, idle from ``now``; the weights they hold, as ``initial`` loads."""
        for g in sess.gpus:
            if self.owner[g] is not None:
                raise FailedPrecondition(f"field 'gpus': GPU {g} is owned by executor {self.owner[g]!r}")
        self.sessions[sess.id] = sess
        loads = []
        for g in sess.gpus:
            self.owner[g], self.busy[g], self.free_at[g] = sess.id, None, now
            self.loading.pop(g, None)
            if self.placement is not None:  # what the deployment brings the GPU up with
                loads += [LoadMsg(WeightLoad(g, m, c), load_seconds(self.cluster, m, c), initial=True)
                          for m, c in sorted(self.placement.resident[g])]
        return loads

    def detach(self, sess: ExecutorSession) -> list[Flight]:
        """Take ``sess``'s GPUs away (their weights stay placed: the next executor of a GPU brings
        them up); the flights it took part in."""
        if self.sessions.get(sess.id) is sess:
            del self.sessions[sess.id]
        for g in sess.gpus:
            if self.owner[g] == sess.id:
                self.owner[g] = None
                self.loading.pop(g, None)
        return list({id(f): f for f in self.busy if f is not None and sess.id in f.executors}.values())

    def expired(self, timeout_s: float) -> list[ExecutorSession]:
        """Sessions with heartbeats that sent nothing for ``timeout_s`` wall seconds."""
        mono = time.monotonic()
        return [s for s in self.sessions.values() if s.heartbeats and mono - s.last_seen > timeout_s]

    def owners_of(self, gpus: Iterable[int]) -> set[str]:
        return {o for g in gpus if (o := self.owner[g]) is not None}

    def owned(self) -> int:
        return sum(1 for o in self.owner if o is not None)

    # --- flights ------------------------------------------------------------
    def occupy(self, flight: Flight) -> None:
        for g in flight.assignment.gpus:
            self.busy[g] = flight

    def release(self, flight: Flight, now: float) -> None:
        """The flight's GPUs (those it still holds) are idle from ``now``."""
        for g in flight.assignment.gpus:
            if self.busy[g] is flight:
                self.busy[g], self.free_at[g] = None, now

    def idle(self, g: int, now: float) -> bool:
        """Owned, nothing running or loading, and free by ``now``: an assignment may start on it."""
        return (self.owner[g] is not None and self.busy[g] is None and g not in self.loading
                and self.free_at[g] <= now + TOL)

    def any_idle(self) -> bool:
        return any(o is not None and f is None and g not in self.loading
                   for g, (o, f) in enumerate(zip(self.owner, self.busy)))

    def policy_free_at(self, now: float) -> list[float]:
        """When each GPU is free, as the policy sees it (lost and overrunning GPUs look busy a while)."""
        out = []
        for g in range(self.cluster.size):
            if self.owner[g] is None:
                out.append(now + LOST_GPU_S)
            elif g in self.loading:
                out.append(max(self.load_end[g], now + OVERRUN_S))
            elif (f := self.busy[g]) is not None:
                out.append(max(f.segment.end, now + OVERRUN_S))
            else:
                out.append(min(self.free_at[g], now))
        return out

    # --- weights ------------------------------------------------------------
    def start_load(self, w: WeightLoad, now: float) -> float:
        """Dispatch a load: its GPU stays busy until the executor reports it. Its predicted seconds."""
        secs = load_seconds(self.cluster, w.model, w.component)
        pending = self.loading.setdefault(w.gpu, [])
        self.load_end[w.gpu] = (self.load_end[w.gpu] if pending else now) + secs
        pending.append(w)
        return secs

    def end_loads(self, sess: ExecutorSession, loaded: Sequence[WeightLoad], failed: Sequence[WeightLoad],
                  now: float) -> bool:
        """Loads ``sess`` reports ended (``failed``: not resident after all); True if a GPU became idle."""
        for name, ws in (("loaded", loaded), ("load_failed", failed)):
            for w in ws:
                if not 0 <= w.gpu < self.cluster.size or self.owner[w.gpu] != sess.id:
                    raise FailedPrecondition(f"field {name!r}: GPU {w.gpu} is not owned by executor {shown(sess.id)}")
                if w not in self.loading.get(w.gpu, ()):
                    raise FailedPrecondition(f"field {name!r}: no load of {w.model}/{w.component} on GPU "
                                             f"{w.gpu} is in flight")
        if failed:
            self.placement = self.placement.apply(unloads=failed)
        freed = False
        for w in (*loaded, *failed):
            pending = self.loading[w.gpu]
            pending.remove(w)
            if not pending:
                del self.loading[w.gpu]
                self.free_at[w.gpu] = now
                freed = True
        return freed
