"""The stateless RPCs: Plan (one round for a full state) and WhatIf (a trace under policies).

Both validate everything first (INVALID_ARGUMENT naming the field), build
the same objects the CLI builds (``parse_cluster``, ``CostModel``,
``make_policy``, ``PlannerState``, ``check_plan``; ``whatif.run_policies``
and ``metrics.summarize``), and bound their work: at most ``MAX_GPUS`` GPUs,
``MAX_PLAN_REQUESTS`` requests, ``MAX_WHATIF_RECORDS`` trace records. A
what-if stops early when its caller's deadline passes or it is cancelled.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from ditplan.models.catalog import CATALOG, SP_DEGREES
from ditplan.models.cost import CostModel
from ditplan.models.gpus import GPU_KINDS
from ditplan.planner.checker import check_plan
from ditplan.planner.cluster import SHORT_SPEC, Cluster, parse_cluster, parse_cluster_doc
from ditplan.planner.errors import InputError, PlacementError
from ditplan.planner.placement import Placement, check_fits, validate_placement
from ditplan.planner.plan import RoundPlan
from ditplan.planner.policies.base import make_policy, policy_names
from ditplan.planner.request import RequestFields, RequestState, RequestStatus, resting_state
from ditplan.planner.service.admission import validate_records, validate_request
from ditplan.planner.service.errors import Cancelled, DeadlineExceeded, InvalidArgument, ServiceError, shown
from ditplan.planner.simulator import PlanViolation, SimConfig
from ditplan.planner.state import PlannerState
from ditplan.planner.traces import is_number

MAX_GPUS = 1024
MAX_PLAN_REQUESTS = 20_000
MAX_WHATIF_RECORDS = 20_000
MAX_POLICIES = 16
_LIVE_STATES = {"queued": RequestState.QUEUED, "running": RequestState.RUNNING,
                "paused": RequestState.PAUSED, "decoding": RequestState.DECODING}


def cluster_from_text(spec: str, field: str = "cluster") -> Cluster:
    """A cluster from ``NxKIND``, ``MxNxKIND`` or inline JSON; never a server-side file."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"field {field!r} = {shown(spec)} is empty; use e.g. 8xH100, 2x8xL20 or inline JSON")
    spec = spec.strip()
    try:
        return _cached_cluster(spec)
    except InputError as exc:
        raise InvalidArgument(f"field {field!r} = {_short(spec)!r}: {_short(str(exc), 400)}") from None


@lru_cache(maxsize=64)
def _cached_cluster(spec: str) -> Cluster:
    if spec.startswith("{"):
        try:
            doc = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        nodes = doc.get("nodes") if isinstance(doc, dict) else None
        if isinstance(nodes, list):
            total = sum(n.get("gpus", 0) if isinstance(n, dict) and isinstance(n.get("gpus"), int) else 0
                        for n in nodes)
            if total > MAX_GPUS:
                raise InputError(f"{total} GPUs; at most {MAX_GPUS}")
        return parse_cluster_doc(doc, "inline")
    m = SHORT_SPEC.match(spec)
    if not m:
        raise InputError("must be NxKIND, MxNxKIND (e.g. 8xH100, 2x8xL20) or an inline JSON cluster")
    if int(m.group(1) or 1) * int(m.group(2)) > MAX_GPUS:
        raise InputError(f"more than {MAX_GPUS} GPUs")
    return parse_cluster(spec)


@lru_cache(maxsize=8)
def cost_model(kind: str) -> CostModel:
    return CostModel(kind)


def _short(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _policy(name: str, field: str = "policy") -> str:
    known = policy_names()
    if name not in known:
        raise InvalidArgument(f"field {field!r} = {shown(name)} unknown policy; known: {', '.join(known)}")
    return name


def _gpu_kind(name: str, cluster: Cluster) -> str:
    if not name:
        return cluster.kind.name
    if name.upper() not in GPU_KINDS:
        raise InvalidArgument(f"field 'gpu_kind' = {shown(name)} unknown GPU kind; known: {', '.join(GPU_KINDS)}")
    return name.upper()


# --- Plan -------------------------------------------------------------------
@dataclass(frozen=True)
class ProgressIn(RequestFields):
    """One live request with its progress, as Plan receives it."""

    arrival: float
    deadline: float
    state: str | None = None  # queued | running | paused | decoding | None (derived from progress)
    encoded: bool = False
    steps_done: int = 0
    latent_gpus: tuple[int, ...] = ()
    sp: int = 0


@dataclass(frozen=True)
class PlanIn:
    """The full state for one stateless planning round."""

    now: float
    cluster: str  # NxKIND, MxNxKIND or inline JSON ("" over gRPC: the server's)
    requests: Sequence[ProgressIn] = ()
    policy: str = ""  # "" over gRPC: the server's
    gpu_kind: str = ""  # cost model GPU kind; "": the cluster's
    round_s: float = 0.0  # 0: 2 s
    gpu_free_at: Sequence[float] = ()  # per GPU; empty: all idle at ``now``
    just_paused: Sequence[str] = ()
    served_models: Sequence[str] = ()  # replicated on every GPU; empty: the requests' models
    placement: Sequence[Sequence[str]] = ()  # per GPU, "model/component"; set: overrides served_models


@dataclass(frozen=True)
class PlanOut:
    plan: RoundPlan
    problems: list[str]
    solver_ms: float


def plan_round(p: PlanIn) -> PlanOut:
    """Validate ``p``, run the policy once, and check its plan independently."""
    if not is_number(p.now):
        raise InvalidArgument(f"field 'now' = {shown(p.now)} must be a finite number")
    cluster = cluster_from_text(p.cluster)
    cost = cost_model(_gpu_kind(p.gpu_kind, cluster))
    policy = make_policy(_policy(p.policy))
    round_s = p.round_s or 2.0
    if not is_number(round_s) or round_s <= 0:
        raise InvalidArgument(f"field 'round_s' = {p.round_s!r} must be a positive number")
    if len(p.requests) > MAX_PLAN_REQUESTS:
        raise InvalidArgument(f"field 'requests' has {len(p.requests)} entries; at most {MAX_PLAN_REQUESTS}")
    statuses, seen = [], set()
    for i, r in enumerate(p.requests):
        where = f"requests[{i}]"
        req = validate_request(i, r.id, r.model, r.height, r.width, r.frames, r.steps, r.arrival, r.deadline)
        if req.id in seen:
            raise InvalidArgument(f"{where}: field 'id' = {shown(req.id)} duplicate id")
        seen.add(req.id)
        if not 0 <= r.steps_done <= req.steps:
            raise InvalidArgument(f"{where}: field 'steps_done' = {r.steps_done} must be 0..{req.steps}")
        if r.steps_done > 0 and not r.encoded:
            raise InvalidArgument(f"{where}: field 'steps_done' = {r.steps_done} but 'encoded' is false")
        for g in r.latent_gpus:
            if not 0 <= g < cluster.size:
                raise InvalidArgument(f"{where}: field 'latent_gpus' = {shown(list(r.latent_gpus))} names GPU {g}, "
                                      f"not in 0..{cluster.size - 1}")
        if r.sp not in (0, *SP_DEGREES):
            raise InvalidArgument(f"{where}: field 'sp' = {r.sp} must be 0 (none yet), 1, 2, 4 or 8")
        if r.state is None:
            state = resting_state(r.encoded, r.steps_done)
        elif r.state in _LIVE_STATES:
            state = _LIVE_STATES[r.state]
        else:
            raise InvalidArgument(f"{where}: field 'state' = {shown(r.state)} must be a live state "
                                  f"({', '.join(_LIVE_STATES)})")
        statuses.append(RequestStatus(req, state=state, encoded=r.encoded, steps_done=r.steps_done,
                                      latent_gpus=tuple(r.latent_gpus), sp=r.sp))
    free_at = list(p.gpu_free_at) or [p.now] * cluster.size
    if len(free_at) != cluster.size:
        raise InvalidArgument(f"field 'gpu_free_at' has {len(free_at)} entries; the cluster has {cluster.size} GPUs")
    for g, t in enumerate(free_at):
        if not is_number(t):
            raise InvalidArgument(f"field 'gpu_free_at'[{g}] = {t!r} must be a finite number")
    for rid in p.just_paused:
        if rid not in seen:
            raise InvalidArgument(f"field 'just_paused' = {shown(rid)} is not one of the requests")
    state = PlannerState(float(p.now), cluster, cost, statuses, free_at, _placement(p, cluster, statuses),
                         float(round_s), frozenset(p.just_paused))
    t0 = time.perf_counter()
    plan = policy.plan(state)
    ms = (time.perf_counter() - t0) * 1e3
    return PlanOut(plan, check_plan(state, plan), ms)


def _placement(p: PlanIn, cluster: Cluster, statuses: Sequence[RequestStatus]) -> Placement:
    if p.placement:
        if len(p.placement) != cluster.size:
            raise InvalidArgument(f"field 'placement' has {len(p.placement)} entries; the cluster has "
                                  f"{cluster.size} GPUs")
        try:
            placement = Placement.from_names(p.placement, "field 'placement'")
            validate_placement(placement, cluster)
        except PlacementError as exc:
            raise InvalidArgument(str(exc)) from None
        return placement
    served = tuple(p.served_models) or tuple(sorted({s.request.model for s in statuses}))
    for m in served:
        if m not in CATALOG:
            raise InvalidArgument(f"field 'served_models' = {shown(m)} unknown model; known: {', '.join(sorted(CATALOG))}")
    return Placement.replicate(cluster.size, served)


# --- WhatIf -----------------------------------------------------------------
@dataclass(frozen=True)
class WhatIfIn:
    records: Sequence[dict]  # the trace file's fields
    cluster: str
    policies: Sequence[str]
    slo_scale: float = 1.5
    seed: int = 0
    noise: float = 0.0
    round_s: float = 2.0


class _Stop(Exception):
    pass


def whatif(w: WhatIfIn, should_stop: Callable[[], str | None] = lambda: None) -> dict[str, dict]:
    """What-if metrics per policy, as ``ditplan whatif --json`` writes them.

    ``should_stop`` is polled during the simulations; a non-empty answer
    ("deadline" or "cancelled") ends the call with that status.
    """
    from ditplan.planner.whatif import run_policies, to_requests

    if not w.records:
        raise InvalidArgument("field 'records' is empty: nothing to simulate")
    if len(w.records) > MAX_WHATIF_RECORDS:
        raise InvalidArgument(f"field 'records' has {len(w.records)} entries; at most {MAX_WHATIF_RECORDS}")
    if not w.policies:
        raise InvalidArgument("field 'policies' is empty")
    if len(w.policies) > MAX_POLICIES:
        raise InvalidArgument(f"field 'policies' has {len(w.policies)} entries; at most {MAX_POLICIES}")
    names: list[str] = []
    for i, p in enumerate(w.policies):
        if _policy(p, f"policies[{i}]") not in names:
            names.append(p)
    for key, value, lo in (("slo_scale", w.slo_scale, 0.0), ("round_s", w.round_s, 0.0)):
        if not is_number(value) or value <= lo:
            raise InvalidArgument(f"field {key!r} = {value!r} must be a positive number")
    if not is_number(w.noise) or w.noise < 0:
        raise InvalidArgument(f"field 'noise' = {w.noise!r} must be >= 0")
    cluster = cluster_from_text(w.cluster)
    cost = cost_model(cluster.kind.name)
    records = validate_records(w.records)
    try:
        requests = to_requests(records, cost, cluster, w.slo_scale)
    except InputError as exc:  # a deadline past the horizon; "line N" is records[N - 1]
        raise InvalidArgument(f"records: {exc}") from None
    try:
        check_fits(requests, cluster, {r["id"]: f"records[{i}]" for i, r in enumerate(w.records)})
    except PlacementError as exc:
        raise InvalidArgument(str(exc)) from None
    config = SimConfig(round_s=w.round_s, noise=w.noise, seed=w.seed)
    calls = 0

    def progress(_policy: str, _done: int, _total: int) -> None:
        nonlocal calls
        calls += 1
        if calls % 64 == 0 and (why := should_stop()):
            raise _Stop(why)

    try:
        runs = run_policies(requests, cluster, cost, names, config, progress=progress)
    except _Stop as stop:
        if str(stop) == "cancelled":
            raise Cancelled("what-if cancelled by the caller") from None
        raise DeadlineExceeded("what-if ran past the call's deadline; use a longer deadline or a smaller trace") from None
    except PlanViolation as exc:
        raise ServiceError(f"a policy produced an illegal plan: {exc}") from None
    return {name: run.summary for name, run in runs.items()}


def metrics_json(summaries: dict[str, dict]) -> str:
    """The bytes ``ditplan whatif --json`` writes (``metrics.write_summary``)."""
    return json.dumps(summaries, indent=2) + "\n"
