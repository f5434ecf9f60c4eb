"""RoundPlan: what a policy decides for one planning instant."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ditplan.planner.placement import WeightLoad
from ditplan.planner.request import Stage


@dataclass(frozen=True)
class Assignment:
    """Run ``stage`` for ``request_ids`` (one, or a batch) on ``gpus``.

    ``gpus`` is an aligned block inside one node; its size is the SP degree.
    ``steps`` is the number of denoising steps this round (0 for encode and
    decode). A request whose latent lives elsewhere migrates first.
    """

    request_ids: tuple[str, ...]
    stage: Stage
    gpus: tuple[int, ...]
    steps: int = 0

    @property
    def sp(self) -> int:
        return len(self.gpus)


@dataclass
class PlanStats:
    """What a policy reports about one plan, for logs, the Plan RPC and tests (never for
    decisions). Each policy family extends it with its own fields."""

    wall_ms: float | None = None  # the whole plan call
    fallback_reason: str | None = None  # why the primary method's plan was not used

    def to_dict(self) -> dict[str, object]:
        """The fields that are set, by name (the wire form, ``RoundPlan.stats_json``)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class WireStats(PlanStats):
    """Stats received over the wire: the sender's fields by name, whatever its policy."""

    fields: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return dict(self.fields)


@dataclass(frozen=True)
class RoundPlan:
    assignments: tuple[Assignment, ...] = ()
    # Ask to be planned again at this time even if nothing else happens.
    wake_at: float | None = None
    # The backend that produced the plan; ``fallback`` when the primary failed.
    solver: str = ""
    fallback: bool = False
    stats: PlanStats = field(default_factory=PlanStats, compare=False)
    # Requests ended now, with the reason (``--late reject``: they cannot meet their deadline).
    rejections: tuple[tuple[str, str], ...] = ()
    # Placement changes, applied before the assignments: unloads free their
    # bytes at once; a load keeps its GPU busy until the weights are in.
    unloads: tuple[WeightLoad, ...] = ()
    loads: tuple[WeightLoad, ...] = ()
