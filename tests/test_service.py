"""The gRPC planning service against real servers on loopback ports.

In-process servers (``PlannerServer``, port 0) for the RPCs, status codes,
executor streams and the CLI verbs; a real ``ditplan serve`` subprocess for
kill -9 recovery. Every wait polls with a deadline.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from ditplan.planner.cli import app
from ditplan.planner.request import Stage
from ditplan.planner.service.admission import RequestSpec
from ditplan.planner.service.client import PlannerClient, PlannerError
from ditplan.planner.service.commands import status_rows
from ditplan.planner.service.executor_link import ExecutorLink
from ditplan.planner.service.gen import planner_pb2 as pb
from ditplan.planner.service.messages import StepReport
from ditplan.planner.service.stateless import PlanIn, ProgressIn
from ditplan.planner.service.server import PlannerServer, ServeConfig
from ditplan.planner.traces import TraceRecord, write_trace

ROOT = Path(__file__).resolve().parents[1]
DITPLAN = [sys.executable, "-c", "from ditplan.planner.cli import main; main()"]
POLICY = "tetriserve-dp"  # fast and deterministic; the default policy has its own test


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def refused(fn, *args, **kwargs) -> PlannerError:
    with pytest.raises(PlannerError) as info:
        fn(*args, **kwargs)
    return info.value


def spec(rid: str, model: str = "flux-dev", size: int = 1024, frames: int = 1, steps: int = 28, **kw) -> RequestSpec:
    kw.setdefault("slo_scale", 3.0)
    return RequestSpec(rid, model, size, size, frames, steps, **kw)


@pytest.fixture
def make_server(tmp_path):
    servers: list[PlannerServer] = []

    def make(**kw) -> PlannerServer:
        kw.setdefault("policy", POLICY)
        kw.setdefault("state_dir", str(tmp_path / f"state{len(servers)}"))
        server = PlannerServer(ServeConfig(port=0, **kw)).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop(grace=0)


@pytest.fixture
def sim(make_server):
    """A simulated 8xH100 service at 50x speed, and a client."""
    server = make_server(simulate=True, speed=50.0)
    with PlannerClient(server.address, timeout=10) as client:
        yield server, client


@pytest.fixture
def idle(make_server):
    """A service with no executor: requests stay queued."""
    server = make_server(max_queue=5, heartbeat_timeout_s=30)
    with PlannerClient(server.address, timeout=10) as client:
        yield server, client


# --- every RPC --------------------------------------------------------------------
def test_submit_status_and_run_to_completion(sim):
    server, c = sim
    results = c.submit([spec("a"), spec("b", size=512), spec("v", model="cogvideox-5b", size=480, frames=17,
                                                            steps=10, deadline_in_s=600.0)])
    assert [r.id for r in results] == ["a", "b", "v"] and all(r.accepted for r in results)
    now = c.info().now
    for r in results:
        assert r.arrival <= now and r.deadline > r.arrival and r.predicted_finish > r.arrival
    assert results[2].deadline == pytest.approx(results[2].arrival + 600.0)
    view = c.get("a")
    assert view.model == "flux-dev" and view.steps == 28 and view.state in ("queued", "running", "paused", "done")
    wait_for(lambda: all(v.state == "done" for v in c.list()), what="all done")
    for v in c.list():
        assert v.steps_done == v.steps and v.encoded and v.finish is not None
        assert v.predicted_finish == v.finish and v.measured_step_s is not None and v.measured_step_s > 0
    assert [v.id for v in c.list(states=["done"])] == ["a", "b", "v"]
    assert c.list(states=["queued"]) == []
    info = c.info()
    assert info.simulate and info.speed == 50.0 and info.cluster == "8xH100" and info.gpus == 8
    assert info.policy == POLICY and info.requests_by_state["done"] == 3
    assert [e.executor_id for e in info.executors] == ["simulator"]
    assert c.health() == "SERVING" and c.health("ditplan.v1.Planner") == "SERVING"


def test_list_pages(idle):
    _, c = idle
    c.submit([spec(f"r{i}") for i in range(5)])
    first = c.stub.ListRequests(pb.ListRequestsRequest(page_size=2), timeout=5)
    assert [r.id for r in first.requests] == ["r0", "r1"] and first.next_page_token
    assert [v.id for v in c.list(page_size=2)] == [f"r{i}" for i in range(5)]
    err = refused(lambda: c._call(c.stub.ListRequests, pb.ListRequestsRequest(page_token="x")))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details


def test_reflection_lists_the_services(sim):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server, c = sim
    stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"ditplan.v1.Planner", "grpc.health.v1.Health"} <= names


def test_cancel(idle):
    _, c = idle
    c.submit([spec("x"), spec("y")])
    view = c.cancel("x")
    assert view.state == "cancelled" and view.predicted_finish is None
    assert c.get("x").state == "cancelled" and c.get("y").state == "queued"
    err = refused(c.cancel, "x")
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION and "already cancelled" in err.details
    # A cancelled id still exists: it cannot be reused.
    assert refused(c.submit, [spec("x")]).code is grpc.StatusCode.ALREADY_EXISTS


def test_plan_is_stateless_and_checked(sim):
    _, c = sim
    reqs = [ProgressIn(f"p{i}", "flux-dev", 1024, 1024, 1, 28, arrival=0.0, deadline=10.0) for i in range(3)]
    reqs.append(ProgressIn("half", "flux-dev", 1024, 1024, 1, 28, arrival=0.0, deadline=10.0, state="paused",
                           encoded=True, steps_done=14, latent_gpus=(4, 5), sp=2))
    out = c.plan(PlanIn(now=1.0, cluster="8xH100", policy="edf", requests=reqs))
    assert out.problems == [] and out.solver_ms >= 0
    stages = {rid: a.stage for a in out.plan.assignments for rid in a.request_ids}
    assert stages["half"] is Stage.DIFFUSE and stages["p0"] is Stage.ENCODE
    used = [g for a in out.plan.assignments for g in a.gpus]
    assert len(used) == len(set(used)) and all(0 <= g < 8 for g in used)
    # GPUs busy until t=5 get nothing.
    out = c.plan(PlanIn(now=1.0, cluster="8xH100", policy="edf", requests=reqs, gpu_free_at=[5.0] * 4 + [0.0] * 4))
    assert out.plan.assignments and all(g >= 4 for a in out.plan.assignments for g in a.gpus)
    # Empty cluster and policy: the server's own.
    assert c.plan(PlanIn(now=1.0, cluster="", requests=reqs[:1])).plan.solver is not None
    for bad, field in ((dict(cluster="9xH100"), "cluster"), (dict(cluster="/etc/passwd"), "cluster"),
                       (dict(cluster="200x8xH100"), "cluster"), (dict(policy="nope"), "policy"),
                       (dict(gpu_kind="TPU"), "gpu_kind"), (dict(gpu_free_at=[0.0]), "gpu_free_at"),
                       (dict(just_paused=["zz"]), "just_paused"), (dict(round_s=-1.0), "round_s")):
        args = dict(now=1.0, cluster="8xH100", policy="edf", requests=reqs) | bad
        err = refused(c.plan, PlanIn(**args))
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT and field in err.details, err
    for bad, field in ((dict(steps_done=40, encoded=True), "steps_done"), (dict(steps_done=3), "encoded"),
                       (dict(latent_gpus=(9,)), "latent_gpus"), (dict(state="done"), "state"),
                       (dict(deadline=-1.0), "deadline"), (dict(model="x"), "model")):
        r = ProgressIn(**(dict(id="z", model="flux-dev", height=1024, width=1024, frames=1, steps=28, arrival=0.0,
                               deadline=10.0) | bad))
        err = refused(c.plan, PlanIn(now=1.0, cluster="8xH100", requests=[r]))
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "requests[0]" in err.details and field in err.details


def test_whatif_matches_the_cli(sim, tmp_path):
    _, c = sim
    records = [TraceRecord(f"w{i}", 0.5 * i, "flux-dev", 512 * (1 + i % 2), 512 * (1 + i % 2), 1, 20)
               for i in range(12)]
    got = c.whatif(records, cluster="4xH100", policies=["fcfs-sp2", "edf"], slo_scale=2.0, seed=3)
    trace = tmp_path / "t.jsonl"
    write_trace(trace, records)
    out = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["whatif", "--trace", str(trace), "--cluster", "4xH100", "--policy", "fcfs-sp2",
                                 "--policy", "edf", "--slo-scale", "2.0", "--seed", "3", "--json", str(out),
                                 "--no-plot"])
    assert r.exit_code == 0, r.output
    want = json.loads(out.read_text())
    for m in (got, want):
        for s in m.values():
            s.pop("solver_ms")  # wall-clock, the only non-deterministic field
    assert got == want
    reply = c.stub.WhatIf(pb.WhatIfRequest(records=[pb.TraceRecord(id="q", arrival=0, model="sdxl", height=1024,
                                                                   width=1024, frames=1, steps=30)]), timeout=30)
    assert reply.metrics[POLICY].requests == 1 and reply.metrics[POLICY].slo_attainment == 1.0
    err = refused(c.whatif, [TraceRecord("q", 0, "flux-xl", 512, 512, 1, 20)])
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "records[0]" in err.details and "'flux-xl'" in err.details
    err = refused(c.whatif, records[:2], policies=["nope"])
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in err.details


# --- status codes, and the server keeps serving ---------------------------------------
@pytest.mark.parametrize("bad, field, value", [
    (dict(model="flux-xl"), "model", "'flux-xl'"),
    (dict(size=0), "height", "0"),
    (dict(steps=-3), "steps", "-3"),
    (dict(frames=0), "frames", "0"),
    (dict(rid=""), "id", "''"),
    (dict(slo_scale=None, deadline=1.0), "deadline", "1.0"),
    (dict(slo_scale=None, deadline_in_s=-5.0), "deadline_in_s", "-5.0"),
    (dict(slo_scale=-1.0), "slo_scale", "-1.0"),
])
def test_invalid_argument_names_field_and_value(idle, bad, field, value):
    _, c = idle
    kw = dict(rid="good", model="flux-dev", size=1024, frames=1, steps=28, slo_scale=2.0) | bad
    rid = kw.pop("rid")
    if kw["slo_scale"] is None:
        del kw["slo_scale"]
    err = refused(c.submit, [spec("first"), spec(rid, **kw)])
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert f"field '{field}' = {value}" in err.details and "requests[1]" in err.details, err.details
    # All-or-nothing: the good request of the batch was not admitted either.
    assert refused(c.get, "first").code is grpc.StatusCode.NOT_FOUND
    assert c.submit([spec("first")])[0].accepted  # and the server still serves


def test_already_exists_not_found_resource_exhausted(idle):
    _, c = idle
    c.submit([spec("a")])
    err = refused(c.submit, [spec("b"), spec("a")])
    assert err.code is grpc.StatusCode.ALREADY_EXISTS and "'a'" in err.details
    err = refused(c.submit, [spec("c"), spec("c")])
    assert err.code is grpc.StatusCode.ALREADY_EXISTS and "duplicates requests[0]" in err.details
    for call in (c.get, c.cancel):
        err = refused(call, "nope")
        assert err.code is grpc.StatusCode.NOT_FOUND and "'nope'" in err.details
    c.submit([spec(f"q{i}") for i in range(4)])  # 5 of max_queue=5
    err = refused(c.submit, [spec("over")])
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 5" in err.details
    c.cancel("q0")  # frees a slot
    assert c.submit([spec("over")])[0].accepted
    assert len(c.list()) == 6


def test_partial_batch_reports_each_refusal(idle):
    _, c = idle
    c.submit([spec("dup")])
    out = c.submit([spec("ok1"), spec("bad", model="nope"), spec("dup"), spec("ok2")], allow_partial=True)
    assert [(o.id, o.accepted) for o in out] == [("ok1", True), ("bad", False), ("dup", False), ("ok2", True)]
    assert out[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "'nope'" in out[1].error
    assert out[2].error_code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert c.get("ok2").state == "queued"


def test_empty_submit_is_invalid(idle):
    _, c = idle
    err = refused(c.submit, [])
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "requests" in err.details


# --- executors ------------------------------------------------------------------------
def _diffuse(link: ExecutorLink, c: PlannerClient, rid: str):
    """Run the encode of ``rid`` and return its first diffuse assignment."""
    epoch, a = link.next_assignment(timeout=10)
    assert a.stage is Stage.ENCODE and a.request_ids == (rid,) and link.requests[rid].steps == 28
    assert link.report(StepReport(link.executor_id, epoch, a.request_ids, a.stage, 0, (), True)) == 1
    epoch, a = link.next_assignment(timeout=10)
    assert a.stage is Stage.DIFFUSE and a.request_ids == (rid,) and 1 <= a.steps <= 28 and a.lead
    return epoch, a


def test_executor_stream_reports_and_stale_epoch(make_server):
    server = make_server(heartbeat_timeout_s=30)
    with PlannerClient(server.address, timeout=10) as c:
        link = ExecutorLink(c, "node0", range(8))
        link.next_update()  # the greeting: the current epoch
        c.submit([spec("a", deadline_in_s=60.0, slo_scale=None)])
        epoch, a = _diffuse(link, c, "a")
        link.report(StepReport("node0", epoch, ("a",), Stage.DIFFUSE, 2, (0.03, 0.031), False))
        view = c.get("a")
        assert view.state == "running" and view.steps_done == 2 and view.encoded and view.plan_epoch == epoch
        assert view.measured_step_s == pytest.approx(0.0305)
        for bad_epoch in (epoch - 1, epoch + 10**6):
            err = refused(link.report, StepReport("node0", bad_epoch, ("a",), Stage.DIFFUSE, 1, (), False))
            assert err.code is grpc.StatusCode.FAILED_PRECONDITION and "epoch" in err.details
        err = refused(link.report, StepReport("node0", epoch, ("a",), Stage.DIFFUSE, 99, (), False))
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "'steps' = 99" in err.details
        err = refused(link.report, StepReport("ghost", epoch, ("a",), Stage.DIFFUSE, 1, (), False))
        assert err.code is grpc.StatusCode.FAILED_PRECONDITION and "not connected" in err.details
        err = refused(link.report, StepReport("node0", epoch, ("zzz",), Stage.DIFFUSE, 1, (), False))
        assert err.code is grpc.StatusCode.NOT_FOUND
        # The stream and the server are unharmed: finish the assignment, then the request.
        link.report(StepReport("node0", epoch, ("a",), Stage.DIFFUSE, a.steps - 2, (), True))
        while True:
            epoch, a = link.next_assignment(timeout=10)
            link.report(StepReport("node0", epoch, a.request_ids, a.stage, a.steps, (), True))
            if a.stage is Stage.DECODE:
                break
        view = wait_for(lambda: (v := c.get("a")).state == "done" and v, what="done")
        assert view.steps_done == 28 and view.finish is not None
        wait_for(lambda: link.poll() >= 0 and "a" in link.released, what="release of a")
        # A second executor may not take GPUs already owned.
        err = refused(lambda: ExecutorLink(c, "node1", [3]).next_update(timeout=5))
        assert err.code is grpc.StatusCode.FAILED_PRECONDITION and "GPU 3" in err.details
        err = refused(lambda: ExecutorLink(c, "node2", [8]).next_update(timeout=5))
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "GPU 8" in err.details
        link.close()


def test_dropped_executor_stream_requeues_from_last_reported_step(make_server):
    server = make_server(heartbeat_timeout_s=30)
    with PlannerClient(server.address, timeout=10) as c:
        link = ExecutorLink(c, "node0", range(8))
        link.next_update()
        c.submit([spec("a", deadline_in_s=120.0, slo_scale=None)])
        epoch, a = _diffuse(link, c, "a")
        assert a.steps > 3
        link.report(StepReport("node0", epoch, ("a",), Stage.DIFFUSE, 3, (0.03,) * 3, False))
        link.close()  # the stream breaks mid-assignment
        view = wait_for(lambda: (v := c.get("a")).state == "paused" and v, what="requeue")
        assert view.steps_done == 3 and view.encoded and view.plan_epoch == 0 and view.gpus == ()
        assert c.info().executors == ()
        # Planning goes on with whatever GPUs connect next; the request resumes at step 3.
        other = ExecutorLink(c, "node1", range(4))
        epoch2, a2 = other.next_assignment(timeout=10)
        assert epoch2 > epoch and a2.stage is Stage.DIFFUSE and a2.start_step == 3
        assert set(a2.gpus) <= {0, 1, 2, 3} and a2.steps <= 25
        assert other.requests["a"].steps_done == 3 and other.requests["a"].encoded
        # The old executor's epoch is stale now.
        err = refused(other.report, StepReport("node1", epoch, ("a",), Stage.DIFFUSE, 1, (), False))
        assert err.code is grpc.StatusCode.FAILED_PRECONDITION
        other.close()


def test_a_request_waiting_for_its_first_step_is_queued_and_status_times_are_relative(make_server):
    server = make_server(heartbeat_timeout_s=30)
    with PlannerClient(server.address, timeout=10) as c:
        link = ExecutorLink(c, "node0", range(8))
        link.next_update()
        c.submit([spec("a", deadline_in_s=120.0, slo_scale=None)])
        epoch, a = link.next_assignment(timeout=10)
        assert a.stage is Stage.ENCODE
        link.report(StepReport("node0", epoch, a.request_ids, a.stage, 0, (), True))
        link.close()  # before any diffuse step ran: encoded, waiting for its first step
        view = wait_for(lambda: not c.info().executors and (v := c.get("a")).plan_epoch == 0 and v, what="requeue")
        assert view.encoded and view.steps_done == 0 and view.state == "queued"  # not preempted: not paused
        assert [v.id for v in c.list(states=["queued"])] == ["a"] and c.list(states=["paused"]) == []
    done = dataclasses.replace(view, state="done", finish=view.deadline - 30.0)
    (row,) = status_rows([done], now=view.deadline - 20.0)
    assert row[3] == "+20.00" and row[5] == "-10.00 met"  # every time relative to now, in seconds


def test_silent_executor_is_lost_after_heartbeat_timeout(make_server):
    server = make_server(heartbeat_timeout_s=0.4)
    with PlannerClient(server.address, timeout=10) as c:
        beating = ExecutorLink(c, "beating", [0, 1, 2, 3], heartbeat_s=0.1)
        silent = ExecutorLink(c, "silent", [4, 5, 6, 7])
        silent.next_update()
        with pytest.raises(PlannerError) as info:
            while True:
                silent.next_update(timeout=5)
        assert info.value.code is grpc.StatusCode.ABORTED and "heartbeat" in info.value.details
        time.sleep(0.5)  # a few heartbeat periods: the beating one stays
        assert [e.executor_id for e in c.info().executors] == ["beating"]
        beating.close()


# --- durability -----------------------------------------------------------------------
def _spawn(state_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``ditplan serve --simulate`` on a free port; (process, address). Its log goes to STATE_DIR.log."""
    log = open(f"{state_dir}.log", "a")
    proc = subprocess.Popen(DITPLAN + ["serve", "--simulate", "--port", "0", "--state-dir", str(state_dir),
                                       "--policy", POLICY, "--log-level", "warning", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    line = proc.stdout.readline()  # the listening line, with the bound port
    if "listening on" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {Path(f'{state_dir}.log').read_text()}")
    return proc, line.split("listening on ")[1].split(";")[0].split(" ")[0]


def test_kill9_and_restart_recovers_the_journal(tmp_path):
    state = tmp_path / "state"
    proc, addr = _spawn(state, "--speed", "10")
    try:
        with PlannerClient(addr, timeout=10) as c:
            c.submit([spec(f"i{i}", size=1024, steps=28) for i in range(12)]
                     + [spec("vid", model="cogvideox-5b", size=768, frames=33, steps=20, slo_scale=5.0)])

            def mid_run():
                views = {v.id: v for v in c.list()}
                done = [v for v in views.values() if v.state == "done"]
                partial = [v for v in views.values() if v.state != "done" and 0 < v.steps_done < v.steps]
                return views if done and partial else None

            before = wait_for(mid_run, timeout=20, what="some done, some part-way")
            cancelled = None
            for rid in ["vid"] + [f"i{i}" for i in range(11, -1, -1)]:
                try:
                    cancelled = c.cancel(rid).id
                    break
                except PlannerError as exc:  # finished meanwhile
                    assert exc.code is grpc.StatusCode.FAILED_PRECONDITION
            before = {v.id: v for v in c.list()}
            assert cancelled and before[cancelled].state == "cancelled"
            clock_before = c.info().now
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    proc, addr = _spawn(state, "--speed", "50")
    try:
        with PlannerClient(addr, timeout=10) as c:
            after = {v.id: v for v in c.list()}
            assert set(after) == set(before)
            for rid, b in before.items():
                a = after[rid]
                if b.state in ("done", "cancelled"):
                    assert (a.state, a.finish, a.steps_done) == (b.state, b.finish, b.steps_done), rid
                else:  # back with at least the progress reported before the kill
                    assert a.state != "cancelled" and a.steps_done >= b.steps_done and a.encoded >= b.encoded, rid
                    assert a.arrival == b.arrival and a.deadline == b.deadline
            assert c.info().now >= clock_before - 1.0  # the virtual clock resumes near where it stopped
            assert refused(c.submit, [spec("i0")]).code is grpc.StatusCode.ALREADY_EXISTS
            wait_for(lambda: all(v.state in ("done", "cancelled") for v in c.list()), timeout=30,
                     what="recovered requests finish")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0


# --- the CLI verbs --------------------------------------------------------------------
def test_cli_submit_status_cancel(idle, tmp_path):
    server, c = idle
    addr = server.address
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [TraceRecord("t0", 0.0, "flux-dev", 512, 512, 1, 20, slo_scale=2.0),
                        TraceRecord("t1", 5.0, "sd3-medium", 1024, 1024, 1, 28, deadline=65.0)])
    runner = CliRunner()
    r = runner.invoke(app, ["submit", "--trace", str(trace), "--server", addr])
    assert r.exit_code == 0, r.output
    t1 = c.get("t1")
    assert t1.deadline - t1.arrival == pytest.approx(60.0)  # arrival = now, deadline shifted with it
    assert abs(t1.arrival - c.get("t0").arrival) < 5.0  # sent at once, not replayed
    r = runner.invoke(app, ["status", "--server", addr, "--json"])
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)
    assert [(x["id"], x["state"]) for x in listed] == [("t0", "queued"), ("t1", "queued")]
    r = runner.invoke(app, ["status", "--server", addr])
    assert r.exit_code == 0 and "t1" in r.stdout
    r = runner.invoke(app, ["cancel", "t0", "--server", addr])
    assert r.exit_code == 0, r.output
    assert c.get("t0").state == "cancelled"
    r = runner.invoke(app, ["cancel", "nope", "--server", addr])
    assert r.exit_code == 1 and "NOT_FOUND" in r.output
    r = runner.invoke(app, ["submit", "--trace", str(trace), "--server", addr])  # the same ids again
    assert r.exit_code == 1 and "ALREADY_EXISTS" in r.output and "'t0'" in r.output
    write_trace(trace, [TraceRecord(f"m{i}", 0.0, "flux-dev", 512, 512, 1, 20) for i in range(5)])
    r = runner.invoke(app, ["submit", "--trace", str(trace), "--server", addr])  # 2 live + 5 > max_queue 5
    assert r.exit_code == 1 and "RESOURCE_EXHAUSTED" in r.output


def test_cli_submit_replay_keeps_inter_arrival_times(sim, tmp_path):
    server, c = sim  # 50x: 5 s of trace time take 0.1 s
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [TraceRecord("r0", 10.0, "flux-dev", 512, 512, 1, 20),
                        TraceRecord("r1", 15.0, "flux-dev", 512, 512, 1, 20)])
    r = CliRunner().invoke(app, ["submit", "--trace", str(trace), "--server", server.address, "--replay"])
    assert r.exit_code == 0, r.output
    gap = c.get("r1").arrival - c.get("r0").arrival
    assert 4.5 <= gap <= 9.0, gap


def test_cli_serve_subprocess_answers_status(tmp_path):
    proc, addr = _spawn(tmp_path / "s")
    try:
        r = subprocess.run(DITPLAN + ["status", "--server", addr, "--json"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_default_policy(make_server):
    from ditplan.planner.policies.base import policy_names
    from ditplan.planner.service.server import default_policy

    server = make_server(policy=None, simulate=True, speed=50.0)
    expected = "cpsat" if "cpsat" in policy_names() else "tetriserve-dp"
    assert default_policy() == expected and server.core.config.policy == expected
    with PlannerClient(server.address, timeout=10) as c:
        c.submit([spec("d", size=512, steps=10)])
        wait_for(lambda: c.get("d").state == "done", what="done under the default policy")


def test_plan_window_shows_the_earliest_deadlines_first(make_server):
    server = make_server(plan_window=2, heartbeat_timeout_s=30)
    with PlannerClient(server.address, timeout=10) as c:
        c.submit([spec(f"d{int(s)}", slo_scale=None, deadline_in_s=s) for s in (100.0, 50.0, 10.0, 80.0, 20.0)])
        link = ExecutorLink(c, "node0", range(8))
        epoch, a = link.next_assignment(timeout=10)
        link.poll()
        assert set(link.requests) <= {"d10", "d20"} and a.request_ids[0] in ("d10", "d20")
        link.close()


def test_journal_round_trip(tmp_path):
    from ditplan.planner.service.journal import Journal

    j, rec = Journal.open(tmp_path, "full")
    assert rec.rows == [] and rec.generation == 1
    j.append_requests([("a", "flux-dev", 512, 512, 1, 20, 0.0, 9.0), ("b", "sdxl", 1024, 1024, 1, 30, 1.0, 5.0)]
                      ).result(5)
    j.record_progress("a", 7, True)
    j.record_outcome("b", "cancelled", None, 0, False, 0, 0, 0)
    j.record_progress("b", 3, True)  # after the outcome: ignored
    j.flush()
    j.close()
    j, rec = Journal.open(tmp_path, "normal")
    rows = {r.id: r for r in rec.rows}
    assert rec.generation == 2 and [r.id for r in rec.rows] == ["a", "b"]
    assert (rows["a"].steps_done, rows["a"].encoded, rows["a"].outcome) == (7, True, None)
    assert (rows["b"].steps_done, rows["b"].outcome) == (0, "cancelled")
    import sqlite3
    conn = sqlite3.connect(tmp_path / "journal.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    j.close()


def test_planner_process_and_its_death(make_server):
    server = make_server(simulate=True, speed=50.0, planner_process=True)
    child = server.core._proc.pid
    with PlannerClient(server.address, timeout=10) as c:
        c.submit([spec("p1", size=512, steps=10)])
        wait_for(lambda: c.get("p1").state == "done", what="planned by the child process")
        os.kill(child, signal.SIGKILL)  # the server plans on in its own process
        c.submit([spec("p2", size=512, steps=10)])
        wait_for(lambda: c.get("p2").state == "done", what="planned after the child died")
        assert server.core._proc is None


def test_late_reject_ends_a_lost_request_with_its_reason_and_keeps_serving(make_server, tmp_path):
    state_dir = tmp_path / "reject"
    server = make_server(simulate=True, speed=20.0, policy="cpsat", late="reject", state_dir=str(state_dir))
    with PlannerClient(server.address, timeout=10) as c:
        # "lost" needs seconds at the fastest degree: lost by far more than the 1 s grace at any plan instant
        c.submit([spec("lost", size=2048, steps=50, deadline_in_s=0.05, slo_scale=None),
                  spec("fine", size=512, deadline_in_s=600.0, slo_scale=None)])  # on time even on a loaded machine
        wait_for(lambda: {v.id: v.state for v in c.list()} == {"lost": "rejected", "fine": "done"},
                 timeout=60.0, what="one rejected, one done")
        view = c.get("lost")
        assert view.reason and "deadline" in view.reason and view.finish is None
        assert c.get("fine").reason is None
        assert [v.id for v in c.list(states=["rejected"])] == ["lost"]
        from ditplan.planner.service.commands import status_rows

        rows = {r[0]: r for r in status_rows(c.list(), c.info().now)}
        assert rows["lost"][1] == "rejected" and "deadline" in rows["lost"][-1] and rows["fine"][-1] == ""
    server.stop(grace=0)
    again = make_server(simulate=True, speed=20.0, policy="cpsat", late="reject", state_dir=str(state_dir))
    with PlannerClient(again.address, timeout=10) as c:  # the journal keeps the outcome and the reason
        view = c.get("lost")
        assert view.state == "rejected" and "deadline" in view.reason
