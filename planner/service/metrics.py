"""Prometheus metrics of a running service (``ditplan serve --metrics-port``).

A custom collector reads the core at scrape time, so the core needs no
Prometheus dependency and each server has its own registry:

* ``ditplan_requests{state}``: requests by state;
* ``ditplan_slo_attainment``: met / decided so far (done requests, and live
  ones already past their deadline);
* ``ditplan_solver_seconds``: histogram of planning-call wall time;
* ``ditplan_plans_total``, ``ditplan_plan_fallbacks_total``,
  ``ditplan_plan_violations_total``, ``ditplan_preemptions_total``,
  ``ditplan_submitted_total``, ``ditplan_refused_total{code}``,
  ``ditplan_executors``, ``ditplan_executors_lost_total``,
  ``ditplan_requeued_total``, ``ditplan_plan_epoch``;
* ``ditplan_step_time_estimate_seconds{model,shape,sp,batch}``: the refined
  step time per key reported so far (cost refinement), with
  ``ditplan_step_time_prior_seconds`` (the profile's or roofline's) and
  ``ditplan_step_time_reports`` and ``ditplan_step_time_estimate_in_use``
  (1 once plans use it: enough reports) beside it.
"""
from __future__ import annotations

from ditplan.planner.service.core import PlannerCore
from ditplan.planner.service.stats import SOLVER_BUCKETS_MS


class CoreCollector:
    def __init__(self, core: PlannerCore) -> None:
        self.core = core

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        core, stats = self.core, self.core.stats
        info = core.info()
        g = GaugeMetricFamily("ditplan_requests", "Requests by state.", labels=["state"])
        for state, n in info.requests_by_state.items():
            g.add_metric([state], n)
        yield g
        att = core.slo_attainment()
        yield GaugeMetricFamily("ditplan_slo_attainment",
                                "Requests that met their deadline / requests decided so far.",
                                value=float("nan") if att is None else att)
        buckets, acc = [], 0
        for bound, n in zip(list(SOLVER_BUCKETS_MS) + [float("inf")], stats.solver_bucket_counts):
            acc += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound / 1e3), acc))
        yield HistogramMetricFamily("ditplan_solver_seconds", "Wall time of each planning call.",
                                    buckets=buckets, sum_value=stats.solver_ms_sum / 1e3)
        for name, doc, value in (
                ("ditplan_plans", "Planning calls.", stats.plans),
                ("ditplan_plan_fallbacks", "Plans from the fallback (solver timeout, error or illegal plan).",
                 stats.fallbacks),
                ("ditplan_plan_violations", "Plans the independent checker rejected.", stats.plan_violations),
                ("ditplan_preemptions", "Requests paused at a step boundary and not continued.", stats.preemptions),
                ("ditplan_submitted", "Requests admitted.", stats.submitted),
                ("ditplan_executors_lost", "Executors declared lost.", stats.executors_lost),
                ("ditplan_requeued", "Requests requeued after an executor loss.", stats.requeued),
                ("ditplan_weight_loads", "Weight loads dispatched to executors.", stats.weight_loads),
                ("ditplan_weight_load_seconds", "Predicted seconds of the weight loads dispatched.",
                 stats.weight_load_s),
                ("ditplan_weight_load_failures", "Weight loads an executor reported failed.",
                 stats.weight_load_failures),
                ("ditplan_rejected", "Requests the planner rejected (they could not meet their deadline).",
                 stats.rejected)):
            yield CounterMetricFamily(name, doc, value=value)
        refused = CounterMetricFamily("ditplan_refused", "Requests refused, by status code.", labels=["code"])
        for code, n in sorted(stats.refused.items()):
            refused.add_metric([code], n)
        yield refused
        yield GaugeMetricFamily("ditplan_executors", "Connected executors.", value=len(info.executors))
        yield GaugeMetricFamily("ditplan_plan_epoch", "Current plan epoch.", value=info.plan_epoch)
        yield from _step_estimates(info.step_estimates)


def _step_estimates(estimates):
    from prometheus_client.core import GaugeMetricFamily

    families = (("ditplan_step_time_estimate_seconds", "Refined step time (on the block last reported).",
                 lambda e: e.seconds),
                ("ditplan_step_time_prior_seconds", "Profile / roofline step time it refines.", lambda e: e.prior_s),
                ("ditplan_step_time_reports", "Reports the estimate is from.", lambda e: e.reports),
                ("ditplan_step_time_estimate_in_use", "1 once plans use the estimate (enough reports), else 0.",
                 lambda e: int(e.in_use)))
    for name, doc, value in families:
        g = GaugeMetricFamily(name, doc, labels=["model", "shape", "sp", "batch"])
        for e in estimates:
            g.add_metric([e.key.model, str(e.key.shape), str(e.key.sp), str(e.key.batch)], value(e))
        yield g


def start_metrics_server(core: PlannerCore, port: int, host: str = "127.0.0.1"):
    """Serve ``/metrics`` on ``host:port``; returns (http server, bound port)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoreCollector(core))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
