"""The service core in-process: submit -> plan_once -> report on a ManualClock, no gRPC, no threads.

A real SQLite journal and real policies; the executor's side is played by
draining its session's plan updates and calling ``report``.
"""
from __future__ import annotations

import pytest

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.request import Stage
from ditplan.planner.service.admission import RequestSpec
from ditplan.planner.service.clock import ManualClock
from ditplan.planner.service.core import CoreConfig, PlannerCore
from ditplan.planner.service.errors import FailedPrecondition, InvalidArgument
from ditplan.planner.service.journal import Journal
from ditplan.planner.service.messages import PlanDelta, StepReport


@pytest.fixture
def make_core(tmp_path):
    made = []

    def make(policy: str = "edf", cluster: str = "8xH100", state: str = "state", **kw) -> PlannerCore:
        c = parse_cluster(cluster)
        journal, recovered = Journal.open(tmp_path / state)
        core = PlannerCore(CoreConfig(cluster=c, cost=CostModel(c.kind), policy=policy, **kw), journal, recovered,
                           ManualClock())
        made.append((core, journal))
        return core

    yield make
    for core, journal in made:
        core.stop()
        journal.close()


def drain(sess) -> list[PlanDelta]:
    out = []
    while (d := sess.next(0)) is not None:
        out.append(d)
    return out


def assignments(sess):
    return [(d.plan_epoch, a) for d in drain(sess) for a in d.assignments]


def flux(rid: str, side: int = 1024) -> RequestSpec:
    return RequestSpec(rid, "flux-dev", side, side, 1, 28, slo_scale=3.0)


def run_to_done(core: PlannerCore, sess, rid: str) -> list:
    """Play a perfect executor: every assignment takes exactly its predicted time and reports done."""
    stages = []
    for _ in range(20):
        if core.get(rid).state == "done":
            return stages
        core.plan_once()
        for epoch, a in assignments(sess):
            core.clock.advance(a.predicted_s)
            core.report(StepReport(sess.id, epoch, a.request_ids, a.stage, a.steps if a.stage is Stage.DIFFUSE else 0,
                                   done=True, session_secret=sess.secret), wait=True)
            stages.append((a.stage, a.steps, a.start_step))
    raise AssertionError(f"{rid} did not finish: {core.get(rid)}")


def test_a_request_runs_encode_diffuse_decode_in_process_and_finishes_when_reported(make_core):
    core = make_core()
    sess = core.connect_executor("ex", range(8), heartbeats=False)
    assert drain(sess)[0].session_secret == sess.secret
    [ack] = core.submit([flux("a")])
    assert ack.accepted and ack.predicted_finish > 0
    stages = run_to_done(core, sess, "a")
    assert [s for s, _, _ in stages] == [Stage.ENCODE, Stage.DIFFUSE, Stage.DECODE]
    assert stages[1][1:] == (28, 0)  # every step in one segment, from step 0
    view = core.get("a")
    assert view.steps_done == 28 and view.encoded
    assert view.finish == pytest.approx(core.clock.now())
    assert view.finish <= view.deadline
    assert core.stats.done_met == 1 and core.stats.done_missed == 0
    assert core.plan_once() is None  # nothing live: nothing to plan


def test_a_lost_executor_requeues_from_the_last_reported_step_and_a_new_one_resumes_there(make_core):
    core = make_core()
    sess = core.connect_executor("ex", range(8), heartbeats=False)
    core.submit([flux("a")])
    core.plan_once()
    [(epoch, enc)] = assignments(sess)
    core.clock.advance(enc.predicted_s)
    core.report(StepReport("ex", epoch, ("a",), Stage.ENCODE, done=True, session_secret=sess.secret), wait=True)
    core.plan_once()
    [(epoch, dif)] = assignments(sess)
    assert dif.stage is Stage.DIFFUSE and dif.start_step == 0
    core.clock.advance(10 * dif.predicted_step_s)
    core.report(StepReport("ex", epoch, ("a",), Stage.DIFFUSE, 10, session_secret=sess.secret), wait=True)
    core.disconnect_executor(sess, "test: killed")
    assert sess.closed
    view = core.get("a")
    assert (view.state, view.steps_done, view.gpus) == ("paused", 10, ())
    assert core.stats.executors_lost == 1 and core.stats.requeued == 1
    with pytest.raises(FailedPrecondition, match="not connected"):
        core.report(StepReport("ex", epoch, ("a",), Stage.DIFFUSE, 1, session_secret=sess.secret))
    assert core.plan_once() is None  # no GPU is owned: nothing can start
    again = core.connect_executor("ex2", range(8), heartbeats=False)
    drain(again)
    stages = run_to_done(core, again, "a")
    assert stages[0][0] is Stage.DIFFUSE and stages[0][1:] == (18, 10)  # resumed at step 10, not from 0
    assert core.get("a").state == "done"


def test_a_report_of_a_stale_epoch_is_refused_and_changes_nothing(make_core):
    core = make_core()
    sess = core.connect_executor("ex", range(8), heartbeats=False)
    core.submit([flux("a")])
    core.plan_once()
    [(epoch, _)] = assignments(sess)
    with pytest.raises(FailedPrecondition, match="stale plan epoch"):
        core.report(StepReport("ex", epoch - 1, ("a",), Stage.ENCODE, done=True, session_secret=sess.secret))
    assert not core.get("a").encoded


def test_encode_and_decode_reports_carry_their_measured_seconds(make_core):
    core = make_core()
    sess = core.connect_executor("ex", range(8), heartbeats=False)
    core.submit([flux("a")])
    seen = []
    for _ in range(5):
        core.plan_once()
        for epoch, a in assignments(sess):
            seen.append(a.stage)
            core.clock.advance(a.predicted_s)
            rep = dict(executor_id="ex", plan_epoch=epoch, request_ids=a.request_ids, stage=a.stage, done=True,
                       session_secret=sess.secret)
            if a.stage is Stage.DIFFUSE:
                with pytest.raises(InvalidArgument, match="field 'stage_seconds' = 0.5 on a diffuse report"):
                    core.report(StepReport(**rep, steps=a.steps, stage_seconds=0.5))
                core.report(StepReport(**rep, steps=a.steps), wait=True)
            else:
                with pytest.raises(InvalidArgument, match="field 'stage_seconds' = nan: must be finite"):
                    core.report(StepReport(**rep, stage_seconds=float("nan")))
                core.report(StepReport(**rep, stage_seconds=0.25 if a.stage is Stage.ENCODE else 0.75), wait=True)
        if core.get("a").state == "done":
            break
    view = core.get("a")
    assert seen == [Stage.ENCODE, Stage.DIFFUSE, Stage.DECODE] and view.state == "done"
    assert (view.measured_encode_s, view.measured_decode_s) == (0.25, 0.75)


def test_the_plan_window_shows_started_work_and_the_earliest_queued_deadlines(make_core):
    # fcfs serves in arrival order (r0 first) when it sees every request.
    for window, first in ((0, "r0"), (2, "r3")):
        core = make_core("fcfs-sp1", plan_window=window, state=f"w{window}")
        sess = core.connect_executor("ex", [0], heartbeats=False)
        core.submit([RequestSpec(f"r{i}", "flux-dev", 512, 512, 1, 28, deadline_in_s=100.0 - i) for i in range(5)])
        core.plan_once()
        # One GPU; with a window of 2 the policy sees only the earliest deadlines, r4 and r3.
        [(_, a)] = assignments(sess)
        assert a.request_ids == (first,)


def test_restart_recovers_unfinished_requests_at_their_reported_progress(make_core, tmp_path):
    core = make_core(state="s")
    sess = core.connect_executor("ex", range(8), heartbeats=False)
    core.submit([flux("a"), flux("b")])
    run_to_done(core, sess, "a")
    progress = core.get("b").steps_done
    core.stop()
    core.journal.close()
    again = make_core(state="s")
    assert again.get("a").state == "done"
    b = again.get("b")
    assert b.state in {"queued", "paused", "done"} and b.steps_done == progress
    assert again.epoch >> 32 == 2  # the second start of this state directory


def test_the_planner_process_sees_what_the_core_sees_round_after_round(make_core):
    """The planner child gets only the statuses that changed since its last plan; its plans must be
    the in-process policy's, plan for plan, while requests start, progress, finish and arrive."""
    def run(core):
        core.start(loop=False)
        sess = core.connect_executor("ex", range(4), heartbeats=False)
        drain(sess)
        core.submit([flux(f"a{i}", 512 + 256 * (i % 3)) for i in range(6)])
        log = []
        for rnd in range(40):
            if rnd == 5:
                core.submit([flux(f"b{i}", 768) for i in range(4)])
            core.plan_once()
            for epoch, a in assignments(sess):
                log.append((a.request_ids, a.stage, a.gpus, a.steps, a.start_step))
                core.clock.advance(a.predicted_s)
                core.report(StepReport(sess.id, epoch, a.request_ids, a.stage,
                                       a.steps if a.stage is Stage.DIFFUSE else 0, done=True,
                                       session_secret=sess.secret), wait=True)
        return log

    alone = run(make_core("edf", "4xH100", state="alone"))
    child = run(make_core("edf", "4xH100", state="child", planner_process=True, cluster_spec="4xH100"))
    assert len(alone) > 20 and child == alone
