"""Cost-model figures the service quotes: ideal latency at admission, backlog, predicted finish."""
from __future__ import annotations

from dataclasses import dataclass

from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.request import RequestStatus, Stage
from ditplan.planner.service.book import Tracked

CACHE_LIMIT = 4096  # (model, shape) pairs kept; admission asks for one per request


@dataclass(frozen=True)
class ShapeCosts:
    k: int  # fastest SP degree
    step: float  # step seconds at k
    encode: float
    decode: float


class Estimator:
    """The cost model's answers for one cluster, cached per (model, shape)."""

    def __init__(self, cluster: Cluster, cost: CostModel) -> None:
        self.cluster, self.cost = cluster, cost
        self._cache: dict[tuple[str, Shape], ShapeCosts] = {}

    def costs(self, model: str, shape: Shape) -> ShapeCosts:
        key = (model, shape)
        c = self._cache.get(key)
        if c is None:
            spec = get_model(model)
            k = self.cost.best_sp(spec, shape, self.cluster.max_node_gpus)
            c = ShapeCosts(k, self.cost.step_time(spec, shape, k), self.cost.encode_time(spec, shape),
                           self.cost.decode_time(spec, shape))
            if len(self._cache) < CACHE_LIMIT:
                self._cache[key] = c
        return c

    def ideal_latency(self, model: str, shape: Shape, steps: int) -> float:
        """``CostModel.ideal_latency`` (same terms, same order), from the cache."""
        c = self.costs(model, shape)
        return c.encode + steps * c.step + c.decode

    def work_gpu_s(self, st: RequestStatus) -> float:
        """GPU-seconds the rest of a request needs at its fastest degree (the backlog's unit)."""
        r = st.request
        c = self.costs(r.model, r.shape)
        return c.k * st.remaining_steps * c.step + (0.0 if st.encoded else c.encode) + c.decode

    def predict(self, t: Tracked, now: float, backlog_gpu_s: float, owned_gpus: int) -> float | None:
        """Estimated finish: the rest at the request's degree after any in-flight work, plus a fluid
        wait for the backlog on the ``owned_gpus`` executors hold (None: ended unfinished)."""
        st, r = t.status, t.status.request
        if t.outcome == "done":
            return st.finish
        if t.outcome is not None:
            return None
        c = self.costs(r.model, r.shape)
        step = c.step if not st.sp or st.sp == c.k else self.cost.step_time(r.spec, r.shape, st.sp)
        rest = st.remaining_steps * step
        if t.flight is not None:
            if t.flight.assignment.stage is Stage.DECODE:
                return max(now, t.flight.segment.end)
            return max(now, t.flight.segment.end) + rest + c.decode
        wait = backlog_gpu_s / (owned_gpus or self.cluster.size)
        return now + wait + (0.0 if st.encoded else c.encode) + rest + c.decode
