"""What a simulation returns: the requests with their outcomes, the executed segments, the weight events."""
from __future__ import annotations

from dataclasses import dataclass, field

from ditplan.planner.execution import Segment
from ditplan.planner.placement import Placement
from ditplan.planner.request import RequestStatus


@dataclass(frozen=True)
class WeightEvent:
    """A weight load (GPU busy ``start``..``end``) or unload (``start == end``) of one component."""

    kind: str  # "load" | "unload"
    gpu: int
    model: str
    component: str
    start: float
    end: float


@dataclass
class SimResult:
    policy: str
    requests: list[RequestStatus]  # every request, trace order
    segments: list[Segment]
    solver_ms: list[float]  # wall time of each plan() call
    fallbacks: int
    plans: int
    end_time: float
    round_problems: list = field(default_factory=list)  # RoundProblem per plan, if recorded
    initial_placement: Placement | None = None  # resident before the trace starts
    weight_events: list[WeightEvent] = field(default_factory=list)  # loads and unloads the plans made
    placement: Placement | None = None  # at the end

    @property
    def weight_loads(self) -> list[WeightEvent]:
        return [e for e in self.weight_events if e.kind == "load"]
