"""Dataclasses at the service's boundaries: what the core takes and returns.

The gRPC layer (``servicer.py``) converts protobuf messages to and from
these (``convert.py``); the in-process simulated executor uses them directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ditplan.models.refine import StepEstimate
from ditplan.planner.placement import WeightLoad
from ditplan.planner.request import Request, RequestFields, Stage

# Request states as the service reports them: RequestState values plus "cancelled".
STATES = ("queued", "running", "paused", "decoding", "done", "failed", "cancelled", "rejected")
TERMINAL = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class RequestView(RequestFields):
    """A request's status as GetRequest / ListRequests report it."""

    state: str  # one of STATES
    steps_done: int  # last reported by an executor
    encoded: bool
    arrival: float
    deadline: float
    predicted_finish: float | None = None
    finish: float | None = None
    sp: int = 0
    gpus: tuple[int, ...] = ()
    preemptions: int = 0
    sp_changes: int = 0
    migrations: int = 0
    measured_step_s: float | None = None
    plan_epoch: int = 0
    reason: str | None = None  # why it was rejected
    measured_encode_s: float | None = None  # reported seconds of its encode stage
    measured_decode_s: float | None = None

    def to_dict(self) -> dict:
        from dataclasses import asdict
        d = asdict(self)
        d["gpus"] = list(self.gpus)
        return d


@dataclass(frozen=True)
class SubmitOutcome:
    id: str
    accepted: bool
    arrival: float = 0.0
    deadline: float = 0.0
    predicted_finish: float = 0.0
    error_code: int = 0  # grpc.StatusCode value[0] when refused
    error: str = ""


@dataclass(frozen=True)
class RequestData(RequestFields):
    """A request's data as an executor needs it (sent once per executor)."""

    deadline: float
    steps_done: int
    encoded: bool

    @classmethod
    def from_request(cls, r: Request, steps_done: int, encoded: bool) -> "RequestData":
        return cls(r.id, r.model, r.shape.height, r.shape.width, r.shape.frames, r.steps, r.deadline, steps_done,
                   encoded)


@dataclass(frozen=True)
class AssignmentMsg:
    request_ids: tuple[str, ...]
    stage: Stage
    gpus: tuple[int, ...]
    steps: int
    start_step: int
    predicted_s: float
    predicted_step_s: float
    predicted_move_s: float
    lead: bool


@dataclass(frozen=True)
class PauseMsg:
    request_id: str
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class MigrationMsg:
    request_id: str
    from_gpus: tuple[int, ...]
    to_gpus: tuple[int, ...]


@dataclass(frozen=True)
class LoadMsg:
    """Load ``weight``; ``initial``: held since the executor connected (no report expected)."""

    weight: WeightLoad
    predicted_s: float
    initial: bool = False


@dataclass
class PlanDelta:
    """One plan update for one executor."""

    plan_epoch: int
    server_time: float
    requests: list[RequestData] = field(default_factory=list)
    assignments: list[AssignmentMsg] = field(default_factory=list)
    pauses: list[PauseMsg] = field(default_factory=list)
    migrations: list[MigrationMsg] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    unloads: list[WeightLoad] = field(default_factory=list)  # applied first, then loads, then the rest
    loads: list[LoadMsg] = field(default_factory=list)
    session_secret: str = ""  # the first update of a session only

    def empty(self) -> bool:
        return not (self.requests or self.assignments or self.pauses or self.migrations or self.released
                    or self.unloads or self.loads)


@dataclass(frozen=True)
class StepReport:
    """An executor's report on one assignment, or on finished weight loads (``loaded``); neither: a heartbeat."""

    executor_id: str
    plan_epoch: int = 0
    request_ids: tuple[str, ...] = ()
    stage: Stage | None = None
    steps: int = 0
    step_seconds: tuple[float, ...] = ()
    done: bool = False
    loaded: tuple[WeightLoad, ...] = ()
    load_failed: tuple[WeightLoad, ...] = ()
    session_secret: str = ""
    stage_seconds: float = 0.0  # measured seconds of an encode or decode assignment (its done report)


@dataclass(frozen=True)
class ExecutorView:
    executor_id: str
    gpus: tuple[int, ...]
    last_seen: float  # service clock


@dataclass(frozen=True)
class ServerInfoView:
    now: float
    speed: float
    simulate: bool
    cluster: str
    gpus: int
    policy: str
    plan_epoch: int
    executors: tuple[ExecutorView, ...]
    requests_by_state: dict[str, int]
    version: str
    slo_scale: float
    max_queue: int
    placement: tuple[tuple[str, ...], ...] = ()  # per GPU, "model/component"; (): live models replicated
    weight_loads: int = 0
    step_estimates: tuple[StepEstimate, ...] = ()  # refined step times, per key reported (models/refine.py)


@dataclass(frozen=True)
class TimelineView:
    """A page of the measured timeline (``GetTimeline``), with the planner's counters."""

    segments: tuple  # planner.execution.Segment, service clock
    next: int  # index after the last segment returned (== total at the end)
    total: int  # segments recorded since the service started
    dropped: int  # the oldest ones no longer kept
    plans: int
    fallbacks: int
    solver_ms: dict  # p50, p99, max (None without a plan)
    server_time: float
