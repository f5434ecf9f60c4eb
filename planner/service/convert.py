"""Protobuf messages <-> the service's dataclasses."""
from __future__ import annotations

import json
import math

from ditplan.models.catalog import Shape
from ditplan.models.refine import StepEstimate, StepKey
from ditplan.planner.placement import WeightLoad
from ditplan.planner.plan import Assignment, RoundPlan, WireStats
from ditplan.planner.request import Stage
from ditplan.planner.service.admission import RequestSpec
from ditplan.planner.service.errors import InvalidArgument
from ditplan.planner.service.gen import planner_pb2 as pb
from ditplan.planner.execution import Segment
from ditplan.planner.service.messages import (AssignmentMsg, ExecutorView, LoadMsg, MigrationMsg, PauseMsg, PlanDelta,
                                      RequestData, RequestView, ServerInfoView, StepReport, SubmitOutcome,
                                      TimelineView)
from ditplan.planner.service.stateless import PlanIn, PlanOut, ProgressIn

STAGE_TO_PB = {Stage.ENCODE: pb.STAGE_ENCODE, Stage.DIFFUSE: pb.STAGE_DIFFUSE, Stage.DECODE: pb.STAGE_DECODE}
PB_TO_STAGE = {v: k for k, v in STAGE_TO_PB.items()}
STATE_TO_PB = {
    "queued": pb.REQUEST_STATE_QUEUED, "running": pb.REQUEST_STATE_RUNNING, "paused": pb.REQUEST_STATE_PAUSED,
    "decoding": pb.REQUEST_STATE_DECODING, "done": pb.REQUEST_STATE_DONE, "failed": pb.REQUEST_STATE_FAILED,
    "cancelled": pb.REQUEST_STATE_CANCELLED, "rejected": pb.REQUEST_STATE_REJECTED,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}


def state_name(value: int) -> str:
    """'queued', ... for a RequestState enum value; the raw number for unknown ones."""
    return PB_TO_STATE.get(value, str(value))


# --- admission ------------------------------------------------------------
def spec_from_pb(m: pb.RequestSpec) -> RequestSpec:
    which = m.WhichOneof("deadline_spec")
    return RequestSpec(id=m.id, model=m.model, height=m.height, width=m.width, frames=m.frames, steps=m.steps,
                       deadline=m.deadline if which == "deadline" else None,
                       deadline_in_s=m.deadline_in_s if which == "deadline_in_s" else None,
                       slo_scale=m.slo_scale if which == "slo_scale" else None)


def spec_to_pb(s: RequestSpec) -> pb.RequestSpec:
    m = pb.RequestSpec(id=s.id, model=s.model, height=s.height, width=s.width, frames=s.frames, steps=s.steps)
    if s.deadline is not None:
        m.deadline = s.deadline
    elif s.deadline_in_s is not None:
        m.deadline_in_s = s.deadline_in_s
    elif s.slo_scale is not None:
        m.slo_scale = s.slo_scale
    return m


def outcome_to_pb(o: SubmitOutcome) -> pb.SubmitResult:
    return pb.SubmitResult(id=o.id, accepted=o.accepted, arrival=o.arrival, deadline=o.deadline,
                           predicted_finish=o.predicted_finish, error_code=o.error_code, error=o.error)


def outcome_from_pb(m: pb.SubmitResult) -> SubmitOutcome:
    return SubmitOutcome(m.id, m.accepted, m.arrival, m.deadline, m.predicted_finish, m.error_code, m.error)


# --- status ---------------------------------------------------------------
def view_to_pb(v: RequestView) -> pb.RequestInfo:
    m = pb.RequestInfo(id=v.id, model=v.model, height=v.height, width=v.width, frames=v.frames, steps=v.steps,
                       state=STATE_TO_PB[v.state], steps_done=v.steps_done, encoded=v.encoded, arrival=v.arrival,
                       deadline=v.deadline, sp=v.sp, gpus=list(v.gpus), preemptions=v.preemptions,
                       sp_changes=v.sp_changes, migrations=v.migrations, plan_epoch=v.plan_epoch)
    if v.predicted_finish is not None and math.isfinite(v.predicted_finish):
        m.predicted_finish = v.predicted_finish
    if v.finish is not None:
        m.finish = v.finish
    if v.measured_step_s is not None:
        m.measured_step_s = v.measured_step_s
    if v.reason:
        m.reason = v.reason
    if v.measured_encode_s is not None:
        m.measured_encode_s = v.measured_encode_s
    if v.measured_decode_s is not None:
        m.measured_decode_s = v.measured_decode_s
    return m


def view_from_pb(m: pb.RequestInfo) -> RequestView:
    return RequestView(
        id=m.id, model=m.model, height=m.height, width=m.width, frames=m.frames, steps=m.steps,
        state=state_name(m.state), steps_done=m.steps_done, encoded=m.encoded, arrival=m.arrival,
        deadline=m.deadline,
        predicted_finish=m.predicted_finish if m.HasField("predicted_finish") else None,
        finish=m.finish if m.HasField("finish") else None, sp=m.sp, gpus=tuple(m.gpus),
        preemptions=m.preemptions, sp_changes=m.sp_changes, migrations=m.migrations,
        measured_step_s=m.measured_step_s if m.HasField("measured_step_s") else None, plan_epoch=m.plan_epoch,
        reason=m.reason or None,
        measured_encode_s=m.measured_encode_s if m.HasField("measured_encode_s") else None,
        measured_decode_s=m.measured_decode_s if m.HasField("measured_decode_s") else None)


def info_to_pb(i: ServerInfoView) -> pb.ServerInfo:
    return pb.ServerInfo(
        now=i.now, speed=i.speed, simulate=i.simulate, cluster=i.cluster, gpus=i.gpus, policy=i.policy,
        plan_epoch=i.plan_epoch, version=i.version, slo_scale=i.slo_scale, max_queue=i.max_queue,
        executors=[pb.ExecutorInfo(executor_id=e.executor_id, gpus=list(e.gpus), last_seen=e.last_seen)
                   for e in i.executors],
        requests_by_state=i.requests_by_state, weight_loads=i.weight_loads,
        placement=[pb.GpuWeights(weights=list(ws)) for ws in i.placement],
        step_estimates=[estimate_to_pb(e) for e in i.step_estimates])


def info_from_pb(m: pb.ServerInfo) -> ServerInfoView:
    return ServerInfoView(
        now=m.now, speed=m.speed, simulate=m.simulate, cluster=m.cluster, gpus=m.gpus, policy=m.policy,
        plan_epoch=m.plan_epoch,
        executors=tuple(ExecutorView(e.executor_id, tuple(e.gpus), e.last_seen) for e in m.executors),
        requests_by_state=dict(m.requests_by_state), version=m.version, slo_scale=m.slo_scale,
        max_queue=m.max_queue, placement=tuple(tuple(g.weights) for g in m.placement),
        weight_loads=m.weight_loads, step_estimates=tuple(estimate_from_pb(e) for e in m.step_estimates))


def estimate_to_pb(e: StepEstimate) -> pb.StepEstimate:
    k = e.key
    return pb.StepEstimate(model=k.model, height=k.shape.height, width=k.shape.width, frames=k.shape.frames,
                           sp=k.sp, batch=k.batch, seconds=e.seconds, prior_seconds=e.prior_s, factor=e.factor,
                           reports=e.reports, in_use=e.in_use)


def estimate_from_pb(m: pb.StepEstimate) -> StepEstimate:
    return StepEstimate(StepKey(m.model, Shape(m.height, m.width, m.frames), m.sp, m.batch), m.seconds,
                        m.prior_seconds, m.factor, m.reports, m.in_use)


# --- measured timeline ----------------------------------------------------
def timeline_to_pb(t: TimelineView) -> pb.TimelineReply:
    return pb.TimelineReply(
        segments=[pb.TimelineSegment(request_ids=list(g.request_ids), stage=STAGE_TO_PB[g.stage], gpus=list(g.gpus),
                                     steps=g.steps, start=g.start, end=g.end) for g in t.segments],
        next=t.next, total=t.total, dropped=t.dropped, plans=t.plans, fallbacks=t.fallbacks,
        solver_ms=_pct(t.solver_ms), server_time=t.server_time)


def timeline_from_pb(m: pb.TimelineReply) -> TimelineView:
    ms = {k: getattr(m.solver_ms, k) if m.solver_ms.HasField(k) else None for k in ("p50", "p99", "max")}
    return TimelineView(tuple(Segment(tuple(g.request_ids), PB_TO_STAGE[g.stage], tuple(g.gpus), g.steps, g.start, g.end)
                              for g in m.segments), m.next, m.total, m.dropped, m.plans, m.fallbacks, ms,
                        m.server_time)


# --- executors ------------------------------------------------------------
def weight_to_pb(w: WeightLoad) -> pb.Weight:
    return pb.Weight(gpu=w.gpu, model=w.model, component=w.component)


def weight_from_pb(m: pb.Weight) -> WeightLoad:
    return WeightLoad(m.gpu, m.model, m.component)


def delta_to_pb(d: PlanDelta) -> pb.PlanUpdate:
    return pb.PlanUpdate(
        plan_epoch=d.plan_epoch, server_time=d.server_time,
        requests=[pb.RequestData(id=r.id, model=r.model, height=r.height, width=r.width, frames=r.frames,
                                 steps=r.steps, deadline=r.deadline, steps_done=r.steps_done, encoded=r.encoded)
                  for r in d.requests],
        assignments=[pb.Assignment(request_ids=list(a.request_ids), stage=STAGE_TO_PB[a.stage], gpus=list(a.gpus),
                                   steps=a.steps, start_step=a.start_step, predicted_s=a.predicted_s,
                                   predicted_step_s=a.predicted_step_s, predicted_move_s=a.predicted_move_s,
                                   lead=a.lead)
                     for a in d.assignments],
        pauses=[pb.Pause(request_id=p.request_id, gpus=list(p.gpus)) for p in d.pauses],
        migrations=[pb.Migration(request_id=m.request_id, from_gpus=list(m.from_gpus), to_gpus=list(m.to_gpus))
                    for m in d.migrations],
        released=list(d.released), unloads=[weight_to_pb(w) for w in d.unloads],
        loads=[pb.WeightLoad(weight=weight_to_pb(x.weight), predicted_s=x.predicted_s, initial=x.initial)
               for x in d.loads], session_secret=d.session_secret)


def delta_from_pb(m: pb.PlanUpdate) -> PlanDelta:
    return PlanDelta(
        plan_epoch=m.plan_epoch, server_time=m.server_time,
        requests=[RequestData(r.id, r.model, r.height, r.width, r.frames, r.steps, r.deadline, r.steps_done,
                              r.encoded) for r in m.requests],
        assignments=[AssignmentMsg(tuple(a.request_ids), PB_TO_STAGE[a.stage], tuple(a.gpus), a.steps,
                                   a.start_step, a.predicted_s, a.predicted_step_s, a.predicted_move_s, a.lead)
                     for a in m.assignments],
        pauses=[PauseMsg(p.request_id, tuple(p.gpus)) for p in m.pauses],
        migrations=[MigrationMsg(x.request_id, tuple(x.from_gpus), tuple(x.to_gpus)) for x in m.migrations],
        released=list(m.released), unloads=[weight_from_pb(w) for w in m.unloads],
        loads=[LoadMsg(weight_from_pb(x.weight), x.predicted_s, x.initial) for x in m.loads],
        session_secret=m.session_secret)


def report_from_pb(m: pb.StepReport) -> StepReport:
    if m.stage != pb.STAGE_UNSPECIFIED and m.stage not in PB_TO_STAGE:
        raise InvalidArgument(f"field 'stage' = {m.stage} is unknown; known: 1 (encode), 2 (diffuse), 3 (decode)")
    return StepReport(executor_id=m.executor_id, plan_epoch=m.plan_epoch, request_ids=tuple(m.request_ids),
                      stage=PB_TO_STAGE.get(m.stage), steps=m.steps, step_seconds=tuple(m.step_seconds),
                      done=m.done, loaded=tuple(weight_from_pb(w) for w in m.loaded),
                      load_failed=tuple(weight_from_pb(w) for w in m.load_failed),
                      session_secret=m.session_secret, stage_seconds=m.stage_seconds)


def report_to_pb(r: StepReport) -> pb.StepReport:
    return pb.StepReport(executor_id=r.executor_id, plan_epoch=r.plan_epoch, request_ids=list(r.request_ids),
                         stage=STAGE_TO_PB.get(r.stage, pb.STAGE_UNSPECIFIED), steps=r.steps,
                         step_seconds=list(r.step_seconds), done=r.done,
                         loaded=[weight_to_pb(w) for w in r.loaded],
                         load_failed=[weight_to_pb(w) for w in r.load_failed],
                         session_secret=r.session_secret, stage_seconds=r.stage_seconds)


# --- plans and what-if ----------------------------------------------------
def plan_in_to_pb(p: PlanIn) -> pb.PlanRequest:
    return pb.PlanRequest(
        now=p.now, cluster=p.cluster, gpu_kind=p.gpu_kind, policy=p.policy, round_s=p.round_s,
        requests=[pb.RequestProgress(id=r.id, model=r.model, height=r.height, width=r.width, frames=r.frames,
                                     steps=r.steps, arrival=r.arrival, deadline=r.deadline,
                                     state=STATE_TO_PB.get(r.state, pb.REQUEST_STATE_UNSPECIFIED),
                                     encoded=r.encoded, steps_done=r.steps_done, latent_gpus=list(r.latent_gpus),
                                     sp=r.sp) for r in p.requests],
        gpu_free_at=list(p.gpu_free_at), just_paused=list(p.just_paused), served_models=list(p.served_models),
        placement=[pb.GpuWeights(weights=list(ws)) for ws in p.placement])


def plan_in_from_pb(m: pb.PlanRequest, default_cluster: str = "", default_policy: str = "") -> PlanIn:
    reqs = [ProgressIn(id=r.id, model=r.model, height=r.height, width=r.width, frames=r.frames, steps=r.steps,
                       arrival=r.arrival, deadline=r.deadline,
                       state=None if r.state == pb.REQUEST_STATE_UNSPECIFIED else state_name(r.state),
                       encoded=r.encoded, steps_done=r.steps_done, latent_gpus=tuple(r.latent_gpus), sp=r.sp)
            for r in m.requests]
    return PlanIn(now=m.now, cluster=m.cluster or default_cluster, gpu_kind=m.gpu_kind,
                  policy=m.policy or default_policy, round_s=m.round_s, requests=reqs,
                  gpu_free_at=list(m.gpu_free_at), just_paused=list(m.just_paused),
                  served_models=list(m.served_models), placement=[list(g.weights) for g in m.placement])


def plan_out_to_pb(out: PlanOut) -> pb.PlanReply:
    return pb.PlanReply(plan=plan_to_pb(out.plan), problems=out.problems, solver_ms=out.solver_ms)


def plan_out_from_pb(m: pb.PlanReply) -> PlanOut:
    return PlanOut(plan_from_pb(m.plan), list(m.problems), m.solver_ms)


def plan_to_pb(plan: RoundPlan) -> pb.RoundPlan:
    m = pb.RoundPlan(
        assignments=[pb.Assignment(request_ids=list(a.request_ids), stage=STAGE_TO_PB[a.stage], gpus=list(a.gpus),
                                   steps=a.steps) for a in plan.assignments],
        solver=plan.solver, fallback=plan.fallback, stats_json=json.dumps(plan.stats.to_dict(), default=str, sort_keys=True),
        unloads=[weight_to_pb(w) for w in plan.unloads], loads=[weight_to_pb(w) for w in plan.loads])
    if plan.wake_at is not None:
        m.wake_at = plan.wake_at
    return m


def plan_from_pb(m: pb.RoundPlan) -> RoundPlan:
    return RoundPlan(
        assignments=tuple(Assignment(tuple(a.request_ids), PB_TO_STAGE[a.stage], tuple(a.gpus), a.steps)
                          for a in m.assignments),
        wake_at=m.wake_at if m.HasField("wake_at") else None, solver=m.solver, fallback=m.fallback,
        stats=WireStats(fields=json.loads(m.stats_json) if m.stats_json else {}),
        unloads=tuple(weight_from_pb(w) for w in m.unloads), loads=tuple(weight_from_pb(w) for w in m.loads))


def _pct(d: dict) -> pb.Percentiles:
    m = pb.Percentiles()
    for key in ("p50", "p95", "p99", "mean", "max"):
        if d.get(key) is not None:
            setattr(m, key, d[key])
    return m


def metrics_to_pb(s: dict) -> pb.PolicyMetrics:
    m = pb.PolicyMetrics(latency_s=_pct(s["latency_s"]), gpu_seconds=s["gpu_seconds"] or 0.0,
                         preemptions=s["preemptions"], sp_changes=s["sp_changes"], migrations=s["migrations"],
                         requests=s["requests"], finished=s["finished"], solver_ms=_pct(s["solver_ms"]),
                         plans=s["plans"], fallbacks=s["fallbacks"], makespan_s=s["makespan_s"] or 0.0)
    if s["slo_attainment"] is not None:
        m.slo_attainment = s["slo_attainment"]
    for kind in ("image", "video"):
        if s["slo_attainment_by_kind"].get(kind) is not None:
            setattr(m, f"slo_attainment_{kind}", s["slo_attainment_by_kind"][kind])
    return m
