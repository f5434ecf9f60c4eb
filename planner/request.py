"""Requests as submitted, and their progress as the planner tracks it."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence

from ditplan.models.catalog import ModelSpec, Shape, get_model


class RequestState(str, enum.Enum):
    QUEUED = "queued"  # arrived, nothing run yet
    RUNNING = "running"  # encode or diffuse work in flight
    PAUSED = "paused"  # has progress (embeddings/latent resident on a GPU), not in flight
    DECODING = "decoding"  # VAE decode in flight
    DONE = "done"
    FAILED = "failed"  # rejected (see RequestStatus.rejected) or unfinished when a run ended


class Stage(str, enum.Enum):
    ENCODE = "encode"
    DIFFUSE = "diffuse"
    DECODE = "decode"


@dataclass(frozen=True)
class RequestFields:
    """What names a request's work, the head every request record on a boundary shares (a Submit,
    a GetRequest view, a plan update's request data, a journal row, a stateless Plan input)."""

    id: str
    model: str
    height: int
    width: int
    frames: int
    steps: int

    @property
    def shape(self) -> Shape:
        return Shape(self.height, self.width, self.frames)


@dataclass(frozen=True)
class Request:
    """One generation request; immutable once accepted."""

    id: str
    model: str
    shape: Shape
    steps: int
    arrival: float
    deadline: float

    @property
    def spec(self) -> ModelSpec:
        return get_model(self.model)

    @property
    def kind(self) -> str:
        return "video" if self.shape.frames > 1 else "image"

    def batch_key(self) -> tuple:
        """Requests with equal keys may share one forward pass (at equal progress)."""
        return (self.model, self.shape, self.steps)

    def csp_key(self) -> str | None:
        """Requests with equal keys may share one CSP batch (any sizes, any progress); None: no CSP."""
        return self.model if self.spec.csp and self.kind == "image" else None


def batch_conflict(requests: Sequence[Request], steps_done: Sequence[int] | None = None) -> str | None:
    """Why ``requests`` cannot share one forward pass, or None: one rule for plans and timelines.

    Equal ``batch_key`` and equal progress (``steps_done``, when known) batch as ever; a model the
    executor runs CSP batches of also batches other sizes and other progress, up to ``MAX_BATCH``
    (``models/csp.py``)."""
    from ditplan.models.csp import MAX_BATCH

    if len(requests) < 2:
        return None
    csp = {r.csp_key() for r in requests}
    if len(csp) == 1 and None not in csp:
        if len(requests) > MAX_BATCH:
            return f"{len(requests)} requests in one CSP batch, more than {MAX_BATCH}"
        return None
    if len({r.batch_key() for r in requests}) > 1:
        return "batch mixes incompatible requests"
    if steps_done is not None and len(set(steps_done)) > 1:
        return f"batch mixes step positions {sorted(set(steps_done))} of a model without CSP batches"
    return None


DEADLINE_TOL_S = 1e-9  # a finish this little past its deadline still meets it (float noise in sums)


def meets(finish: float | None, deadline: float) -> bool:
    """Whether a finish at ``finish`` (None: unfinished) meets ``deadline``: the one on-time rule."""
    return finish is not None and finish <= deadline + DEADLINE_TOL_S


def resting_state(encoded: bool, steps_done: int) -> RequestState:
    """The state of a live request with no work in flight: paused once it has progress to keep, else queued."""
    return RequestState.PAUSED if (encoded or steps_done) else RequestState.QUEUED


@dataclass
class RequestStatus:
    """Mutable progress of a request; owned by whoever executes plans."""

    request: Request
    state: RequestState = RequestState.QUEUED
    encoded: bool = False
    steps_done: int = 0
    latent_gpus: tuple[int, ...] = ()  # where its embeddings / latent live
    sp: int = 0  # degree of its last diffuse segment
    finish: float | None = None
    preemptions: int = 0
    sp_changes: int = 0
    migrations: int = 0
    rejected: str | None = None  # why the planner ended it unfinished
    history: list = field(default_factory=list, repr=False)

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def remaining_steps(self) -> int:
        return self.request.steps - self.steps_done

    @property
    def next_stage(self) -> Stage | None:
        if self.state in (RequestState.DONE, RequestState.FAILED):
            return None
        if not self.encoded:
            return Stage.ENCODE
        if self.steps_done < self.request.steps:
            return Stage.DIFFUSE
        return Stage.DECODE

    @property
    def in_flight(self) -> bool:
        return self.state in (RequestState.RUNNING, RequestState.DECODING)

    @property
    def live(self) -> bool:
        return self.state not in (RequestState.DONE, RequestState.FAILED)

    @property
    def met(self) -> bool:
        """Done by its deadline."""
        return self.state is RequestState.DONE and meets(self.finish, self.request.deadline)

    def rest(self) -> None:
        """No work in flight any more: back to its resting state (``resting_state``)."""
        self.state = resting_state(self.encoded, self.steps_done)
