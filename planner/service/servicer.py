"""gRPC servicer: protobuf in, the core's dataclasses through, status codes out.

Every handler maps ``ServiceError`` subclasses to their status code with the
error's message (naming the field and value); anything unexpected becomes
INTERNAL and is logged, and the server keeps serving.
"""
from __future__ import annotations

import functools
import logging

import grpc

from ditplan.planner.service import convert
from ditplan.planner.service.core import PlannerCore
from ditplan.planner.service.errors import ServiceError, safe_message
from ditplan.planner.service.gen import planner_pb2 as pb
from ditplan.planner.service.gen import planner_pb2_grpc as pb_grpc
from ditplan.planner.service.journal import JournalError
from ditplan.planner.service.stateless import WhatIfIn, metrics_json, plan_round, whatif

log = logging.getLogger(__name__)

STREAM_POLL_S = 0.25  # how often an idle plan stream checks that its client is still there


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, JournalError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    log.exception("unexpected error in handler")
    return grpc.StatusCode.INTERNAL, safe_message(f"internal error: {type(exc).__name__}: {exc}")


def unary(fn):
    """Map exceptions of a unary handler to status codes."""
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error gets a status code
            code, message = _status_of(exc)
        context.abort(code, message)
    return wrapper


class PlannerServicer(pb_grpc.PlannerServicer):
    def __init__(self, core: PlannerCore, default_policy: str, cluster_spec: str) -> None:
        self.core = core
        self.default_policy = default_policy
        self.cluster_spec = cluster_spec

    # --- admission and status ---------------------------------------------
    @unary
    def Submit(self, request: pb.SubmitRequest, context) -> pb.SubmitReply:
        specs = [convert.spec_from_pb(m) for m in request.requests]
        outcomes = self.core.submit(specs, allow_partial=request.allow_partial)
        return pb.SubmitReply(results=[convert.outcome_to_pb(o) for o in outcomes],
                              server_time=self.core.clock.now())

    @unary
    def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelReply:
        return pb.CancelReply(request=convert.view_to_pb(self.core.cancel(request.id)))

    @unary
    def GetRequest(self, request: pb.GetRequestRequest, context) -> pb.RequestInfo:
        return convert.view_to_pb(self.core.get(request.id))

    @unary
    def ListRequests(self, request: pb.ListRequestsRequest, context) -> pb.ListRequestsReply:
        states = [convert.state_name(s) for s in request.states]
        views, token = self.core.list(states, request.page_size, request.page_token)
        return pb.ListRequestsReply(requests=[convert.view_to_pb(v) for v in views], next_page_token=token,
                                    server_time=self.core.clock.now())

    @unary
    def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        return convert.info_to_pb(self.core.info())

    @unary
    def GetTimeline(self, request: pb.GetTimelineRequest, context) -> pb.TimelineReply:
        return convert.timeline_to_pb(self.core.timeline(request.start, request.page_size))

    # --- executors ----------------------------------------------------------
    def StreamPlans(self, request: pb.StreamPlansRequest, context):
        try:
            sess = self.core.connect_executor(request.executor_id, list(request.gpus),
                                              secret=request.session_secret)
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status_of(exc))
        context.add_callback(lambda: self.core.disconnect_executor(sess, "plan stream closed"))
        while True:
            delta = sess.next(STREAM_POLL_S)
            if delta is not None:
                yield convert.delta_to_pb(delta)
                continue
            if sess.closed:
                if sess.close_reason == "server shutting down":
                    context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down")
                context.abort(grpc.StatusCode.ABORTED,
                              f"executor {sess.id!r} lost: {sess.close_reason}; its work was requeued, reconnect")
            if not context.is_active():
                return

    def ReportProgress(self, request_iterator, context) -> pb.ReportProgressReply:
        n = 0
        try:
            for msg in request_iterator:
                self.core.report(convert.report_from_pb(msg), wait=True)
                n += 1
        except Exception as exc:  # noqa: BLE001
            code, message = _status_of(exc)
            context.abort(code, f"report {n}: {message}")
        return pb.ReportProgressReply(reports=n, plan_epoch=self.core.epoch)

    # --- stateless ----------------------------------------------------------
    @unary
    def Plan(self, request: pb.PlanRequest, context) -> pb.PlanReply:
        return convert.plan_out_to_pb(plan_round(convert.plan_in_from_pb(request, self.cluster_spec,
                                                                         self.default_policy)))

    @unary
    def WhatIf(self, request: pb.WhatIfRequest, context) -> pb.WhatIfReply:
        records = []
        for r in request.records:
            d = {"id": r.id, "arrival": r.arrival, "model": r.model, "height": r.height, "width": r.width,
                 "frames": r.frames, "steps": r.steps}
            if r.HasField("deadline"):
                d["deadline"] = r.deadline
            if r.HasField("slo_scale"):
                d["slo_scale"] = r.slo_scale
            records.append(d)

        def should_stop() -> str | None:
            if not context.is_active():
                return "cancelled"
            left = context.time_remaining()
            return "deadline" if left is not None and left <= 0 else None

        summaries = whatif(WhatIfIn(records=records, cluster=request.cluster or self.cluster_spec,
                                    policies=list(request.policies) or [self.default_policy],
                                    slo_scale=request.slo_scale or 1.5, seed=request.seed, noise=request.noise,
                                    round_s=request.round_s or 2.0), should_stop)
        return pb.WhatIfReply(metrics={k: convert.metrics_to_pb(v) for k, v in summaries.items()},
                              metrics_json=metrics_json(summaries))
