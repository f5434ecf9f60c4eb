"""Offline what-if: one trace, one cluster, several policies, same seed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from models.cost import CostModel
from planner.cluster import Cluster
from planner.metrics import summarize
from planner.policies.base import make_policy
from planner.request import Request
from planner.simulator import SimConfig, SimResult, Simulator
from planner.traces import TraceRecord, ideal_latency_from, resolve_deadlines


def to_requests(records: Sequence[TraceRecord], cost: CostModel, cluster: Cluster,
                slo_scale: float) -> list[Request]:
    """Requests with deadlines; ``slo_scale`` is relative to the ideal latency on ``cluster``."""
    return resolve_deadlines(records, ideal_latency_from(cost, cluster.max_node_gpus), slo_scale)


@dataclass
class PolicyRun:
    result: SimResult
    summary: dict


def run_policies(requests: Sequence[Request], cluster: Cluster, cost: CostModel,
                 policies: Sequence[str], config: SimConfig,
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, PolicyRun]:
    """Simulate each policy on the same requests; a fresh policy object per run."""
    out: dict[str, PolicyRun] = {}
    for name in policies:
        policy = make_policy(name)
        cb = (lambda done, total, _n=name: progress(_n, done, total)) if progress else None
        result = Simulator(cluster, cost, policy, config).run(requests, progress=cb)
        out[name] = PolicyRun(result, summarize(result))
    return out
