"""Executor sessions: a secret guards a live session, and reports are validated field by field."""
import grpc

from ditplan.planner.request import Stage
from ditplan.planner.service.client import PlannerClient
from ditplan.planner.service.executor_link import ExecutorLink
from ditplan.planner.service.gen import planner_pb2 as pb
from ditplan.planner.service.messages import StepReport
from test_service import make_server, refused, spec  # noqa: F401 (fixture)


def test_a_live_executor_cannot_be_evicted_or_impersonated_without_its_secret(make_server):
    server = make_server(heartbeat_timeout_s=30)
    with PlannerClient(server.address, timeout=10) as c:
        owner = ExecutorLink(c, "node0", range(8))
        first = owner.next_update(10)
        assert len(first.session_secret) >= 16
        intruder = ExecutorLink(c, "node0", range(8))  # same id, no secret
        err = refused(intruder.next_update, 10)
        assert err.code is grpc.StatusCode.PERMISSION_DENIED and "session_secret" in err.details
        intruder.close()
        for secret in ("", "guess"):
            err = refused(c.report_progress, [StepReport("node0", session_secret=secret)])
            assert err.code is grpc.StatusCode.PERMISSION_DENIED
        assert [e.executor_id for e in c.info().executors] == ["node0"]  # still the owner's
        assert owner.report(StepReport("node0")) == 1  # the link adds its secret
        # With the secret, the owner itself may reconnect (its old stream ends, a new secret is issued).
        again = c.stream_plans("node0", range(8), session_secret=owner.secret)
        update = next(iter(again))
        assert update.session_secret and update.session_secret != owner.secret
        again.cancel()
        owner.close()


def test_reports_are_checked_against_their_assignment(make_server):
    server = make_server(heartbeat_timeout_s=30)
    with PlannerClient(server.address, timeout=10) as c:
        link = ExecutorLink(c, "node0", range(8))
        link.next_update(10)
        c.submit([spec("a", deadline_in_s=60.0, slo_scale=None)])
        epoch, a = link.next_assignment(timeout=10)
        link.report(StepReport("node0", epoch, a.request_ids, a.stage, 0, (), True))
        epoch, a = link.next_assignment(timeout=10)
        assert a.stage is Stage.DIFFUSE and a.steps >= 2
        err = refused(link.report, StepReport("node0", epoch, ("a",), Stage.DIFFUSE, 0, (1e300,) * 5, False))
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "5 entries for 'steps' = 0" in err.details
        raw = pb.StepReport(executor_id="node0", plan_epoch=epoch, request_ids=["a"], stage=99, steps=1,
                            session_secret=link.secret)
        call = c.stub.ReportProgress
        try:
            call(iter([raw]), timeout=10, metadata=c._metadata)
            raise AssertionError("stage 99 was accepted")
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT and "'stage' = 99" in exc.details()
        assert link.report(StepReport("node0", epoch, ("a",), Stage.DIFFUSE, 2, (0.03, 0.03), False)) == 1
        link.close()
