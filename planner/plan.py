"""RoundPlan: what a policy decides for one planning instant."""
from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class RoundPlan:
    assignments: tuple[Assignment, ...] = ()
    # Ask to be planned again at this time even if nothing else happens.
    wake_at: float | None = None
    # The backend that produced the plan; ``fallback`` when the primary failed.
    solver: str = ""
    fallback: bool = False
    stats: dict = field(default_factory=dict, compare=False)
    # Requests ended now, with the reason (``--late reject``: they cannot meet their deadline).
    rejections: tuple[tuple[str, str], ...] = ()
    # Placement changes, applied before the assignments: unloads free their
    # bytes at once; a load keeps its GPU busy until the weights are in.
    unloads: tuple[WeightLoad, ...] = ()
    loads: tuple[WeightLoad, ...] = ()
