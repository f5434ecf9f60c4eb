"""The policy interface: ``plan(state) -> RoundPlan`` and ``reset()``, and a name registry."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

from ditplan.planner.plan import RoundPlan
from ditplan.planner.state import PlannerState


class Policy(ABC):
    """Plans one instant at a time; a policy may keep state from one plan to the next."""

    name: str

    @abstractmethod
    def plan(self, state: PlannerState) -> RoundPlan: ...

    def reset(self) -> None:
        """Called before a new run (a simulation, a service start): forget what earlier plans kept."""


_REGISTRY: dict[str, Callable[[], Policy]] = {}


def register(name: str):
    """Class decorator: make a policy constructible by name."""
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def policy_names() -> list[str]:
    import ditplan.planner.policies  # noqa: F401  (registers the built-ins)
    return sorted(_REGISTRY)


def make_policy(name: str, **options) -> Policy:
    """A fresh policy by name. ``options`` (e.g. ``late="reject"``) go to the policies that take
    them; the others, the peers that follow their papers, ignore them."""
    import inspect

    import ditplan.planner.policies  # noqa: F401
    if name not in _REGISTRY:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted}
    policy = factory(**kwargs)
    if getattr(policy, "places_models", False):
        return policy
    # A peer runs one deployment per group of GPUs holding the same models (planner/policies/static.py).
    from ditplan.planner.policies.static import OnStaticPlacement

    return OnStaticPlacement(policy.name, lambda: factory(**kwargs),
                             getattr(policy, "split_placement", "split"))
