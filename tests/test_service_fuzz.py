"""Fuzz the service with malformed messages and field values (hypothesis).

The server must never die, and every reply must carry a code that fits the
input: OK or a client-error code naming the field, never UNKNOWN, and
INTERNAL only for bytes that are not a protobuf message of the method's type.
"""
from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditplan.models.catalog import CATALOG
from ditplan.planner.service.gen import planner_pb2 as pb
from ditplan.planner.service.server import PlannerServer, ServeConfig

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                         HealthCheck.too_slow])
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
METHODS = {  # unary methods: request type, codes a well-formed request may get
    "Submit": (pb.SubmitRequest, CLIENT_ERRORS),
    "Cancel": (pb.CancelRequest, CLIENT_ERRORS),
    "GetRequest": (pb.GetRequestRequest, CLIENT_ERRORS),
    "ListRequests": (pb.ListRequestsRequest, CLIENT_ERRORS),
    "Plan": (pb.PlanRequest, CLIENT_ERRORS),
    "WhatIf": (pb.WhatIfRequest, CLIENT_ERRORS | {grpc.StatusCode.DEADLINE_EXCEEDED}),
    "GetServerInfo": (pb.GetServerInfoRequest, set()),
}


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    server = PlannerServer(ServeConfig(port=0, policy="edf", state_dir=str(tmp_path_factory.mktemp("fuzz")),
                                       max_queue=200)).start()
    ch = grpc.insecure_channel(server.address)
    yield ch
    ch.close()
    server.stop(grace=0)


def call(channel, method: str, payload: bytes, timeout: float = 10.0):
    """(code, details) of one call with raw request bytes."""
    rpc = channel.unary_unary(f"/ditplan.v1.Planner/{method}", request_serializer=None,
                              response_deserializer=None)
    try:
        rpc(payload, timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def assert_alive(channel):
    assert call(channel, "GetServerInfo", b"")[0] is grpc.StatusCode.OK


def check(channel, method: str, msg_or_bytes) -> tuple[grpc.StatusCode, str]:
    cls, allowed = METHODS[method]
    payload = msg_or_bytes if isinstance(msg_or_bytes, bytes) else msg_or_bytes.SerializeToString()
    code, details = call(channel, method, payload)
    try:
        cls.FromString(payload)
        parses = True
    except DecodeError:
        parses = False
    if parses:
        assert code is grpc.StatusCode.OK or code in allowed, (method, code, details)
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            assert "field" in details or "report" in details, details
    else:  # undecodable bytes: the request is refused as such, naming its type
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in details, (method, code, details)
    return code, details


ints = st.one_of(st.integers(-3, 5000), st.sampled_from([0, -1, 2**31, 2**62, -(2**63), 2**63 - 1]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e3, 1e6))
texts = st.one_of(st.text(max_size=40), st.sampled_from(sorted(CATALOG)), st.text(min_size=300, max_size=400))


@st.composite
def request_specs(draw):
    m = pb.RequestSpec(id=draw(texts), model=draw(st.one_of(st.sampled_from(sorted(CATALOG)), texts)),
                       height=draw(ints), width=draw(ints), frames=draw(ints), steps=draw(ints))
    which = draw(st.sampled_from(["", "deadline", "deadline_in_s", "slo_scale"]))
    if which:
        setattr(m, which, draw(floats))
    return m


@SETTINGS
@given(st.lists(request_specs(), max_size=4), st.booleans())
def test_fuzz_submit_fields(channel, specs, partial):
    code, details = check(channel, "Submit", pb.SubmitRequest(requests=specs, allow_partial=partial))
    if code is grpc.StatusCode.INVALID_ARGUMENT and specs:
        assert "requests[" in details
    assert_alive(channel)


@SETTINGS
@given(st.sampled_from(sorted(METHODS)), st.binary(max_size=120))
def test_fuzz_raw_bytes(channel, method, payload):
    check(channel, method, payload)
    assert_alive(channel)


@st.composite
def progress(draw, i):
    steps = draw(st.integers(1, 50))
    done = draw(st.integers(-2, steps + 2))
    return pb.RequestProgress(
        id=draw(st.sampled_from([f"r{i}", "", f"r{i}"])), model=draw(st.sampled_from(sorted(CATALOG) + ["x"])),
        height=draw(st.sampled_from([256, 512, 768, 1024, 0, -8])), width=draw(st.sampled_from([256, 512, 1024])),
        frames=draw(st.sampled_from([1, 1, 17, 33, 0])), steps=steps, arrival=draw(floats),
        deadline=draw(floats), state=draw(st.integers(0, 8)), encoded=draw(st.booleans()),
        steps_done=done, latent_gpus=draw(st.lists(st.integers(0, 9), max_size=3)),
        sp=draw(st.sampled_from([0, 1, 2, 3, 4, 8, 16])))


@SETTINGS
@given(st.integers(0, 4).flatmap(lambda n: st.tuples(*[progress(i) for i in range(n)])),
       st.sampled_from(["8xH100", "2x4xA40", "1xL20", "", "9xH100", "{\"nodes\": []}", "8xTPU"]),
       st.sampled_from(["", "edf", "fcfs-sp2", "tetriserve-dp", "nope"]), floats,
       st.lists(floats, max_size=3))
def test_fuzz_plan(channel, reqs, cluster, policy, now, free_at):
    msg = pb.PlanRequest(now=now if math.isfinite(now) else 0.0, cluster=cluster, policy=policy,
                         requests=list(reqs), gpu_free_at=free_at)
    check(channel, "Plan", msg)
    assert_alive(channel)
