"""Peers on a static placement: one deployment per group of GPUs that hold the same models.

A static split is a set of independent deployments, which is how the peer
systems run several models: each group of GPUs with the same resident
backbones serves only those models' requests, with its own instance of the
peer policy, and sees every other GPU as busy. On a replicated placement
there is one group and the peer plans exactly as it always did.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from planner.plan import RoundPlan
from planner.policies.base import Policy
from planner.state import PlannerState

_NEVER = 1e12  # "busy" horizon of GPUs outside a group (finite: peers do arithmetic on it)


def placement_groups(state: PlannerState) -> list[tuple[frozenset[str], tuple[int, ...]]]:
    """(models, GPUs) of each group of GPUs holding the same backbones, largest group first."""
    groups: dict[frozenset[str], list[int]] = {}
    for g in range(state.cluster.size):
        models = frozenset(state.placement.models_on(g))
        if models:
            groups.setdefault(models, []).append(g)
    return sorted(((m, tuple(gs)) for m, gs in groups.items()), key=lambda x: (-len(x[1]), x[1]))


class OnStaticPlacement:
    """Run ``factory()`` policies, one per placement group, and merge their plans."""

    def __init__(self, name: str, factory: Callable[[], Policy]) -> None:
        self.name = name
        self._factory = factory
        self._inner: dict[tuple[int, ...], Policy] = {}

    def _policy(self, gpus: tuple[int, ...]) -> Policy:
        if gpus not in self._inner:
            self._inner[gpus] = self._factory()
        return self._inner[gpus]

    def plan(self, state: PlannerState) -> RoundPlan:
        groups = placement_groups(state)
        if len(groups) == 1 and len(groups[0][1]) == state.cluster.size:
            return self._policy(groups[0][1]).plan(state)
        taken: set[str] = set()
        parts: list[RoundPlan] = []
        for models, gpus in groups:
            mine = set(gpus)
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
            if all(state.gpu_free_at[g] > state.now for g in gpus):
                # Nothing starts here now: fresh requests stay free for another group of their model.
                taken.update(r.id for r in reqs if r.in_flight or r.latent_gpus)
                continue
            ids = {r.id for r in reqs}
            free_at = [t if g in mine else max(t, state.now + _NEVER) for g, t in enumerate(state.gpu_free_at)]
            view = dataclasses.replace(state, requests=reqs, gpu_free_at=free_at,
                                       just_paused=state.just_paused & ids)
            parts.append(self._policy(gpus).plan(view))
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
