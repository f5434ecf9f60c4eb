"""Hostile clients against a real server on loopback: idle streams, undecodable requests, exposure defaults."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ditplan.planner.service.admission import RequestSpec
from ditplan.planner.service.client import PlannerClient
from ditplan.planner.service.gen import planner_pb2 as pb
from ditplan.planner.service.gen import planner_pb2_grpc as pb_grpc
from ditplan.planner.service.server import PlannerServer, ServeConfig, is_loopback

FIGURES: dict = {}  # printed with -s; the report quotes them


@pytest.fixture
def make_server(tmp_path):
    started = []

    def make(**kw) -> PlannerServer:
        kw.setdefault("policy", "tetriserve-dp")
        kw.setdefault("port", 0)
        s = PlannerServer(ServeConfig(state_dir=str(tmp_path / f"s{len(started)}"), **kw)).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop(grace=0)


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _code(fut, timeout=5.0):
    try:
        fut.result(timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def test_idle_streams_do_not_starve_health_or_unary(make_server):
    """More idle ReportProgress and StreamPlans streams than worker threads: health and Submit still served."""
    workers, n_report, n_plan = 12, 16, 8  # 24 idle streams against 12 threads
    server = make_server(max_workers=workers, health_reserve=2, unary_reserve=3, max_report_streams=5,
                         max_plan_streams=4, handshake_s=1.0, heartbeat_timeout_s=30)
    lim = server.limits.limiter
    budget = workers - 2 - 3  # 7 streams at most
    stop = threading.Event()

    def idle():  # a client stream that never sends
        stop.wait(10)
        return
        yield  # pragma: no cover

    ch = grpc.insecure_channel(server.address)
    stub = pb_grpc.PlannerStub(ch)
    raw_plans = ch.stream_stream("/ditplan.v1.Planner/StreamPlans", request_serializer=None,
                                 response_deserializer=pb.PlanUpdate.FromString)
    try:
        t0 = time.monotonic()
        reports = [stub.ReportProgress.future(idle(), timeout=8) for _ in range(n_report)]
        _wait(lambda: lim.kinds["report"].active + lim.kinds["report"].refused == n_report)
        plans = [raw_plans(idle(), timeout=8) for _ in range(n_plan)]
        _wait(lambda: lim.kinds["plan"].active + lim.kinds["plan"].refused == n_plan)
        assert lim.kinds["report"].active == 5 and lim.kinds["plan"].active == budget - 5
        assert lim.streams == budget
        # Every thread the streams may have is taken: health and unary calls still answer at once.
        health = health_pb2_grpc.HealthStub(ch)
        h0 = time.monotonic()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
            health_pb2.HealthCheckResponse.SERVING
        health_s = time.monotonic() - h0
        with PlannerClient(server.address, timeout=3) as c:
            s0 = time.monotonic()
            assert c.submit([RequestSpec("a", "flux-dev", 512, 512, 1, 20, slo_scale=3.0)])[0].accepted
            submit_s = time.monotonic() - s0
            assert c.info() is not None
        assert time.monotonic() - t0 < 1.0, "checked within the handshake deadline"
        # The excess was refused at once, naming the limit.
        rep = [_code(f) for f in reports]
        refused = [d for code, d in rep if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(refused) == n_report - 5
        assert all("limit 5 (--max-report-streams)" in d for d in refused)
        plan_codes = []
        for call in plans:
            try:
                for _ in call:
                    pass
                plan_codes.append((grpc.StatusCode.OK, ""))
            except grpc.RpcError as exc:
                plan_codes.append((exc.code(), exc.details()))
        plan_refused = [d for code, d in plan_codes if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(plan_refused) == n_plan - (budget - 5) and all("--unary-reserve" in d for d in plan_refused)
        # The admitted idle ones ended after the handshake deadline.
        ended = [d for code, d in rep + plan_codes if code is grpc.StatusCode.DEADLINE_EXCEEDED]
        assert len(ended) == budget and all("within 1 s" in d for d in ended)
        ended_s = time.monotonic() - t0
        assert 1.0 <= ended_s < 4.0
        _wait(lambda: lim.calls == 0)
        FIGURES["idle_streams"] = dict(workers=workers, opened=n_report + n_plan, admitted=budget,
                                       refused=len(refused) + len(plan_refused), health_ms=round(health_s * 1e3, 1),
                                       submit_ms=round(submit_s * 1e3, 1), idle_ended_after_s=round(ended_s, 2))
        print("\nidle streams:", FIGURES["idle_streams"])
    finally:
        stop.set()
        ch.close()


def test_default_budgets_hold_70_idle_report_streams(make_server):
    """The issue's attack at default limits (64 threads): 70 idle ReportProgress streams."""
    server = make_server(handshake_s=1.0)
    lim = server.limits.limiter
    stop = threading.Event()

    def idle():
        stop.wait(10)
        return
        yield  # pragma: no cover

    ch = grpc.insecure_channel(server.address)
    try:
        futs = [pb_grpc.PlannerStub(ch).ReportProgress.future(idle(), timeout=8) for _ in range(70)]
        _wait(lambda: lim.kinds["report"].active + lim.kinds["report"].refused == 70)
        h0 = time.monotonic()
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
            health_pb2.HealthCheckResponse.SERVING
        health_s = time.monotonic() - h0
        with PlannerClient(server.address, timeout=3) as c:
            assert c.submit([RequestSpec("a", "flux-dev", 512, 512, 1, 20, slo_scale=3.0)])[0].accepted
        codes = [_code(f)[0] for f in futs]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 70 - 32
        assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 32
        FIGURES["default_70"] = dict(opened=70, admitted=32, refused=38, health_ms=round(health_s * 1e3, 1))
        print("\ndefault limits, 70 idle ReportProgress:", FIGURES["default_70"])
    finally:
        stop.set()
        ch.close()


GARBAGE = (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08")  # bad tag; truncated string; truncated varint


def test_undecodable_requests_are_invalid_argument(make_server):
    server = make_server()
    ch = grpc.insecure_channel(server.address)
    try:
        for method in ("Submit", "GetServerInfo", "Plan"):
            call = ch.unary_unary(f"/ditplan.v1.Planner/{method}", request_serializer=None,
                                  response_deserializer=None)
            for junk in GARBAGE:
                with pytest.raises(grpc.RpcError) as info:
                    call(junk, timeout=5)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, junk, info.value.details())
                assert "not a valid" in info.value.details()
        report = ch.stream_unary("/ditplan.v1.Planner/ReportProgress", request_serializer=None,
                                 response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            report(iter([GARBAGE[0]]), timeout=5)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "StepReport" in info.value.details()
        plans = ch.unary_stream("/ditplan.v1.Planner/StreamPlans", request_serializer=None,
                                response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(plans(GARBAGE[1], timeout=5))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with PlannerClient(server.address, timeout=3) as c:  # still serving
            assert c.health() == "SERVING" and c.info() is not None
        assert server.limits.limiter.calls == 0
    finally:
        ch.close()


def test_undecodable_without_token_is_unauthenticated(make_server):
    server = make_server(token="t0k")
    ch = grpc.insecure_channel(server.address)
    try:
        call = ch.unary_unary("/ditplan.v1.Planner/Submit", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(GARBAGE[0], timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            call(GARBAGE[0], timeout=5, metadata=(("authorization", "Bearer t0k"),))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        ch.close()


# --- exposure defaults -----------------------------------------------------------------------------------

def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")


def test_exposed_host_needs_token_or_allow_insecure(make_server, tmp_path, caplog):
    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1" and cfg.metrics_host == "127.0.0.1" and not cfg.allow_insecure
    with pytest.raises(ValueError, match="--allow-insecure"):
        PlannerServer(ServeConfig(host="0.0.0.0", port=0, state_dir=str(tmp_path / "refused"))).start()
    assert not (tmp_path / "refused").exists()  # refused before the journal is touched
    with caplog.at_level(logging.WARNING, logger="ditplan.planner.service.server"):
        s = make_server(host="0.0.0.0", allow_insecure=True, metrics_port=0)
    assert any("--allow-insecure" in r.getMessage() for r in caplog.records)
    assert s._metrics_http.server_address[0] == "127.0.0.1"  # metrics stay on loopback
    make_server(host="0.0.0.0", token="secret")  # a token: no flag needed


def test_cli_refuses_exposed_host_without_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DITPLAN_TOKEN"}
    state = tmp_path / "st"
    r = subprocess.run([sys.executable, "-m", "ditplan.planner.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                        "--state-dir", str(state), "--policy", "tetriserve-dp"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    out = " ".join((r.stdout + r.stderr).split())
    assert "without a token" in out and "--allow-insecure" in out and "Traceback" not in out
    assert not state.exists()
