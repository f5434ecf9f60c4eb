"""One checked planning call, in this thread or in a planner child process.

``plan_checked`` runs the policy, has the independent checker validate the
plan, and falls back to ``tetriserve-dp`` when the policy raises or its plan
is illegal, so no round is lost.

``PlannerProcess`` runs ``plan_checked`` in a child process (``ditplan serve
--planner-process``, the CLI default): a CP-SAT model build is long pure
Python, and in the server's process it would hold the GIL that every RPC
thread needs. The child builds its own cluster, cost model and policy from
the same configuration (cluster, GPU kind, profiles); each round it receives
the policy's view (the live statuses, GPU free times, clock, just-paused ids)
and answers with the plan. The cost model's online corrections (cost
refinement, ``models/refine.py``) come with the first round that plans on
them: the child plans on the same corrected view as the server would.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from ditplan.models.profiles import Profile
from ditplan.planner.checker import check_plan
from ditplan.planner.plan import RoundPlan
from ditplan.planner.request import RequestStatus
from ditplan.planner.state import PlannerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanResult:
    plan: RoundPlan
    solver_ms: float  # wall time of the whole call
    violations: int  # plans the checker rejected (the policy's, then the fallback's)


def _safe_plan(policy, state: PlannerState) -> RoundPlan | None:
    try:
        return policy.plan(state)
    except Exception:
        log.exception("policy %r raised at t=%.3f", getattr(policy, "name", policy), state.now)
        return None


def plan_checked(policy, fallback, state: PlannerState, check: bool = True) -> PlanResult:
    """The policy's plan if legal, else the fallback's (``fallback=True``), else an empty one."""
    t0 = time.perf_counter()
    violations = 0
    plan = _safe_plan(policy, state)
    if plan is not None and check:
        problems = check_plan(state, plan)
        if problems:
            violations += 1
            log.error("policy %r plan rejected by the checker at t=%.3f: %s", getattr(policy, "name", policy),
                      state.now, "; ".join(problems[:5]))
            plan = None
    if plan is None and fallback is not None:
        plan = _safe_plan(fallback, state)
        if plan is not None and check_plan(state, plan):
            violations += 1
            plan = None
        if plan is not None:
            plan = dataclasses.replace(plan, solver=plan.solver or fallback.name, fallback=True)
    if plan is None:
        plan = RoundPlan(fallback=True)
    return PlanResult(plan, (time.perf_counter() - t0) * 1e3, violations)


def _worker(conn, cluster_spec: str, policy: str, fallback: str | None, check: bool, options: dict,
            gpu: str | None, profiles: list[Profile] | None) -> None:
    """The child process: build the planning context once, then answer one plan per message."""
    from ditplan.models.cost import CostModel
    from ditplan.planner.cluster import parse_cluster
    from ditplan.planner.policies.base import make_policy

    cluster = parse_cluster(cluster_spec)
    prior = CostModel(gpu or cluster.kind, profiles)
    cost = prior
    pol = make_policy(policy, **options)
    fb = make_policy(fallback) if fallback else None
    mirror: dict[str, RequestStatus] = {}  # the statuses the parent sent, by id (it sends only changes)
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the server went away (even kill -9): so do we
            return
        if msg is None:
            return
        now, order, changed, free_at, served, round_s, just, corrections = msg
        if corrections is not None:
            cost = prior.with_corrections(corrections)
        for st in changed:
            mirror[st.id] = st
        statuses = [mirror[rid] for rid in order]
        if len(mirror) > 2 * len(order) + 64:  # drop the ended ones now and then
            mirror = {st.id: st for st in statuses}
        state = PlannerState(now, cluster, cost, statuses, free_at, served, round_s, just)
        conn.send(plan_checked(pol, fb, state, check))


class PlannerProcess:
    """A planner child process; ``plan`` blocks the calling thread (not the GIL) while it solves."""

    def __init__(self, cluster_spec: str, policy: str, fallback: str | None, check: bool = True,
                 start_timeout_s: float = 120.0, options: dict | None = None, gpu: str | None = None,
                 profiles: Sequence[Profile] | None = None) -> None:
        """``gpu`` and ``profiles``: the server's cost model's (default: the cluster's kind, the built-in
        profiles)."""
        ctx = mp.get_context("spawn")  # never fork a process that runs gRPC threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child, cluster_spec, policy, fallback, check, dict(options or {}),
                                                       gpu, None if profiles is None else list(profiles)),
                                 name="ditplan-planner", daemon=True)
        self._sent: Mapping | None = None  # the corrections the child plans with (None: none sent yet)
        self._sent_status: dict[str, RequestStatus] = {}  # what the child's mirror holds, by id
        self._proc.start()
        child.close()
        if not self._conn.poll(start_timeout_s) or self._conn.recv() != "ready":
            self.close()
            raise RuntimeError("the planner process did not start")

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def plan(self, state: PlannerState) -> PlanResult:
        """Plan ``state`` in the child (on ``state.cost``'s corrections). Raises ``OSError``/``EOFError`` if the
        child died."""
        corrections = state.cost.corrections
        new = None if corrections is self._sent else dict(corrections)
        # Only the statuses that changed since the last plan travel: the core hands the policy the same
        # copy of a request until it changes (core ``Tracked.snap``), so identity tells.
        sent, statuses = self._sent_status, state.requests
        ids = [st.request.id for st in statuses]
        changed = [st for rid, st in zip(ids, statuses) if sent.get(rid) is not st]
        self._conn.send((state.now, ids, changed, list(state.gpu_free_at), state.placement, state.round_s,
                         state.just_paused, new))
        self._sent = corrections
        self._sent_status = dict(zip(ids, statuses))
        return self._conn.recv()

    def close(self) -> None:
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._conn.close()
