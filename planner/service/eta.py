"""Cost-model figures the service quotes: ideal latency at admission, backlog, predicted finish.

The core rebinds the estimator to each refined cost model (``rebind``); its cache goes with the
cost model it was filled from, so a reader racing a rebind fills the old cache, never the new one.
"""
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
        self.cluster = cluster
        self._bound: tuple[CostModel, dict[tuple[str, Shape], ShapeCosts]] = (cost, {})

    @property
    def cost(self) -> CostModel:
        return self._bound[0]

    def rebind(self, cost: CostModel) -> None:
        """Quote from ``cost`` from now on (a refined view of the same model); the cache starts afresh."""
        self._bound = (cost, {})

    def costs(self, model: str, shape: Shape) -> ShapeCosts:
        cost, cache = self._bound
        key = (model, shape)
        c = cache.get(key)
        if c is None:
            spec = get_model(model)
            k = cost.best_sp(spec, shape, self.cluster.max_node_gpus)
            c = ShapeCosts(k, cost.step_time(spec, shape, k), cost.encode_time(spec, shape),
                           cost.decode_time(spec, shape))
            if len(cache) < CACHE_LIMIT:
                cache[key] = c
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
