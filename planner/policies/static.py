"""Peers on a static placement: one deployment per group of GPUs that hold the same models.

A static split is a set of independent deployments, which is how the peer
systems run several models: each group of GPUs with the same resident
backbones serves only those models' requests, with its own instance of the
peer policy, and sees every other GPU as busy. On a replicated placement
there is one group and the peer plans exactly as it always did.

GPUs that hold no backbone, only text encoders and VAEs (encode and decode
workers, ``stages`` placement), serve every group of their models: each
group in turn sees the ones no earlier group took this round.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ditplan.planner.cluster import Cluster, DeploymentView
from ditplan.planner.plan import RoundPlan
from ditplan.planner.policies.base import Policy
from ditplan.planner.state import PlannerState

_NEVER = 1e12  # "busy" horizon of GPUs outside a group (finite: peers do arithmetic on it)


def stage_gpus(state: PlannerState) -> dict[int, frozenset[str]]:
    """GPU -> models whose encode or decode it runs, for the GPUs that hold no backbone."""
    out = {}
    for g, res in enumerate(state.placement.resident):
        if res and not any(c == "backbone" for _, c in res):
            out[g] = frozenset(m for m, _ in res)
    return out


def placement_groups(state: PlannerState) -> list[tuple[frozenset[str], tuple[int, ...]]]:
    """(models, GPUs) of each group of GPUs holding the same backbones, largest group first."""
    groups: dict[frozenset[str], list[int]] = {}
    for g in range(state.cluster.size):
        models = frozenset(state.placement.models_on(g))
        if models:
            groups.setdefault(models, []).append(g)
    return sorted(((m, tuple(gs)) for m, gs in groups.items()), key=lambda x: (-len(x[1]), x[1]))


class OnStaticPlacement(Policy):
    """Run ``factory()`` policies, one per placement group, and merge their plans."""

    def __init__(self, name: str, factory: Callable[[], Policy], split_placement: str = "split") -> None:
        self.name = name
        self.split_placement = split_placement  # what ``auto`` becomes when the models do not all fit
        self._factory = factory
        self._inner: dict[tuple[int, ...], Policy] = {}
        self._cluster: Cluster | None = None  # the cluster the views below are of
        self._views: dict[frozenset[int], DeploymentView] = {}

    def reset(self) -> None:
        for policy in self._inner.values():
            policy.reset()

    def _view(self, cluster: Cluster, gpus: set[int]) -> DeploymentView:
        if cluster is not self._cluster:
            self._cluster, self._views = cluster, {}
        key = frozenset(gpus)
        if key not in self._views:
            self._views[key] = DeploymentView(cluster, gpus)
        return self._views[key]

    def _policy(self, gpus: tuple[int, ...]) -> Policy:
        if gpus not in self._inner:
            self._inner[gpus] = self._factory()
        return self._inner[gpus]

    def plan(self, state: PlannerState) -> RoundPlan:
        groups = placement_groups(state)
        if len(groups) == 1 and len(groups[0][1]) == state.cluster.size:
            return self._policy(groups[0][1]).plan(state)
        shared = stage_gpus(state)
        used: set[int] = set()  # shared GPUs a group's plan took this round
        taken: set[str] = set()
        parts: list[RoundPlan] = []
        for models, gpus in groups:
            mine = set(gpus) | {g for g, ms in shared.items() if ms & models and g not in used}
            reqs = []
            for r in state.requests:
                if r.id in taken or r.request.model not in models:
                    continue
                # A request whose latent lives in another group stays there.
                if r.latent_gpus and r.steps_done > 0 and not mine.issuperset(r.latent_gpus):
                    continue
                reqs.append(r)
            if not reqs:
                continue
            if all(state.gpu_free_at[g] > state.now for g in mine):
                # Nothing starts here now: fresh requests stay free for another group of their model.
                taken.update(r.id for r in reqs if r.in_flight or r.latent_gpus)
                continue
            ids = {r.id for r in reqs}
            free_at = [t if g in mine else max(t, state.now + _NEVER) for g, t in enumerate(state.gpu_free_at)]
            view = dataclasses.replace(state, cluster=self._view(state.cluster, mine), requests=reqs,
                                       gpu_free_at=free_at, just_paused=state.just_paused & ids)
            part = self._policy(gpus).plan(view)
            parts.append(part)
            used.update(g for a in part.assignments for g in a.gpus if g in shared)
            taken |= ids
        return _merge(parts)


def _merge(parts: list[RoundPlan]) -> RoundPlan:
    if not parts:
        return RoundPlan()
    if len(parts) == 1:
        return parts[0]
    wakes = [p.wake_at for p in parts if p.wake_at is not None]
    return RoundPlan(assignments=tuple(a for p in parts for a in p.assignments),
                     wake_at=min(wakes) if wakes else None, solver=parts[0].solver,
                     fallback=any(p.fallback for p in parts),
                     rejections=tuple(r for p in parts for r in p.rejections))
