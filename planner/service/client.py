"""A small Python client of the planning service.

    with PlannerClient("127.0.0.1:50051") as c:
        results = c.submit([RequestSpec("r1", "flux-dev", 1024, 1024, 1, 28, slo_scale=2.0)])
        print(c.get("r1").state)

Every call has a deadline (``timeout``, seconds). Server refusals raise
:class:`PlannerError` with the status code and the server's message.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc

from ditplan.planner.service import convert
from ditplan.planner.service.admission import RequestSpec
from ditplan.planner.service.auth import bearer
from ditplan.planner.service.gen import planner_pb2 as pb
from ditplan.planner.service.gen import planner_pb2_grpc as pb_grpc
from ditplan.planner.service.messages import (PlanDelta, RequestView, ServerInfoView, StepReport, SubmitOutcome,
                                              TimelineView)
from ditplan.planner.service.stateless import PlanIn, PlanOut
from ditplan.planner.traces import TraceRecord

DEFAULT_ADDRESS = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class PlannerError(Exception):
    """A call the server refused (or could not be made)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def _err(exc: grpc.RpcError) -> PlannerError:
    return PlannerError(exc.code(), exc.details() or "")


class PlannerClient:
    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None,
                 tls_ca: str | bytes | None = None, tls: bool = False, server_name: str | None = None,
                 timeout: float = 30.0) -> None:
        """``tls_ca``: a PEM file or bytes of the CA to trust (implies TLS); ``tls``: TLS with system roots."""
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls_ca is not None or tls:
            roots = Path(tls_ca).read_bytes() if isinstance(tls_ca, (str, Path)) else tls_ca
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots),
                                               options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.PlannerStub(self.channel)
        self.address, self.timeout = address, timeout
        self._metadata = bearer(token) if token else None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PlannerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _err(exc) from None

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (or raise PlannerError UNAVAILABLE)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise PlannerError(grpc.StatusCode.UNAVAILABLE, f"cannot reach {self.address} within {timeout:g} s") from None

    # --- admission and status ---------------------------------------------
    def submit(self, specs: Sequence[RequestSpec], allow_partial: bool = False,
               timeout: float | None = None) -> list[SubmitOutcome]:
        req = pb.SubmitRequest(requests=[convert.spec_to_pb(s) for s in specs], allow_partial=allow_partial)
        return [convert.outcome_from_pb(r) for r in self._call(self.stub.Submit, req, timeout).results]

    def cancel(self, rid: str) -> RequestView:
        return convert.view_from_pb(self._call(self.stub.Cancel, pb.CancelRequest(id=rid)).request)

    def get(self, rid: str) -> RequestView:
        return convert.view_from_pb(self._call(self.stub.GetRequest, pb.GetRequestRequest(id=rid)))

    def list(self, states: Iterable[str] = (), page_size: int = 0) -> list[RequestView]:
        """Every request (optionally only those in ``states``), all pages."""
        wanted = [convert.STATE_TO_PB[s] for s in states]
        out, token = [], ""
        while True:
            reply = self._call(self.stub.ListRequests, pb.ListRequestsRequest(states=wanted, page_size=page_size,
                                                                               page_token=token))
            out.extend(convert.view_from_pb(m) for m in reply.requests)
            token = reply.next_page_token
            if not token:
                return out

    def info(self) -> ServerInfoView:
        return convert.info_from_pb(self._call(self.stub.GetServerInfo, pb.GetServerInfoRequest()))

    def timeline(self, start: int = 0, page_size: int = 0) -> TimelineView:
        """One page of the measured timeline, from segment index ``start``."""
        return convert.timeline_from_pb(self._call(self.stub.GetTimeline,
                                                   pb.GetTimelineRequest(start=start, page_size=page_size)))

    def timeline_all(self) -> TimelineView:
        """Every kept segment (all pages), with the counters of the last page."""
        segments: list = []
        view = self.timeline(0)
        while True:
            segments.extend(view.segments)
            if view.next >= view.total or not view.segments:
                return replace(view, segments=tuple(segments))
            view = self.timeline(view.next)

    def health(self, service: str = "") -> str:
        """The health service's status name for ``service`` ("" = the server)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _err(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # --- stateless ----------------------------------------------------------
    def plan(self, request: PlanIn, timeout: float | None = None) -> PlanOut:
        """One stateless planning round for the full state in ``request``."""
        return convert.plan_out_from_pb(self._call(self.stub.Plan, convert.plan_in_to_pb(request), timeout))

    def whatif(self, records: Sequence[TraceRecord], cluster: str = "", policies: Sequence[str] = (),
               slo_scale: float = 1.5, seed: int = 0, noise: float = 0.0, round_s: float = 2.0,
               timeout: float | None = None) -> dict[str, dict]:
        """What-if metrics per policy (the same JSON as ``ditplan whatif --json``)."""
        req = pb.WhatIfRequest(records=[record_to_pb(r) for r in records], cluster=cluster, policies=list(policies),
                               slo_scale=slo_scale, seed=seed, noise=noise, round_s=round_s)
        return json.loads(self._call(self.stub.WhatIf, req, timeout).metrics_json)

    # --- executors ----------------------------------------------------------
    def stream_plans(self, executor_id: str, gpus: Sequence[int], session_secret: str = "") -> "PlanStream":
        """Subscribe as an executor; iterate the returned stream for PlanDelta updates, ``cancel()`` to leave.
        ``session_secret``: a live session's, to replace it (the first update carries a new one)."""
        call = self.stub.StreamPlans(pb.StreamPlansRequest(executor_id=executor_id, gpus=list(gpus),
                                                           session_secret=session_secret),
                                     metadata=self._metadata)
        return PlanStream(call)

    def report_progress(self, reports: Iterable[StepReport], timeout: float | None = None) -> int:
        """Send step reports (a client stream); the number the server applied."""
        msgs = (convert.report_to_pb(r) for r in reports)
        return self._call(self.stub.ReportProgress, msgs, timeout).reports


class PlanStream:
    """The server stream of plan updates for one executor."""

    def __init__(self, call) -> None:
        self.call = call

    def __iter__(self) -> Iterator[PlanDelta]:
        try:
            for m in self.call:
                yield convert.delta_from_pb(m)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.CANCELLED and not self.call.is_active():
                return
            raise _err(exc) from None

    def cancel(self) -> None:
        self.call.cancel()


def record_to_pb(r: TraceRecord) -> pb.TraceRecord:
    m = pb.TraceRecord(id=r.id, arrival=r.arrival, model=r.model, height=r.height, width=r.width, frames=r.frames,
                       steps=r.steps)
    if r.deadline is not None:
        m.deadline = r.deadline
    if r.slo_scale is not None:
        m.slo_scale = r.slo_scale
    return m


def spec_from_record(r: TraceRecord, slo_scale: float | None = None) -> RequestSpec:
    """The Submit spec of a trace record arriving now: its deadline shifted with it (the trace contract, docs/architecture.md)."""
    deadline_in = r.deadline - r.arrival if r.deadline is not None else None
    scale = r.slo_scale if r.slo_scale is not None else (None if deadline_in is not None else slo_scale)
    return RequestSpec(id=r.id, model=r.model, height=r.height, width=r.width, frames=r.frames, steps=r.steps,
                       deadline_in_s=deadline_in, slo_scale=scale)
