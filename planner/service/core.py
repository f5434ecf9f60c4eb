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

Parts (each not thread-safe, called under the core's lock): the request
book (``book.py``: every request, the live index and its queue), the fleet
(``fleet.py``: GPUs, executor sessions, placement), dispatch
(``dispatch.py``: plan -> flights and per-executor deltas), the
estimator (``eta.py``: ideal latency, backlog, predicted finish) and the
step-time refiner (``models/refine.py``).

Cost refinement: each accepted diffuse report's step times (their median)
update the refiner's estimate for the assignment's (model, shape, SP degree
= len(gpus), batch = len(request_ids)), as a factor on the prior the
configured cost model gives for that block. When the factors in use change,
``self.cost`` becomes a new corrected view (``CostModel.with_corrections``)
of ``config.cost``: snapshots, dispatch, the estimator and the planner
child process all see it. Refinement is not journaled: a restart starts
again from the profile.

Threads: gRPC handlers call the public methods; one loop thread plans. All
state is under one lock; the policy runs outside it on a snapshot, and its
assignments are re-validated against the live state before dispatch. In
tests, ``plan_once`` plans one round in the calling thread, with the clock
the core was given (``clock.ManualClock``): submit -> plan -> report, with no
gRPC, no threads and no sleeps.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ditplan.models.cost import CostModel
from ditplan.models.csp import is_csp
from ditplan.models.refine import RefineConfig, StepKey, StepRefiner
from ditplan.planner.cluster import Cluster
from ditplan.planner.execution import Segment, count_preemptions, end_segment, next_wake
from ditplan.planner.placement import Placement, WeightLoad, static_placement, validate_placement
from ditplan.planner.plan import Assignment, RoundPlan
from ditplan.planner.policies.base import make_policy
from ditplan.planner.request import Request, RequestState, RequestStatus, Stage
from ditplan.planner.service.admission import RequestSpec, unservable, validate_batch, validate_spec
from ditplan.planner.service.book import Flight, RequestBook, Tracked
from ditplan.planner.service.dispatch import dispatch
from ditplan.planner.service.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied,
                                            ResourceExhausted, ServiceError, Unavailable, shown)
from ditplan.planner.service.eta import Estimator
from ditplan.planner.service.fleet import TOL, Fleet
from ditplan.planner.service.journal import Journal, JournalError, Recovered, request_row
from ditplan.planner.service.messages import (STATES, ExecutorView, PlanDelta, RequestView, ServerInfoView,
                                              StepReport, SubmitOutcome, TimelineView)
from ditplan.planner.service.planning import PlannerProcess, plan_checked
from ditplan.planner.service.recorder import SegmentRecorder
from ditplan.planner.service.sessions import ExecutorSession
from ditplan.planner.service.stats import Stats
from ditplan.planner.state import PlannerState

log = logging.getLogger(__name__)

MAX_BATCH = 10_000
MAX_PAGE = 10_000
DEFAULT_PAGE = 1_000
MAX_TIMELINE_PAGE = 100_000
DEFAULT_TIMELINE_PAGE = 10_000
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
    # Step-time refinement from reports (models/refine.py); None: plan with ``cost`` as given.
    refine: RefineConfig | None = field(default_factory=RefineConfig)


def initial_placement(config: CoreConfig) -> Placement | None:
    """The placement a deployment of ``config.models`` starts from (None: replicate what arrives)."""
    if not config.models:
        return None
    shares = {m: 1.0 for m in config.models}
    placement = static_placement(config.cluster, (), config.cost, config.placement, models=config.models,
                                 shares=shares)
    validate_placement(placement, config.cluster)
    return placement


@dataclass
class _Snapshot:
    now: float
    state: PlannerState
    just_paused: list[Tracked]


class PlannerCore:
    def __init__(self, config: CoreConfig, journal: Journal, recovered: Recovered, clock) -> None:
        self.config = config
        self.cluster, self.cost = config.cluster, config.cost  # self.cost: config.cost, refined
        self._refiner = StepRefiner(config.refine) if config.refine is not None else None
        self.clock = clock
        self.journal = journal
        self.stats = Stats()
        self._policy = make_policy(config.policy, **config.policy_options)
        self._places_models = bool(getattr(self._policy, "places_models", False))
        self._fallback = make_policy(config.fallback_policy) if config.fallback_policy != config.policy else None
        self._book = RequestBook()
        self._fleet = Fleet(self.cluster, initial_placement(config))
        self._eta = Estimator(self.cluster, self.cost)
        self._recorder = SegmentRecorder()  # the measured timeline (GetTimeline)
        self._models_seen: set[str] = set()  # without a placement: the models on every GPU
        self._cv = threading.Condition(threading.Lock())
        self._epoch = recovered.generation << 32
        self._just_paused: list[Tracked] = []
        self._dirty = False
        self._wake: float | None = None
        self._stopping = False
        self._next_plan_at = 0.0
        self._proc: PlannerProcess | None = None
        self._thread = threading.Thread(target=self._loop, name="ditplan-planner", daemon=True)
        self._recover(recovered)

    # --- lifecycle ----------------------------------------------------------
    def start(self, loop: bool = True) -> None:
        """Start planning: with ``planner_process`` the policy's child, then the loop thread (``loop=False``:
        no thread, the caller plans with ``plan_once``)."""
        for policy in (self._policy, self._fallback):
            if policy is not None:
                policy.reset()  # a service start is a new run (plan_once calls before it were not)
        if self.config.planner_process:
            self._proc = PlannerProcess(self.config.cluster_spec, self.config.policy,
                                        self._fallback.name if self._fallback else None, self.config.check_plans,
                                        options=self.config.policy_options, gpu=self.config.cost.gpu.name,
                                        profiles=self.config.cost.profiles)
        if loop:
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            for sess in list(self._fleet.sessions.values()):
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
        book = self._book
        for row in rec.rows:
            st = RequestStatus(row.to_request(), encoded=row.encoded, steps_done=row.steps_done,
                               preemptions=row.preemptions, sp_changes=row.sp_changes, migrations=row.migrations)
            t = book.add(st, reported_steps=row.steps_done, reported_encoded=row.encoded, outcome=row.outcome)
            if row.outcome is None:
                st.rest()
                t.work_gpu_s = self._eta.work_gpu_s(st)
                book.add_live(t)
                self._models_seen.add(row.model)
            else:
                st.state = RequestState.DONE if row.outcome == "done" else RequestState.FAILED
                st.finish = row.finish
                st.rejected = row.reason
                if row.outcome == "done":
                    self._count_done(st)
        self._dirty = bool(book.live)
        if rec.rows:
            log.info("recovered %d requests (%d unfinished) from %s", len(rec.rows), len(book.live),
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
        ideal = self._eta.ideal_latency
        if not allow_partial:
            try:
                reqs = validate_batch(specs, now, ideal, self.config.slo_scale)
            except ServiceError as exc:
                self._count_refused(exc, len(specs))
                raise
            with self._cv:
                try:
                    self._check_admissible(reqs)
                except ServiceError as exc:
                    self._count_refused(exc, len(specs))
                    raise
                tracked, fut = self._reserve(reqs)
            self._commit_admission(tracked, fut)
            with self._cv:
                return [self._outcome(t, now) for t in tracked]
        # Partial: each spec on its own.
        results: list[SubmitOutcome | Request] = []
        for i, spec in enumerate(specs):
            try:
                results.append(validate_spec(spec, i, now, ideal, self.config.slo_scale))
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
                if r.id in self._book.tracked or r.id in seen:
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

    def _check_admissible(self, reqs: Sequence[Request]) -> None:
        """Under the lock: raise for the first request this call cannot admit (all or nothing)."""
        models = set(self._models_seen)
        for i, r in enumerate(reqs):
            if r.id in self._book.tracked:
                raise AlreadyExists(f"requests[{i}]: field 'id' = {r.id!r} already exists")
            if (why := self._unservable(r, models)) is not None:
                raise InvalidArgument(f"requests[{i}]: {why}")
            models.add(r.model)
        free = self._capacity()
        if len(reqs) > free:
            raise ResourceExhausted(self._full_message(len(reqs), free))

    def _unservable(self, r: Request, models: set[str]) -> str | None:
        return unservable(r, self.cluster, self._fleet.placement, self.config.models, self.config.policy,
                          self._places_models, models)

    def _capacity(self) -> int:
        return self.config.max_queue - self._book.unfinished()

    def _full_message(self, asked: int, free: int) -> str:
        return (f"admission queue full: {self._book.unfinished()} unfinished requests, "
                f"limit {self.config.max_queue}; {asked} more refused ({max(0, free)} free)")

    def _count_refused(self, exc: ServiceError, n: int) -> None:
        self.stats.refused[exc.code.name] += n

    def _reserve(self, reqs: Sequence[Request]) -> tuple[list[Tracked], Future | None]:
        """Under the lock: add invisible entries (admission order = journal order) and queue the journal write."""
        out = self._book.reserve(reqs, self._eta.work_gpu_s)
        self._models_seen.update(r.model for r in reqs)
        if not out:
            return out, None
        fut = self.journal.append_requests(request_row(r) for r in reqs)
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
            if err is not None:
                self._book.drop(tracked)
                self.stats.refused["UNAVAILABLE"] += len(tracked)
            else:
                self._book.confirm(tracked)
                self.stats.submitted += len(tracked)
                if self._fleet.any_idle():  # as in the simulator: no idle GPU, nothing to plan on an arrival
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
            t = self._book.visible(rid)
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
        """Under the lock: end a live request unfinished (cancelled or rejected), released on the
        executors that hold it."""
        st = t.status
        st.state = RequestState.FAILED
        self._book.end(t, outcome)
        holders = t.flight.executors if t.flight is not None else self._fleet.owners_of(st.latent_gpus)
        self._release(t.id, holders)

    def _release(self, rid: str, executors: Iterable[str]) -> None:
        """Under the lock: tell the executors that know ``rid`` to drop it."""
        for eid in executors:
            sess = self._fleet.sessions.get(eid)
            if sess is not None and rid in sess.known:
                sess.known.discard(rid)
                sess.push(PlanDelta(self._epoch, self.clock.now(), released=[rid]))

    def _reject(self, rid: str, reason: str) -> None:
        """Under the lock: end a live, idle request the planner gave up on (``--late reject``)."""
        t = self._book.live.get(rid)
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
            return self._view(self._book.visible(rid), self.clock.now())

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
        next_token = ""
        with self._cv:
            now = self.clock.now()
            for t in self._book.page(start):
                if len(out) == size:
                    next_token = str(t.seq)
                    break
                v = self._view(t, now)
                if not wanted or v.state in wanted:
                    out.append(v)
        return out, next_token

    def info(self) -> ServerInfoView:
        with self._cv:
            now = self.clock.now()
            counts: Counter = Counter()
            for t in self._book.tracked.values():
                if not t.pending:
                    counts[self._state(t)] += 1
            execs = tuple(ExecutorView(s.id, s.gpus, s.last_seen_service) for s in self._fleet.sessions.values())
            placement = self._fleet.placement
            return ServerInfoView(now, self.clock.speed, self.clock.simulated, self.cluster.name, self.cluster.size,
                                  self.config.policy, self._epoch, execs, {s: counts.get(s, 0) for s in STATES},
                                  self.config.version, self.config.slo_scale, self.config.max_queue,
                                  placement.names() if placement is not None else (), self.stats.weight_loads,
                                  tuple(self._refiner.estimates()) if self._refiner is not None else ())

    def timeline(self, start: int = 0, page_size: int = 0) -> TimelineView:
        """A page of the measured timeline (``recorder.py``): segments from index ``start`` on."""
        if page_size < 0 or page_size > MAX_TIMELINE_PAGE:
            raise InvalidArgument(f"field 'page_size' = {page_size} must be 0..{MAX_TIMELINE_PAGE}")
        if start < 0:
            raise InvalidArgument(f"field 'start' = {start} must be >= 0")
        with self._cv:
            rec = self._recorder
            segments, nxt = rec.page(start, page_size or DEFAULT_TIMELINE_PAGE)
            return TimelineView(tuple(segments), nxt, rec.total, rec.dropped, self.stats.plans, self.stats.fallbacks,
                                rec.solver_percentiles(), self.clock.now())

    def slo_attainment(self) -> float | None:
        """Met / decided so far: done requests, and live ones already past their deadline (certain misses)."""
        with self._cv:
            now = self.clock.now()
            late_live = sum(1 for t in self._book.live.values() if t.status.request.deadline < now)
            decided = self.stats.done_met + self.stats.done_missed + late_live
            return self.stats.done_met / decided if decided else None

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
            reason=st.rejected if t.outcome == "rejected" else None,
            measured_encode_s=t.stage_s.get(Stage.ENCODE), measured_decode_s=t.stage_s.get(Stage.DECODE))

    def _predict(self, t: Tracked, now: float) -> float | None:
        return self._eta.predict(t, now, self._book.backlog_gpu_s, self._fleet.owned())

    def _count_done(self, st: RequestStatus) -> None:
        if st.met:
            self.stats.done_met += 1
        else:
            self.stats.done_missed += 1

    # --- executors ----------------------------------------------------------
    def connect_executor(self, executor_id: str, gpus: Sequence[int], heartbeats: bool = True,
                         secret: str = "") -> ExecutorSession:
        """Register an executor owning ``gpus``; its first update (the current epoch and the session's
        secret) is queued at once. A live session of the same id is replaced only given its ``secret``."""
        if not isinstance(executor_id, str) or not executor_id.strip():
            raise InvalidArgument(f"field 'executor_id' = {shown(executor_id)} must be a non-empty string")
        gpus = self._fleet.check_gpus(gpus)
        with self._cv:
            if self._stopping:
                raise Unavailable("server shutting down")
            old = self._fleet.sessions.get(executor_id)
            if old is not None:
                if not old.owns(secret):
                    raise PermissionDenied(f"executor {shown(executor_id)} is connected: a new stream with its id needs "
                                           "that session's secret (field 'session_secret')")
                self._lose(old, "replaced by a new connection of the same executor id")
            now = self.clock.now()
            sess = ExecutorSession(executor_id, gpus, heartbeats, now)
            loads = self._fleet.attach(sess, now)
            sess.push(PlanDelta(self._epoch, now, session_secret=sess.secret, loads=loads))
            self._dirty = True
            self._cv.notify_all()
        log.info("executor %r connected with GPUs %s", executor_id, list(gpus))
        return sess

    def disconnect_executor(self, sess: ExecutorSession, reason: str = "plan stream closed") -> None:
        """The executor's stream ended: its GPUs are lost and its work requeued."""
        with self._cv:
            if not sess.closed and self._fleet.sessions.get(sess.id) is sess and not self._stopping:
                self._lose(sess, reason)

    def _lose(self, sess: ExecutorSession, reason: str) -> None:
        """Under the lock: mark the executor's GPUs lost, requeue its work from the last reported step."""
        sess.closed, sess.close_reason = True, reason
        sess.push(None)
        now = self.clock.now()
        lost = set(sess.gpus)
        requeued = 0
        for f in self._fleet.detach(sess):
            self._recorder.flight_ended(f, now, done=False)
            for t in self._unwind(f, now):
                st = t.status
                st.steps_done, st.encoded = t.reported_steps, t.reported_encoded
                st.rest()
                st.latent_gpus = ()
                if st.state is RequestState.QUEUED:
                    self._book.mark_fresh(t)
                requeued += 1
            for eid in f.executors - {sess.id}:  # the rest of the group drops the work
                other = self._fleet.sessions.get(eid)
                if other is not None:
                    ids = [rid for rid in f.assignment.request_ids if rid in other.known]
                    other.known.difference_update(ids)
                    if ids:
                        other.push(PlanDelta(self._epoch, now, released=ids))
        for t in self._book.started():
            st = t.status
            if t.flight is None and st.latent_gpus and lost.intersection(st.latent_gpus):
                st.latent_gpus = ()  # its latent was on a lost GPU: resume from the last reported step
                t.snap = None
        self.stats.executors_lost += 1
        self.stats.requeued += requeued
        self._dirty = True
        self._cv.notify_all()
        log.warning("executor %r lost (%s): GPUs %s, %d requests requeued", sess.id, reason, sorted(lost), requeued)

    def _unwind(self, flight: Flight, now: float) -> list[Tracked]:
        """Under the lock: the flight is over at ``now``: its GPUs idle, its requests out of it. The
        members still live."""
        self._fleet.release(flight, now)
        live = []
        for rid in flight.assignment.request_ids:
            t = self._book.tracked[rid]
            t.flight, t.snap = None, None
            if t.outcome is None:
                live.append(t)
        return live

    # --- progress reports ---------------------------------------------------
    def report(self, rep: StepReport, wait: bool = False) -> None:
        """Apply an executor's report; journal its progress (waiting for the commit if ``wait``)."""
        with self._cv:
            sess = self._fleet.sessions.get(rep.executor_id)
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
        flight = self._reported_flight(rep)
        a = flight.assignment
        now = self.clock.now()
        flight.reported_steps += rep.steps
        fut = None
        if a.stage is Stage.DIFFUSE and rep.step_seconds:
            self._refine(a, rep.step_seconds)
        for rid in a.request_ids:
            t = self._book.tracked[rid]
            if rep.step_seconds:
                t.step_s_sum += sum(rep.step_seconds)
                t.step_s_n += len(rep.step_seconds)
            if rep.stage_seconds:
                t.stage_s[a.stage] = t.stage_s.get(a.stage, 0.0) + rep.stage_seconds
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

    def _refine(self, a: Assignment, step_seconds: Sequence[float]) -> None:
        """Under the lock: one diffuse report's step times refine its key's estimate."""
        if self._refiner is None:
            return
        lead = self._book.tracked[a.request_ids[0]].status.request
        sp, batch = len(a.gpus), len(a.request_ids)
        shapes = [self._book.tracked[rid].status.request.shape for rid in a.request_ids]
        if is_csp(lead.spec, shapes):  # a CSP batch refits the CSP predictor (``models/csp.py``)
            self.config.cost.csp.observe(lead.model, shapes, sp, statistics.median(step_seconds))
            return
        bw = self.cluster.block_bandwidth(a.gpus) if sp > 1 else None
        prior = self.config.cost.prior_step_time(lead.spec, lead.shape, sp, batch, link_bw=bw)
        if self._refiner.observe(StepKey(lead.model, lead.shape, sp, batch), statistics.median(step_seconds), prior):
            self.cost = self.config.cost.with_corrections(self._refiner.corrections())
            self._eta.rebind(self.cost)

    def _reported_flight(self, rep: StepReport) -> Flight:
        """Under the lock: the flight a report is about, or the error that refuses it."""
        if rep.plan_epoch > self._epoch:
            raise FailedPrecondition(f"plan epoch {rep.plan_epoch} is ahead of the server's ({self._epoch})")
        flight: Flight | None = None
        for rid in rep.request_ids:
            t = self._book.visible(rid)
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
        if rep.stage_seconds and a.stage is Stage.DIFFUSE:
            raise InvalidArgument(f"field 'stage_seconds' = {rep.stage_seconds!r} on a diffuse report: diffuse "
                                  "steps report 'step_seconds'")
        if not (math.isfinite(rep.stage_seconds) and rep.stage_seconds >= 0):
            raise InvalidArgument(f"field 'stage_seconds' = {rep.stage_seconds!r}: must be finite and >= 0")
        return flight

    def _apply_loaded(self, sess: ExecutorSession, loaded: Sequence[WeightLoad],
                      failed: Sequence[WeightLoad] = ()) -> None:
        """Under the lock: weights whose load ended (``failed``: not resident after all)."""
        if self._fleet.end_loads(sess, loaded, failed, self.clock.now()):
            self._dirty = True
        if failed:
            self.stats.weight_load_failures += len(failed)
            log.error("executor %r: loads failed: %s", sess.id,
                      ", ".join(f"GPU {w.gpu} {w.model}/{w.component}" for w in failed))
        self._cv.notify_all()

    def _end_flight(self, flight: Flight, now: float):
        """Under the lock: the assignment ended at ``now`` (simulator ``end_segment`` semantics)."""
        a = flight.assignment
        self._recorder.flight_ended(flight, now)
        members = self._unwind(flight, now)
        if a.stage is Stage.DIFFUSE and flight.reported_steps < a.steps:
            for t in members:  # stopped early: only reported steps count
                t.status.steps_done -= a.steps - flight.reported_steps
        fut = None
        if members:
            seg = Segment(tuple(t.id for t in members), a.stage, a.gpus, a.steps, flight.segment.start, now)
            finished, paused = end_segment(seg, {t.id: t.status for t in members})
            for st in finished:
                t = self._book.tracked[st.id]
                self._book.end(t, "done")
                self._count_done(st)
                fut = self.journal.record_outcome(st.id, "done", st.finish, t.reported_steps, t.reported_encoded,
                                                  st.preemptions, st.sp_changes, st.migrations, wait=True)
                self._release(st.id, list(self._fleet.sessions))
            self._just_paused.extend(self._book.tracked[st.id] for st in paused)
        self._dirty = True
        self._cv.notify_all()
        return fut

    # --- planning -----------------------------------------------------------
    def plan_once(self, now: float | None = None) -> RoundPlan | None:
        """Plan one round at ``now`` (default: the clock's) in the calling thread and dispatch it; the
        plan, or None when there was nothing to plan (no live request, or no GPU free)."""
        with self._cv:
            self._dirty, self._wake = False, None
            snap = self._snapshot(self.clock.now() if now is None else now)
        if snap is None:
            return None
        plan, solver_ms = self._run_policy(snap)
        with self._cv:
            self._dispatch(snap, plan, solver_ms, snap.now if now is not None else self.clock.now())
        return plan

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
                snap = self._snapshot(self.clock.now())
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
                self._dispatch(snap, plan, solver_ms, self.clock.now())
                took = time.monotonic() - t0  # bound the planner's share of the GIL and the CPU
                duty = min(max(self.config.max_plan_duty, 1e-3), 1.0)
                self._next_plan_at = max(self._next_plan_at, t0 + took / duty)

    def _expire_executors(self) -> None:
        limit = self.config.heartbeat_timeout_s
        for sess in self._fleet.expired(limit):
            self._lose(sess, f"no heartbeat for {limit:g} s")

    def _snapshot(self, now: float) -> _Snapshot | None:
        """Under the lock: a copy of what the policy sees, or None when there is nothing to plan."""
        just = [t for t in self._just_paused if t.outcome is None and t.flight is None]
        self._just_paused = []
        free_at = self._fleet.policy_free_at(now)
        if not self._book.live or all(f > now + TOL for f in free_at):
            return None  # as in the simulator: no plan, and no preemption charged
        statuses = []
        models = set()
        for t in self._book.window(self.config.plan_window):
            if t.snap is None:  # copy what changed since the last plan; the rest is reused
                t.snap = copy.copy(t.status)
            statuses.append(t.snap)
            models.add(t.status.request.model)
        placement = self._fleet.placement if self._fleet.placement is not None else tuple(sorted(models))
        state = PlannerState(now, self.cluster, self.cost, statuses, free_at, placement, self.config.round_s,
                             frozenset(t.id for t in just))
        return _Snapshot(now, state, just)

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

    def _dispatch(self, snap: _Snapshot, plan: RoundPlan, solver_ms: float, now: float) -> None:
        """Under the lock: start the plan's still-valid assignments and send each executor its delta."""
        self.stats.plans += 1
        self.stats.fallbacks += int(plan.fallback)
        self.stats.observe_solver(solver_ms)
        self._recorder.solved(solver_ms)
        for rid, reason in plan.rejections:
            self._reject(rid, reason)
        just = [t for t in snap.just_paused if t.outcome is None]
        out = dispatch(plan, just, now, self._epoch + 1, self._book, self._fleet, self.cluster, self.cost,
                       self.stats)
        self.stats.preemptions += count_preemptions([t.status for t in just], out.started)
        for t in just:
            t.snap = None
        if any(not d.empty() for d in out.deltas.values()):
            self._epoch += 1
            for eid, d in out.deltas.items():
                d.plan_epoch = self._epoch
                self._fleet.sessions[eid].push(d)
        self._wake = next_wake(plan, now, self._book.waiting(), self.config.round_s)


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
