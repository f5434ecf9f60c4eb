"""The planning service's core: admitted requests, executors, and the planning loop.

The loop follows the simulator's semantics (the execution rules of
``planner/execution.py``: ``start_segment``, ``end_segment``,
``count_preemptions`` and ``next_wake``): it plans on arrivals, on completions (step boundaries) and on a
round timer; a plan assigns work only to idle GPUs; a request whose diffuse
segment just ended and that the plan does not continue is paused (latent
kept) and charged a preemption.

Two views of progress:

* the planner's view (``RequestStatus``, as in the simulator): a segment's
  steps count when it starts, so policies see exactly what they see in a
  simulation;
* the reported view: steps and encode the executors have reported. It is
  what the journal keeps, what GetRequest shows, and where a request
  resumes when its executor is lost (its in-flight work is rolled back to
  the last reported step, its latent is presumed lost, and it is requeued).

Plan epochs: every dispatched plan update gets the next epoch (the high 32
bits are the journal's start count, so epochs grow across restarts). An
assignment is fenced by its epoch: a report must name the epoch of its
request's current assignment, else FAILED_PRECONDITION.

Placement: with ``CoreConfig.models`` the core keeps a ``Placement`` (per
GPU, the resident weights), starting from ``static_placement`` with equal
shares (there is no trace to weigh) or the ``placement`` split. An executor
is told, when it connects, the weights its GPUs hold (``initial`` loads: the
deployment brings them up, as the simulator's initial placement at time 0).
A plan's unloads free their bytes at once; its loads keep their GPU busy
until the executor reports them in ``StepReport.loaded``. Placement is not
journaled: after a restart it is the configured one again. Without
``models`` every model requests name is resident on every GPU (they must
fit together: admission refuses one that does not).

Threads: gRPC handlers call the public methods; one loop thread plans. All
state is under one lock; the policy runs outside it on a snapshot, and its
assignments are re-validated against the live state before dispatch.
"""
from __future__ import annotations

import bisect
import copy
import itertools
import logging
import math
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ditplan.models.catalog import get_model
from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.errors import PlacementError
from ditplan.planner.placement import (Placement, WeightLoad, check_fits, load_seconds, static_placement,
                               validate_placement)
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import make_policy
from ditplan.planner.request import Request, RequestState, RequestStatus, Stage
from ditplan.planner.service.admission import RequestSpec, validate_batch, validate_spec
from ditplan.planner.service.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                                            PermissionDenied, ResourceExhausted, ServiceError, Unavailable, shown)
from ditplan.planner.service.journal import Journal, JournalError, Recovered
from ditplan.planner.service.messages import (STATES, AssignmentMsg, ExecutorView, LoadMsg, MigrationMsg, PauseMsg,
                                      PlanDelta, RequestData, RequestView, ServerInfoView, StepReport,
                                      SubmitOutcome)
from ditplan.planner.service.planning import PlannerProcess, plan_checked
from ditplan.planner.service.sessions import ExecutorSession
from ditplan.planner.service.stats import Stats
from ditplan.planner.execution import Segment, count_preemptions, diffuse_costs, end_segment, next_wake, start_segment
from ditplan.planner.state import PlannerState

log = logging.getLogger(__name__)

TOL = 1e-6
LOST_GPU_S = 3600.0  # a GPU no executor owns looks busy for this long to the policy
OVERRUN_S = 0.05  # in-flight work past its predicted end looks busy for this long
MAX_BATCH = 10_000
MAX_PAGE = 10_000
DEFAULT_PAGE = 1_000
JOURNAL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class CoreConfig:
    cluster: Cluster
    cost: CostModel
    policy: str
    slo_scale: float = 1.5
    round_s: float = 2.0
    max_queue: int = 10_000  # live (unfinished) requests at most
    heartbeat_timeout_s: float = 10.0
    check_plans: bool = True
    fallback_policy: str = "tetriserve-dp"
    min_plan_gap_s: float = 0.005  # wall seconds between plans at least: a burst of events makes one plan
    max_plan_duty: float = 0.25  # planning takes at most this share of wall time (the gap grows with plan cost)
    planner_process: bool = False  # run the policy in a child process (needs cluster_spec)
    cluster_spec: str = ""  # how the child rebuilds the cluster
    plan_window: int = 512  # not-yet-started requests a plan sees at most (earliest deadlines); 0: all
    # Options of the policy (e.g. late="reject", wall_limit_s=0.5): real time rules in a service.
    policy_options: dict = field(default_factory=dict)
    version: str = ""
    # The models this deployment serves, placed per GPU by ``placement`` (auto | replicate | split |
    # MODEL:GPUS,...). Empty: every model requests name, on every GPU.
    models: tuple[str, ...] = ()
    placement: str = "auto"


def initial_placement(config: CoreConfig) -> Placement | None:
    """The placement a deployment of ``config.models`` starts from (None: replicate what arrives)."""
    if not config.models:
        return None
    shares = {m: 1.0 for m in config.models}
    placement = static_placement(config.cluster, (), config.cost, config.placement, models=config.models,
                                 shares=shares)
    validate_placement(placement, config.cluster)
    return placement


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

    @property
    def id(self) -> str:
        return self.status.request.id


@dataclass(frozen=True)
class _ShapeCosts:
    k: int  # fastest SP degree
    step: float  # step seconds at k
    encode: float
    decode: float


@dataclass
class _Snapshot:
    now: float
    state: PlannerState
    just_paused: list[Tracked]


class PlannerCore:
    def __init__(self, config: CoreConfig, journal: Journal, recovered: Recovered, clock) -> None:
        self.config = config
        self.cluster, self.cost = config.cluster, config.cost
        self.clock = clock
        self.journal = journal
        self.stats = Stats()
        self._policy = make_policy(config.policy, **config.policy_options)
        self._placement = initial_placement(config)
        self._places_models = bool(getattr(self._policy, "places_models", False))
        self._models_seen: set[str] = set()  # without a placement: the models on every GPU
        self._fallback = make_policy(config.fallback_policy) if config.fallback_policy != config.policy else None
        self._shape_costs: dict[tuple, _ShapeCosts] = {}
        self._ideal = self._ideal_latency
        self._cv = threading.Condition(threading.Lock())
        self._tracked: dict[str, Tracked] = {}  # every request, admission order
        self._by_seq: list[Tracked] = []
        self._live: dict[str, Tracked] = {}  # unfinished and visible
        self._started: dict[str, Tracked] = {}  # live with progress or work in flight: every plan sees them
        self._queued: list[tuple[float, int, str]] = []  # the other live ones, by (deadline, seq)
        self._pending_n = 0
        self._seq = 0
        n = self.cluster.size
        self._owner: list[str | None] = [None] * n
        self._busy: list[Flight | None] = [None] * n
        self._free_at: list[float] = [0.0] * n
        self._loading: dict[int, list[WeightLoad]] = {}  # GPU -> loads not yet reported, in order
        self._load_end: list[float] = [0.0] * n  # predicted end of a GPU's loads
        self._sessions: dict[str, ExecutorSession] = {}
        self._epoch = recovered.generation << 32
        self._just_paused: list[Tracked] = []
        self._dirty = False
        self._wake: float | None = None
        self._backlog_gpu_s = 0.0
        self._stopping = False
        self._next_plan_at = 0.0
        self._proc: PlannerProcess | None = None
        self._thread = threading.Thread(target=self._loop, name="ditplan-planner", daemon=True)
        self._recover(recovered)

    # --- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        if self.config.planner_process:
            self._proc = PlannerProcess(self.config.cluster_spec, self.config.policy,
                                        self._fallback.name if self._fallback else None, self.config.check_plans,
                                        options=self.config.policy_options)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            for sess in list(self._sessions.values()):
                sess.closed, sess.close_reason = True, "server shutting down"
                sess.push(None)
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._proc is not None:
            self._proc.close()
            self._proc = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def _recover(self, rec: Recovered) -> None:
        for row in rec.rows:
            req = Request(row.id, row.model, _shape(row.height, row.width, row.frames), row.steps,
                          row.arrival, row.deadline)
            st = RequestStatus(req, encoded=row.encoded, steps_done=row.steps_done,
                               preemptions=row.preemptions, sp_changes=row.sp_changes, migrations=row.migrations)
            t = Tracked(self._seq, st, reported_steps=row.steps_done, reported_encoded=row.encoded,
                        outcome=row.outcome)
            self._seq += 1
            if row.outcome is None:
                st.state = RequestState.PAUSED if (row.encoded or row.steps_done) else RequestState.QUEUED
                t.work_gpu_s = self._work_gpu_s(st)
                self._backlog_gpu_s += t.work_gpu_s
                self._add_live(t)
            else:
                st.state = RequestState.DONE if row.outcome == "done" else RequestState.FAILED
                st.finish = row.finish
                st.rejected = row.reason
                if row.outcome == "done":
                    if row.finish is not None and row.finish <= row.deadline + 1e-9:
                        self.stats.done_met += 1
                    else:
                        self.stats.done_missed += 1
            self._tracked[row.id] = t
            self._by_seq.append(t)
            if row.outcome is None:
                self._models_seen.add(row.model)
        self._dirty = bool(self._live)
        if rec.rows:
            log.info("recovered %d requests (%d unfinished) from %s", len(rec.rows), len(self._live),
                     self.journal.path)

    # --- admission ----------------------------------------------------------
    def submit(self, specs: Sequence[RequestSpec], allow_partial: bool = False) -> list[SubmitOutcome]:
        """Admit requests; durable (journaled) before this returns.

        All-or-nothing unless ``allow_partial``: every spec is validated and
        the first bad one rejects the whole call with its error.
        """
        if not specs:
            raise InvalidArgument("field 'requests' is empty: nothing to submit")
        if len(specs) > MAX_BATCH:
            raise InvalidArgument(f"field 'requests' has {len(specs)} entries; at most {MAX_BATCH} per call")
        now = self.clock.now()
        if not allow_partial:
            try:
                reqs = validate_batch(specs, now, self._ideal, self.config.slo_scale)
            except ServiceError as exc:
                self._count_refused(exc, len(specs))
                raise
            with self._cv:
                models = set(self._models_seen)
                for i, r in enumerate(reqs):
                    if r.id in self._tracked:
                        exc = AlreadyExists(f"requests[{i}]: field 'id' = {r.id!r} already exists")
                        self._count_refused(exc, len(specs))
                        raise exc
                    if (why := self._unservable(r, models)) is not None:
                        exc = InvalidArgument(f"requests[{i}]: {why}")
                        self._count_refused(exc, len(specs))
                        raise exc
                    models.add(r.model)
                free = self._capacity()
                if len(reqs) > free:
                    exc = ResourceExhausted(self._full_message(len(reqs), free))
                    self._count_refused(exc, len(specs))
                    raise exc
                tracked, fut = self._reserve(reqs)
            self._commit_admission(tracked, fut)
            with self._cv:
                return [self._outcome(t, now) for t in tracked]
        # Partial: each spec on its own.
        results: list[SubmitOutcome | Request] = []
        for i, spec in enumerate(specs):
            try:
                results.append(validate_spec(spec, i, now, self._ideal, self.config.slo_scale))
            except ServiceError as exc:
                self._count_refused(exc, 1)
                results.append(_refusal(spec.id, exc))
        with self._cv:
            free = self._capacity()
            ok: list[Request] = []
            seen: set[str] = set()
            models = set(self._models_seen)
            for i, r in enumerate(results):
                if isinstance(r, SubmitOutcome):
                    continue
                exc: ServiceError | None = None
                if r.id in self._tracked or r.id in seen:
                    exc = AlreadyExists(f"requests[{i}]: field 'id' = {r.id!r} already exists")
                elif (why := self._unservable(r, models)) is not None:
                    exc = InvalidArgument(f"requests[{i}]: {why}")
                elif len(ok) >= free:
                    exc = ResourceExhausted(self._full_message(1, 0))
                if exc is not None:
                    self._count_refused(exc, 1)
                    results[i] = _refusal(r.id, exc)
                else:
                    seen.add(r.id)
                    models.add(r.model)
                    ok.append(r)
            tracked, fut = self._reserve(ok)
        self._commit_admission(tracked, fut)
        with self._cv:
            by_id = {t.id: self._outcome(t, now) for t in tracked}
        return [r if isinstance(r, SubmitOutcome) else by_id[r.id] for r in results]

    def _unservable(self, r: Request, models: set[str]) -> str | None:
        """Under the lock: why this deployment can never run ``r`` (None: it can).

        ``models``: those on every GPU when there is no placement (the ones
        admitted so far, this call's included)."""
        try:
            check_fits([r], self.cluster)
        except PlacementError as exc:
            return str(exc)
        if self._placement is not None:
            if r.model not in self.config.models and not self._places_models:
                return (f"field 'model' = {r.model!r} is not served here (models: {', '.join(self.config.models)}) "
                        f"and policy {self.config.policy} does not load models")
            return None
        if r.model in models:
            return None
        together = sorted(models | {r.model})
        need = sum(get_model(m).weight_bytes for m in together)
        smallest = min(g.memory for g in self.cluster.gpus)
        if need <= smallest:
            return None
        return (f"field 'model' = {r.model!r} does not fit beside {', '.join(sorted(models))} on every GPU "
                f"({need} bytes of weights for {', '.join(together)}; a GPU of {self.cluster.name} has {smallest}): "
                f"start the service with --models to place models per GPU")

    # --- live-set bookkeeping (under the lock) --------------------------------
    def _add_live(self, t: Tracked) -> None:
        self._live[t.id] = t
        st = t.status
        if st.encoded or st.steps_done or t.flight is not None:
            self._started[t.id] = t
        else:
            bisect.insort(self._queued, (st.request.deadline, t.seq, t.id))

    def _remove_live(self, t: Tracked) -> None:
        del self._live[t.id]
        if self._started.pop(t.id, None) is None:
            self._unqueue(t)

    def _mark_started(self, t: Tracked) -> None:
        if t.id not in self._started:
            self._unqueue(t)
            self._started[t.id] = t

    def _mark_fresh(self, t: Tracked) -> None:
        if self._started.pop(t.id, None) is not None:
            bisect.insort(self._queued, (t.status.request.deadline, t.seq, t.id))

    def _unqueue(self, t: Tracked) -> None:
        key = (t.status.request.deadline, t.seq, t.id)
        i = bisect.bisect_left(self._queued, key)
        if i < len(self._queued) and self._queued[i] == key:
            del self._queued[i]

    def _capacity(self) -> int:
        return self.config.max_queue - len(self._live) - self._pending_n

    def _full_message(self, asked: int, free: int) -> str:
        return (f"admission queue full: {len(self._live) + self._pending_n} unfinished requests, "
                f"limit {self.config.max_queue}; {asked} more refused ({max(0, free)} free)")

    def _count_refused(self, exc: ServiceError, n: int) -> None:
        self.stats.refused[exc.code.name] += n

    def _reserve(self, reqs: Sequence[Request]) -> tuple[list[Tracked], Future | None]:
        """Under the lock: add invisible entries (admission order = journal order) and queue the journal write."""
        out = []
        for r in reqs:
            t = Tracked(self._seq, RequestStatus(r), pending=True, work_gpu_s=self._work_gpu_s(RequestStatus(r)))
            self._seq += 1
            self._tracked[r.id] = t
            self._by_seq.append(t)
            self._models_seen.add(r.model)
            out.append(t)
        self._pending_n += len(out)
        if not out:
            return out, None
        fut = self.journal.append_requests(
            (r.id, r.model, r.shape.height, r.shape.width, r.shape.frames, r.steps, r.arrival, r.deadline)
            for r in reqs)
        return out, fut

    def _commit_admission(self, tracked: list[Tracked], fut: Future | None) -> None:
        """Wait for the journal, then make the requests visible (or drop them if the write failed)."""
        if not tracked:
            return
        err: Exception | None = None
        try:
            fut.result(timeout=JOURNAL_TIMEOUT_S)
        except Exception as exc:  # JournalError, timeout
            err = exc
        with self._cv:
            self._pending_n -= len(tracked)
            for t in tracked:
                if err is not None:
                    self._tracked.pop(t.id, None)
                    continue
                t.pending = False
                self._add_live(t)
                self._backlog_gpu_s += t.work_gpu_s
            if err is not None:
                self._by_seq = [t for t in self._by_seq if t.id in self._tracked]
                self.stats.refused["UNAVAILABLE"] += len(tracked)
            else:
                self.stats.submitted += len(tracked)
                if self._any_idle_gpu():  # as in the simulator: no idle GPU, nothing to plan on an arrival
                    self._dirty = True
                    self._cv.notify_all()
        if err is not None:
            raise Unavailable(f"journal write failed, nothing admitted: {err}")

    def _outcome(self, t: Tracked, now: float) -> SubmitOutcome:
        r = t.status.request
        return SubmitOutcome(r.id, True, r.arrival, r.deadline, self._predict(t, now) or math.nan)

    # --- cancel and status --------------------------------------------------
    def cancel(self, rid: str) -> RequestView:
        if not isinstance(rid, str) or not rid:
            raise InvalidArgument(f"field 'id' = {shown(rid)} must be a non-empty string")
        with self._cv:
            t = self._visible(rid)
            if t.outcome is not None:
                raise FailedPrecondition(f"request {shown(rid)} is already {t.outcome}; only live requests can be cancelled")
            self._end_unfinished(t, "cancelled")
            st = t.status
            fut = self.journal.record_outcome(rid, "cancelled", None, t.reported_steps, t.reported_encoded,
                                              st.preemptions, st.sp_changes, st.migrations, wait=True)
            view = self._view(t, self.clock.now())
            self._dirty = True
            self._cv.notify_all()
        _wait(fut)
        return view

    def _end_unfinished(self, t: Tracked, outcome: str) -> None:
        """Under the lock: end a live request unfinished (cancelled or rejected): out of the live
        index and the backlog, released on the executors that hold it."""
        t.outcome = outcome
        st = t.status
        st.state = RequestState.FAILED
        self._remove_live(t)
        self._backlog_gpu_s = max(0.0, self._backlog_gpu_s - t.work_gpu_s)
        holders = t.flight.executors if t.flight is not None else self._owners_of(st.latent_gpus)
        for eid in holders:
            sess = self._sessions.get(eid)
            if sess is not None and t.id in sess.known:
                sess.known.discard(t.id)
                sess.push(PlanDelta(self._epoch, self.clock.now(), released=[t.id]))

    def _reject(self, rid: str, reason: str) -> None:
        """Under the lock: end a live, idle request the planner gave up on (``--late reject``)."""
        t = self._live.get(rid)
        if t is None or t.outcome is not None or t.flight is not None or t.status.in_flight:
            return
        self._end_unfinished(t, "rejected")
        st = t.status
        st.rejected = reason
        self.stats.rejected += 1
        self.journal.record_outcome(rid, "rejected", None, t.reported_steps, t.reported_encoded,
                                    st.preemptions, st.sp_changes, st.migrations, reason=reason)
        log.info("rejected %s: %s", rid, reason)

    def get(self, rid: str) -> RequestView:
        if not isinstance(rid, str) or not rid:
            raise InvalidArgument(f"field 'id' = {shown(rid)} must be a non-empty string")
        with self._cv:
            return self._view(self._visible(rid), self.clock.now())

    def list(self, states: Iterable[str] = (), page_size: int = 0,
             page_token: str = "") -> tuple[list[RequestView], str]:
        """A page of requests in admission order, and the token of the next page ("" at the end)."""
        wanted = set(states)
        bad = wanted - set(STATES)
        if bad:
            raise InvalidArgument(f"field 'states' = {shown(sorted(bad))} unknown; known: {', '.join(STATES)}")
        if page_size < 0 or page_size > MAX_PAGE:
            raise InvalidArgument(f"field 'page_size' = {page_size} must be 0..{MAX_PAGE}")
        size = page_size or DEFAULT_PAGE
        start = 0
        if page_token:
            try:
                start = int(page_token)
                if start < 0:
                    raise ValueError
            except ValueError:
                raise InvalidArgument(f"field 'page_token' = {shown(page_token)} is not a token this server issued") from None
        out: list[RequestView] = []
        with self._cv:
            now = self.clock.now()
            i = bisect.bisect_left(self._by_seq, start, key=lambda t: t.seq) if start else 0
            while i < len(self._by_seq) and len(out) < size:
                t = self._by_seq[i]
                i += 1
                if t.pending:
                    continue
                v = self._view(t, now)
                if not wanted or v.state in wanted:
                    out.append(v)
            next_token = str(self._by_seq[i].seq) if i < len(self._by_seq) else ""
        return out, next_token

    def info(self) -> ServerInfoView:
        with self._cv:
            now = self.clock.now()
            counts: Counter = Counter()
            for t in self._tracked.values():
                if not t.pending:
                    counts[self._state(t)] += 1
            execs = tuple(ExecutorView(s.id, s.gpus, s.last_seen_service) for s in self._sessions.values())
            return ServerInfoView(now, self.clock.speed, self.clock.simulated, self.cluster.name, self.cluster.size,
                                  self.config.policy, self._epoch, execs, {s: counts.get(s, 0) for s in STATES},
                                  self.config.version, self.config.slo_scale, self.config.max_queue,
                                  self._placement.names() if self._placement is not None else (),
                                  self.stats.weight_loads)

    def slo_attainment(self) -> float | None:
        """Met / decided so far: done requests, and live ones already past their deadline (certain misses)."""
        with self._cv:
            now = self.clock.now()
            late_live = sum(1 for t in self._live.values() if t.status.request.deadline < now)
            decided = self.stats.done_met + self.stats.done_missed + late_live
            return self.stats.done_met / decided if decided else None

    def _visible(self, rid: str) -> Tracked:
        t = self._tracked.get(rid)
        if t is None or t.pending:
            raise NotFound(f"request {shown(rid)} not found")
        return t

    def _state(self, t: Tracked) -> str:
        """The state a client sees: ``paused`` only once diffuse steps ran and stopped (preempted); a
        request waiting for its first step (encoded or not) is ``queued``."""
        if t.outcome is not None:
            return t.outcome
        st = t.status
        if st.state is RequestState.PAUSED and st.steps_done == 0:
            return "queued"
        return st.state.value

    def _view(self, t: Tracked, now: float) -> RequestView:
        st, r = t.status, t.status.request
        gpus = t.flight.assignment.gpus if t.flight is not None else st.latent_gpus
        return RequestView(
            id=r.id, model=r.model, height=r.shape.height, width=r.shape.width, frames=r.shape.frames,
            steps=r.steps, state=self._state(t), steps_done=t.reported_steps, encoded=t.reported_encoded,
            arrival=r.arrival, deadline=r.deadline, predicted_finish=self._predict(t, now), finish=st.finish,
            sp=st.sp, gpus=tuple(gpus), preemptions=st.preemptions, sp_changes=st.sp_changes,
            migrations=st.migrations, measured_step_s=(t.step_s_sum / t.step_s_n) if t.step_s_n else None,
            plan_epoch=t.flight.epoch if t.flight is not None else 0,
            reason=st.rejected if t.outcome == "rejected" else None)

    # --- predictions --------------------------------------------------------
    def _costs(self, model: str, shape) -> _ShapeCosts:
        """Cost-model figures of a (model, shape), computed once (admission calls this per request)."""
        key = (model, shape)
        c = self._shape_costs.get(key)
        if c is None:
            spec = get_model(model)
            k = self.cost.best_sp(spec, shape, self.cluster.max_node_gpus)
            c = _ShapeCosts(k, self.cost.step_time(spec, shape, k), self.cost.encode_time(spec, shape),
                            self.cost.decode_time(spec, shape))
            if len(self._shape_costs) < 4096:
                self._shape_costs[key] = c
        return c

    def _ideal_latency(self, model: str, shape, steps: int) -> float:
        """``CostModel.ideal_latency`` (same terms, same order), from the cache."""
        c = self._costs(model, shape)
        return c.encode + steps * c.step + c.decode

    def _work_gpu_s(self, st: RequestStatus) -> float:
        """GPU-seconds the rest of a request needs at its fastest degree (the backlog's unit)."""
        r = st.request
        c = self._costs(r.model, r.shape)
        return c.k * st.remaining_steps * c.step + (0.0 if st.encoded else c.encode) + c.decode

    def _predict(self, t: Tracked, now: float) -> float | None:
        """Estimated finish: the rest at the request's degree after any in-flight work, plus a fluid queue wait."""
        st, r = t.status, t.status.request
        if t.outcome == "done":
            return st.finish
        if t.outcome is not None:
            return None
        c = self._costs(r.model, r.shape)
        step = c.step if not st.sp or st.sp == c.k else self.cost.step_time(r.spec, r.shape, st.sp)
        rest = st.remaining_steps * step
        if t.flight is not None:
            if t.flight.assignment.stage is Stage.DECODE:
                return max(now, t.flight.segment.end)
            return max(now, t.flight.segment.end) + rest + c.decode
        owned = sum(1 for o in self._owner if o is not None) or self.cluster.size
        wait = self._backlog_gpu_s / owned
        return now + wait + (0.0 if st.encoded else c.encode) + rest + c.decode

    # --- executors ----------------------------------------------------------
    def connect_executor(self, executor_id: str, gpus: Sequence[int], heartbeats: bool = True,
                         secret: str = "") -> ExecutorSession:
        """Register an executor owning ``gpus``; its first update (the current epoch and the session's
        secret) is queued at once. A live session of the same id is replaced only given its ``secret``."""
        if not isinstance(executor_id, str) or not executor_id.strip():
            raise InvalidArgument(f"field 'executor_id' = {shown(executor_id)} must be a non-empty string")
        gpus = tuple(int(g) for g in gpus)
        if not gpus:
            raise InvalidArgument("field 'gpus' = [] must name at least one GPU")
        for g in gpus:
            if not 0 <= g < self.cluster.size:
                raise InvalidArgument(f"field 'gpus' = {shown(list(gpus))}: GPU {g} is not in cluster "
                                      f"{self.cluster.name} (0..{self.cluster.size - 1})")
        if len(set(gpus)) != len(gpus):
            raise InvalidArgument(f"field 'gpus' = {shown(list(gpus))} repeats a GPU")
        with self._cv:
            if self._stopping:
                raise Unavailable("server shutting down")
            old = self._sessions.get(executor_id)
            if old is not None:
                if not old.owns(secret):
                    raise PermissionDenied(f"executor {shown(executor_id)} is connected: a new stream with its id needs "
                                           "that session's secret (field 'session_secret')")
                self._lose(old, "replaced by a new connection of the same executor id")
            for g in gpus:
                if self._owner[g] is not None:
                    raise FailedPrecondition(f"field 'gpus': GPU {g} is owned by executor {self._owner[g]!r}")
            now = self.clock.now()
            sess = ExecutorSession(executor_id, gpus, heartbeats, now)
            self._sessions[executor_id] = sess
            first = PlanDelta(self._epoch, now, session_secret=sess.secret)
            for g in gpus:
                self._owner[g], self._busy[g], self._free_at[g] = executor_id, None, now
                self._loading.pop(g, None)
                if self._placement is not None:  # what the deployment brings the GPU up with
                    first.loads += [LoadMsg(WeightLoad(g, m, c), load_seconds(self.cluster, m, c), initial=True)
                                    for m, c in sorted(self._placement.resident[g])]
            sess.push(first)
            self._dirty = True
            self._cv.notify_all()
        log.info("executor %r connected with GPUs %s", executor_id, list(gpus))
        return sess

    def disconnect_executor(self, sess: ExecutorSession, reason: str = "plan stream closed") -> None:
        """The executor's stream ended: its GPUs are lost and its work requeued."""
        with self._cv:
            if not sess.closed and self._sessions.get(sess.id) is sess and not self._stopping:
                self._lose(sess, reason)

    def _lose(self, sess: ExecutorSession, reason: str) -> None:
        """Under the lock: mark the executor's GPUs lost, requeue its work from the last reported step."""
        sess.closed, sess.close_reason = True, reason
        sess.push(None)
        if self._sessions.get(sess.id) is sess:
            del self._sessions[sess.id]
        now = self.clock.now()
        lost = set(sess.gpus)
        for g in sess.gpus:
            if self._owner[g] == sess.id:
                self._owner[g] = None
                self._loading.pop(g, None)  # its weights stay placed: the next executor of g brings them up
        flights = {id(f): f for f in self._busy if f is not None and sess.id in f.executors}
        requeued = 0
        for f in flights.values():
            for g in f.assignment.gpus:
                if self._busy[g] is f:
                    self._busy[g], self._free_at[g] = None, now
            for rid in f.assignment.request_ids:
                t = self._tracked[rid]
                t.flight, t.snap = None, None
                if t.outcome is not None:
                    continue
                st = t.status
                st.steps_done, st.encoded = t.reported_steps, t.reported_encoded
                st.state = RequestState.PAUSED if (st.encoded or st.steps_done) else RequestState.QUEUED
                st.latent_gpus = ()
                if st.state is RequestState.QUEUED:
                    self._mark_fresh(t)
                requeued += 1
            for eid in f.executors - {sess.id}:  # the rest of the group drops the work
                other = self._sessions.get(eid)
                if other is not None:
                    ids = [rid for rid in f.assignment.request_ids if rid in other.known]
                    other.known.difference_update(ids)
                    if ids:
                        other.push(PlanDelta(self._epoch, now, released=ids))
        for t in self._started.values():
            st = t.status
            if t.flight is None and st.latent_gpus and lost.intersection(st.latent_gpus):
                st.latent_gpus = ()  # its latent was on a lost GPU: resume from the last reported step
                t.snap = None
        self.stats.executors_lost += 1
        self.stats.requeued += requeued
        self._dirty = True
        self._cv.notify_all()
        log.warning("executor %r lost (%s): GPUs %s, %d requests requeued", sess.id, reason, sorted(lost), requeued)

    def _owners_of(self, gpus: Iterable[int]) -> set[str]:
        return {o for g in gpus if (o := self._owner[g]) is not None}

    # --- progress reports ---------------------------------------------------
    def report(self, rep: StepReport, wait: bool = False) -> None:
        """Apply an executor's report; journal its progress (waiting for the commit if ``wait``)."""
        with self._cv:
            sess = self._sessions.get(rep.executor_id)
            if sess is None or sess.closed:
                raise FailedPrecondition(f"executor {shown(rep.executor_id)} is not connected: open StreamPlans first "
                                         "(or it was declared lost; its work was requeued)")
            if not sess.owns(rep.session_secret):
                raise PermissionDenied(f"report for executor {shown(rep.executor_id)} without its session's secret "
                                       "(field 'session_secret', from the first plan update)")
            sess.last_seen, sess.last_seen_service = time.monotonic(), self.clock.now()
            if rep.loaded or rep.load_failed:
                self._apply_loaded(sess, rep.loaded, rep.load_failed)
            if not rep.request_ids:
                return  # heartbeat, or loads only
            fut = self._apply_report(sess, rep)
        if wait and fut is not None:
            _wait(fut)

    def _apply_report(self, sess: ExecutorSession, rep: StepReport):
        if rep.plan_epoch > self._epoch:
            raise FailedPrecondition(f"plan epoch {rep.plan_epoch} is ahead of the server's ({self._epoch})")
        flight: Flight | None = None
        for rid in rep.request_ids:
            t = self._tracked.get(rid)
            if t is None or t.pending:
                raise NotFound(f"request {shown(rid)} not found")
            if t.flight is None or t.flight.epoch != rep.plan_epoch:
                now_epoch = f"its assignment is from epoch {t.flight.epoch}" if t.flight is not None else \
                    "it has no assignment in flight (requeued, cancelled or finished)"
                raise FailedPrecondition(f"stale plan epoch {rep.plan_epoch} for request {shown(rid)}: {now_epoch}")
            if flight is not None and t.flight is not flight:
                raise InvalidArgument(f"field 'request_ids' = {shown(list(rep.request_ids))} spans several assignments")
            flight = t.flight
        assert flight is not None
        a = flight.assignment
        if set(rep.request_ids) != set(a.request_ids):
            raise InvalidArgument(f"field 'request_ids' = {shown(list(rep.request_ids))} must be the assignment's "
                                  f"{list(a.request_ids)!r}")
        if rep.executor_id not in flight.executors:
            raise FailedPrecondition(f"executor {shown(rep.executor_id)} does not run the epoch {flight.epoch} "
                                     f"assignment of {list(a.request_ids)!r}")
        if rep.stage is not None and rep.stage is not a.stage:
            raise InvalidArgument(f"field 'stage' = {rep.stage.value!r} but the assignment is {a.stage.value!r}")
        left = a.steps - flight.reported_steps
        if rep.steps < 0 or rep.steps > left:
            raise InvalidArgument(f"field 'steps' = {rep.steps} but the assignment has {left} steps left")
        if rep.step_seconds and len(rep.step_seconds) != rep.steps:
            raise InvalidArgument(f"field 'step_seconds' has {len(rep.step_seconds)} entries for 'steps' = "
                                  f"{rep.steps}: give one per step, or none")
        for x in rep.step_seconds:
            if not (math.isfinite(x) and x >= 0):
                raise InvalidArgument(f"field 'step_seconds' has {x!r}: must be finite and >= 0")
        now = self.clock.now()
        flight.reported_steps += rep.steps
        fut = None
        for rid in a.request_ids:
            t = self._tracked[rid]
            if rep.step_seconds:
                t.step_s_sum += sum(rep.step_seconds)
                t.step_s_n += len(rep.step_seconds)
            if t.outcome is not None:
                continue
            changed = rep.steps > 0 or (a.stage is Stage.ENCODE and rep.done and not t.reported_encoded)
            t.reported_steps += rep.steps
            if a.stage is Stage.ENCODE and rep.done:
                t.reported_encoded = True
            if changed and not (a.stage is Stage.DECODE):
                fut = self.journal.record_progress(rid, t.reported_steps, t.reported_encoded, wait=True)
        if rep.done:
            fut = self._end_flight(flight, now) or fut
        return fut

    def _apply_loaded(self, sess: ExecutorSession, loaded: Sequence[WeightLoad],
                      failed: Sequence[WeightLoad] = ()) -> None:
        """Under the lock: weights whose load ended (``failed``: not resident after all); a GPU whose
        loads have all ended is idle."""
        for name, ws in (("loaded", loaded), ("load_failed", failed)):
            for w in ws:
                if not 0 <= w.gpu < self.cluster.size or self._owner[w.gpu] != sess.id:
                    raise FailedPrecondition(f"field {name!r}: GPU {w.gpu} is not owned by executor {shown(sess.id)}")
                if w not in self._loading.get(w.gpu, ()):
                    raise FailedPrecondition(f"field {name!r}: no load of {w.model}/{w.component} on GPU "
                                             f"{w.gpu} is in flight")
        now = self.clock.now()
        if failed:
            self._placement = self._placement.apply(unloads=failed)
            self.stats.weight_load_failures += len(failed)
            log.error("executor %r: loads failed: %s", sess.id,
                      ", ".join(f"GPU {w.gpu} {w.model}/{w.component}" for w in failed))
        for w in (*loaded, *failed):
            pending = self._loading[w.gpu]
            pending.remove(w)
            if not pending:
                del self._loading[w.gpu]
                self._free_at[w.gpu] = now
                self._dirty = True
        self._cv.notify_all()

    def _end_flight(self, flight: Flight, now: float):
        """Under the lock: the assignment ended at ``now`` (simulator ``end_segment`` semantics)."""
        a = flight.assignment
        for g in a.gpus:
            if self._busy[g] is flight:
                self._busy[g], self._free_at[g] = None, now
        live_ids, statuses = [], {}
        for rid in a.request_ids:
            t = self._tracked[rid]
            t.flight, t.snap = None, None
            if t.outcome is not None:
                continue
            st = t.status
            if a.stage is Stage.DIFFUSE and flight.reported_steps < a.steps:
                st.steps_done -= a.steps - flight.reported_steps  # stopped early: only reported steps count
            live_ids.append(rid)
            statuses[rid] = st
        fut = None
        if live_ids:
            seg = Segment(tuple(live_ids), a.stage, a.gpus, a.steps, flight.segment.start, now)
            finished, paused = end_segment(seg, statuses)
            for st in finished:
                t = self._tracked[st.id]
                t.outcome = "done"
                self._remove_live(t)
                self._backlog_gpu_s = max(0.0, self._backlog_gpu_s - t.work_gpu_s)
                if st.finish <= st.request.deadline + 1e-9:
                    self.stats.done_met += 1
                else:
                    self.stats.done_missed += 1
                fut = self.journal.record_outcome(st.id, "done", st.finish, t.reported_steps, t.reported_encoded,
                                                  st.preemptions, st.sp_changes, st.migrations, wait=True)
                for sess in self._sessions.values():
                    if st.id in sess.known:
                        sess.known.discard(st.id)
                        sess.push(PlanDelta(self._epoch, now, released=[st.id]))
            self._just_paused.extend(self._tracked[st.id] for st in paused)
        self._dirty = True
        self._cv.notify_all()
        return fut

    # --- the planning loop --------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping:
                    self._expire_executors()
                    due = self._wake is not None and self.clock.wall_delay(self._wake) <= 0
                    if self._dirty or due:
                        break
                    timeout = self.config.heartbeat_timeout_s / 4
                    if self._wake is not None:
                        timeout = min(timeout, max(0.0, self.clock.wall_delay(self._wake)))
                    self._cv.wait(timeout)
                if self._stopping:
                    return
                gap = self._next_plan_at - time.monotonic()
                if gap > 0:  # coalesce a burst of events into one plan (no simulated time passes)
                    with self.clock.hold():
                        self._cv.wait(gap)
                    if self._stopping:
                        return
                self._dirty, self._wake = False, None
                t0 = time.monotonic()
                snap = self._snapshot()
                self._next_plan_at = t0 + self.config.min_plan_gap_s
            if snap is None:
                continue
            try:
                with self.clock.hold():  # simulated time stands still while the planner solves
                    plan, solver_ms = self._run_policy(snap)
            except Exception:  # never let a policy bug stop the service
                log.exception("planning failed at t=%.3f; retrying next round", snap.now)
                with self._cv:
                    self._wake = snap.now + self.config.round_s
                continue
            with self._cv:
                if self._stopping:
                    return
                self._dispatch(snap, plan, solver_ms)
                took = time.monotonic() - t0  # bound the planner's share of the GIL and the CPU
                duty = min(max(self.config.max_plan_duty, 1e-3), 1.0)
                self._next_plan_at = max(self._next_plan_at, t0 + took / duty)

    def _expire_executors(self) -> None:
        limit = self.config.heartbeat_timeout_s
        mono = time.monotonic()
        for sess in list(self._sessions.values()):
            if sess.heartbeats and mono - sess.last_seen > limit:
                self._lose(sess, f"no heartbeat for {limit:g} s")

    def _snapshot(self) -> _Snapshot | None:
        """Under the lock: a copy of what the policy sees, or None when there is nothing to plan."""
        now = self.clock.now()
        just = [t for t in self._just_paused if t.outcome is None and t.flight is None]
        self._just_paused = []
        free_at = [self._gpu_free_at(g, now) for g in range(self.cluster.size)]
        if not self._live or all(f > now + TOL for f in free_at):
            return None  # as in the simulator: no plan, and no preemption charged
        window = self.config.plan_window or len(self._queued)
        seen = list(self._started.values()) + [self._tracked[q[2]] for q in self._queued[:window]]
        if len(seen) < len(self._live):
            seen.sort(key=lambda t: t.seq)  # live requests in arrival order, as PlannerState wants
        else:
            seen = list(self._live.values())
        statuses = []
        models = set()
        for t in seen:
            if t.snap is None:  # copy what changed since the last plan; the rest is reused
                t.snap = copy.copy(t.status)
            statuses.append(t.snap)
            models.add(t.status.request.model)
        placement = self._placement if self._placement is not None else tuple(sorted(models))
        state = PlannerState(now, self.cluster, self.cost, statuses, free_at, placement, self.config.round_s,
                             frozenset(t.id for t in just))
        return _Snapshot(now, state, just)

    def _any_idle_gpu(self) -> bool:
        return any(o is not None and f is None and g not in self._loading
                   for g, (o, f) in enumerate(zip(self._owner, self._busy)))

    def _gpu_free_at(self, g: int, now: float) -> float:
        if self._owner[g] is None:
            return now + LOST_GPU_S
        if g in self._loading:
            return max(self._load_end[g], now + OVERRUN_S)
        f = self._busy[g]
        if f is not None:
            return max(f.segment.end, now + OVERRUN_S)
        return min(self._free_at[g], now)

    def _run_policy(self, snap: _Snapshot) -> tuple[RoundPlan, float]:
        if self._proc is not None:
            try:
                r = self._proc.plan(snap.state)
            except (OSError, EOFError, ValueError) as exc:
                log.error("the planner process died (%r); planning in the server process from now on", exc)
                self._proc = None
            else:
                self.stats.plan_violations += r.violations
                return r.plan, r.solver_ms
        r = plan_checked(self._policy, self._fallback, snap.state, self.config.check_plans)
        self.stats.plan_violations += r.violations
        return r.plan, r.solver_ms

    def _dispatch(self, snap: _Snapshot, plan: RoundPlan, solver_ms: float) -> None:
        """Under the lock: start the plan's still-valid assignments and send each executor its delta."""
        self.stats.plans += 1
        self.stats.fallbacks += int(plan.fallback)
        self.stats.observe_solver(solver_ms)
        now = self.clock.now()
        epoch = self._epoch + 1
        deltas: dict[str, PlanDelta] = defaultdict(lambda: PlanDelta(epoch, now))
        started: list[Assignment] = []
        for rid, reason in plan.rejections:
            self._reject(rid, reason)
        self._apply_weight_changes(plan, now, deltas)
        for a in plan.assignments:
            if not self._startable(a, now):
                log.debug("dropping stale assignment %s", a)
                continue
            members = [self._live[rid] for rid in a.request_ids]
            statuses = {t.id: t.status for t in members}
            move = step = 0.0
            if a.stage is Stage.DIFFUSE:
                move, step = diffuse_costs(self.cluster, self.cost, a, [t.status for t in members])
            moves = [(t.id, t.status.latent_gpus) for t in members
                     if a.stage is Stage.DIFFUSE and t.status.steps_done > 0 and t.status.latent_gpus
                     and set(t.status.latent_gpus) != set(a.gpus)]
            start_step = members[0].status.steps_done
            seg = start_segment(self.cluster, self.cost, a, now, statuses, self._free_at)
            owners = self._owners_of(a.gpus)
            lead = self._owner[a.gpus[0]]
            flight = Flight(epoch, a, seg, frozenset(owners), lead)
            for t in members:
                t.flight, t.snap = flight, None
                self._mark_started(t)
            for g in a.gpus:
                self._busy[g] = flight
            started.append(a)
            for eid in sorted(owners):
                d, sess = deltas[eid], self._sessions[eid]
                for t in members:
                    if t.id not in sess.known:
                        sess.known.add(t.id)
                        r = t.status.request
                        d.requests.append(RequestData(r.id, r.model, r.shape.height, r.shape.width, r.shape.frames,
                                                      r.steps, r.deadline, t.reported_steps, t.reported_encoded))
                d.assignments.append(AssignmentMsg(a.request_ids, a.stage, a.gpus, a.steps, start_step,
                                                   seg.end - seg.start, step, move, eid == lead))
            for rid, src in moves:
                msg = MigrationMsg(rid, tuple(src), a.gpus)
                for eid in sorted(self._owners_of(src) | owners):
                    deltas[eid].migrations.append(msg)
        just = [t for t in snap.just_paused if t.outcome is None]
        continued = {rid for a in started if a.stage is Stage.DIFFUSE for rid in a.request_ids}
        for t in just:
            if t.id not in continued and t.status.latent_gpus:
                for eid in self._owners_of(t.status.latent_gpus):
                    deltas[eid].pauses.append(PauseMsg(t.id, tuple(t.status.latent_gpus)))
        self.stats.preemptions += count_preemptions([t.status for t in just], started)
        for t in just:
            t.snap = None
        if any(not d.empty() for d in deltas.values()):
            self._epoch = epoch
            for eid, d in deltas.items():
                d.plan_epoch = epoch
                self._sessions[eid].push(d)
        waiting = (t.status for t in itertools.chain(self._started.values(), (self._tracked[q[2]] for q in self._queued[:1])))
        self._wake = next_wake(plan, now, waiting, self.config.round_s)

    def _apply_weight_changes(self, plan: RoundPlan, now: float, deltas: dict[str, PlanDelta]) -> None:
        """Under the lock: the plan's unloads (at once) and loads (their GPU busy until reported), on
        GPUs still owned and idle; each goes to the GPU's executor."""
        if not (plan.unloads or plan.loads):
            return
        if self._placement is None:
            log.warning("plan changes placement but the service has none (no --models): ignored")
            return
        idle = {g for g in {w.gpu for w in (*plan.unloads, *plan.loads)}
                if self._owner[g] is not None and self._busy[g] is None and g not in self._loading}
        unloads = [w for w in plan.unloads if w.gpu in idle and self._placement.holds(w.gpu, w.model, w.component)]
        loads = [w for w in plan.loads if w.gpu in idle and not self._placement.holds(w.gpu, w.model, w.component)]
        self._placement = self._placement.apply(unloads, loads)
        for w in unloads:
            deltas[self._owner[w.gpu]].unloads.append(w)
        for w in loads:
            secs = load_seconds(self.cluster, w.model, w.component)
            pending = self._loading.setdefault(w.gpu, [])
            self._load_end[w.gpu] = (self._load_end[w.gpu] if len(pending) else now) + secs
            pending.append(w)
            deltas[self._owner[w.gpu]].loads.append(LoadMsg(w, secs))
            self.stats.weight_loads += 1
            self.stats.weight_load_s += secs

    def _startable(self, a: Assignment, now: float) -> bool:
        for rid in a.request_ids:
            t = self._live.get(rid)
            if t is None or t.flight is not None or t.status.in_flight or t.status.next_stage is not a.stage:
                return False
            if a.stage is Stage.DIFFUSE and not 1 <= a.steps <= t.status.remaining_steps:
                return False
            if self._placement is not None and not self._placement.runs(a.gpus, t.status.request.model,
                                                                        a.stage.value):
                return False
        for g in a.gpus:
            if (self._owner[g] is None or self._busy[g] is not None or g in self._loading
                    or self._free_at[g] > now + TOL):
                return False
        return True


def _refusal(rid: object, exc: ServiceError) -> SubmitOutcome:
    return SubmitOutcome(str(rid) if isinstance(rid, str) else "", False, error_code=exc.code.value[0],
                         error=exc.message)


def _wait(fut) -> None:
    try:
        fut.result(timeout=JOURNAL_TIMEOUT_S)
    except JournalError as exc:
        raise Unavailable(str(exc)) from None
    except Exception as exc:
        raise Unavailable(f"journal did not confirm the write: {exc!r}") from None


def _shape(h: int, w: int, f: int):
    from ditplan.models.catalog import Shape
    return Shape(h, w, f)
