"""What a what-if runs by name: every round policy, through the simulator, and the registered runners.

A runner takes the requests, the cluster, the cost model and the what-if's
options, and returns the run's result with its summary. A round policy
(``planner/policies``) needs none of its own: it runs through the simulator.
A solver that is not a round policy, such as the offline bound
(``planner/offline``), registers its runner with :func:`register_runner`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.metrics import summarize
from ditplan.planner.policies.base import make_policy, policy_names
from ditplan.planner.request import Request
from ditplan.planner.sim_result import SimResult
from ditplan.planner.simulator import SimConfig, Simulator


@dataclass(frozen=True)
class RunOptions:
    """The what-if's options; each runner reads those that apply to it."""

    config: SimConfig = SimConfig()
    late: str = "serve"  # what the solver policies do with requests that can no longer make their deadline
    offline_budget_s: float = 4.0  # offline-bound: CP-SAT deterministic seconds
    progress: Callable[[int, int], None] | None = None  # (requests finished, requests)


@dataclass
class PolicyRun:
    result: SimResult
    summary: dict  # planner.metrics.summarize of the result, and what the runner adds


Runner = Callable[[Sequence[Request], Cluster, CostModel, RunOptions], PolicyRun]

_RUNNERS: dict[str, Runner] = {}


def register_runner(name: str) -> Callable[[Runner], Runner]:
    """Function decorator: make a runner that is not a round policy runnable by name."""
    def deco(runner: Runner) -> Runner:
        _RUNNERS[name] = runner
        return runner
    return deco


def _registered() -> dict[str, Runner]:
    importlib.import_module("ditplan.planner.offline")  # registers offline-bound
    return _RUNNERS


def runner_names() -> list[str]:
    """Every name a what-if runs: the round policies (sorted), then the registered runners."""
    return policy_names() + list(_registered())


def simulate(name: str, requests: Sequence[Request], cluster: Cluster, cost: CostModel,
             options: RunOptions) -> PolicyRun:
    """Round policy ``name`` (a fresh policy object) run through the simulator."""
    policy = make_policy(name, late=options.late)
    result = Simulator(cluster, cost, policy, options.config).run(requests, progress=options.progress)
    return PolicyRun(result, summarize(result))


def get_runner(name: str) -> Runner:
    """The runner of ``name``: its registered one, else the simulator's (``make_policy`` refuses a name
    that is no round policy either)."""
    return _registered().get(name) or partial(simulate, name)
