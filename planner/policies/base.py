"""The policy interface: ``plan(state) -> RoundPlan``, and a name registry."""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from ditplan.planner.plan import RoundPlan
from ditplan.planner.state import PlannerState


@runtime_checkable
class Policy(Protocol):
    name: str

    def plan(self, state: PlannerState) -> RoundPlan: ...


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
