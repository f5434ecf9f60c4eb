"""What one unit of work costs on this cluster: step times per SP degree at a batch size,
activation memory, encode and decode, and the parallel-efficiency rule the peers share.
"""
from __future__ import annotations

from dataclasses import dataclass

from ditplan.models.catalog import Shape, get_model
from ditplan.planner.request import RequestStatus
from ditplan.planner.state import PlannerState

# A degree is worth its GPUs when it keeps this parallel efficiency: TetriServe's and
# GenServe's elastic scale-up double a degree only then, Hetu-DiT allows only such degrees.
PARALLEL_EFFICIENCY = 0.8
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Timing:
    """Costs of one (model, shape, batch) on this cluster."""

    degrees: tuple[int, ...]  # legal SP degrees with an aligned block on this cluster
    step: dict[int, float]  # seconds per step at degree k on a nominal block
    act: dict[int, int]  # activation bytes per GPU at degree k
    tmin: float  # fastest step time over ``degrees``
    encode: float
    decode: float

    def efficient(self, k: int, base: int = 1) -> bool:
        """Degree ``k`` keeps parallel efficiency (T_base / T_k) x base / k >= PARALLEL_EFFICIENCY."""
        return self.step[base] / self.step[k] * base / k >= PARALLEL_EFFICIENCY - _EPS

    def doubling_pays(self, k: int) -> bool:
        """Degree 2k exists and is efficient relative to k (a step at least 1.6x faster)."""
        return 2 * k in self.step and self.efficient(2 * k, base=k)


class TimingTable:
    """Memo of ``Timing`` by (model, shape, batch), valid for one cluster and cost model.

    A policy is called thousands of times a simulation on the same handful of
    shapes; the memo makes each lookup one dict hit.
    """

    def __init__(self) -> None:
        self._cluster = None
        self._cost = None
        self._memo: dict[tuple[str, Shape, int], Timing] = {}

    def bind(self, state: PlannerState) -> "TimingTable":
        if state.cluster is not self._cluster or state.cost is not self._cost:
            self._cluster, self._cost, self._memo = state.cluster, state.cost, {}
        return self

    def of(self, status: RequestStatus, batch: int = 1) -> Timing:
        """Costs of ``status``'s model and shape, alone or in a batch of ``batch``."""
        req = status.request
        return self.at(req.model, req.shape, batch)

    def at(self, model: str, shape: Shape, batch: int = 1) -> Timing:
        key = (model, shape, batch)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self._build(model, shape, batch)
        return hit

    def _build(self, model: str, shape: Shape, batch: int) -> Timing:
        cluster, cost = self._cluster, self._cost
        spec = get_model(model)
        degrees = tuple(k for k in spec.sp_degrees(cluster.max_node_gpus) if cluster.blocks(k))
        step = {}
        for k in degrees:
            bw = cluster.block_bandwidth(cluster.blocks(k)[0]) if k > 1 else None
            step[k] = cost.step_time(spec, shape, k, batch, link_bw=bw)
        act = {k: spec.activation_bytes(shape, k, batch) for k in degrees}
        return Timing(degrees, step, act, min(step.values()),
                      cost.encode_time(spec, shape, batch), cost.decode_time(spec, shape, batch))


def batch_limit(state: PlannerState, status: RequestStatus) -> int:
    """How many requests like ``status`` may share a forward pass (videos run alone)."""
    req = status.request
    return max(1, state.cost.max_batch(req.spec, req.shape)) if req.kind == "image" else 1
