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


OFFLINE = "offline-bound"


def run_policies(requests: Sequence[Request], cluster: Cluster, cost: CostModel,
                 policies: Sequence[str], config: SimConfig,
                 progress: Callable[[str, int, int], None] | None = None,
                 offline_budget_s: float = 4.0, late: str = "serve") -> dict[str, PolicyRun]:
    """Simulate each policy on the same requests; a fresh policy object per run.

    ``offline-bound`` is not a round policy: it solves the whole trace with
    CP-SAT (``offline_budget_s`` deterministic seconds, so the result repeats
    for a seed) and its summary adds ``slo_attainment_upper_bound``, the
    proven bound on any policy's attainment. ``late`` (``serve`` or
    ``reject``) is what the solver policies do with requests that can no
    longer make their deadline; the peers always serve them.
    """
    out: dict[str, PolicyRun] = {}
    for name in policies:
        if name == OFFLINE:
            from planner.offline import solve_offline

            off = solve_offline(requests, cluster, cost, time_limit_s=max(60.0, 20 * offline_budget_s),
                                seed=config.seed, deterministic_time=offline_budget_s)
            summary = summarize(off.result)
            summary["slo_attainment_upper_bound"] = round(off.upper_bound, 6)
            summary["offline_status"] = off.status
            out[name] = PolicyRun(off.result, summary)
            if progress:
                progress(name, len(requests), len(requests))
            continue
        policy = make_policy(name, late=late)
        cb = (lambda done, total, _n=name: progress(_n, done, total)) if progress else None
        result = Simulator(cluster, cost, policy, config).run(requests, progress=cb)
        out[name] = PolicyRun(result, summarize(result))
    return out
