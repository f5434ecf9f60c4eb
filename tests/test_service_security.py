"""TLS, bearer tokens and the Prometheus endpoint of the planning service."""
from __future__ import annotations

import datetime
import ipaddress
import time
import urllib.request

import grpc
import pytest
from typer.testing import CliRunner

from ditplan.planner.cli import app
from ditplan.planner.service.admission import RequestSpec
from ditplan.planner.service.client import PlannerClient, PlannerError
from ditplan.planner.service.gen import planner_pb2 as pb
from ditplan.planner.service.messages import StepReport
from ditplan.planner.service.server import PlannerServer, ServeConfig

TOKEN = "s3cret-token"


def make_cert(tmp_path):
    """A self-signed certificate for localhost / 127.0.0.1 (its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def server_factory(tmp_path):
    started = []

    def make(**kw) -> PlannerServer:
        kw.setdefault("policy", "tetriserve-dp")
        s = PlannerServer(ServeConfig(port=0, state_dir=str(tmp_path / f"s{len(started)}"), **kw)).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop(grace=0)


def spec(rid: str) -> RequestSpec:
    return RequestSpec(rid, "flux-dev", 512, 512, 1, 20, slo_scale=3.0)


def test_tls_and_token(server_factory, tmp_path, monkeypatch):
    cert, key = make_cert(tmp_path)
    server = server_factory(tls_cert=str(cert), tls_key=str(key), token=TOKEN, simulate=True, speed=50.0)
    addr = server.address
    with PlannerClient(addr, tls_ca=str(cert), token=TOKEN, timeout=10) as c:
        assert c.submit([spec("a")])[0].accepted
        assert c.get("a").id == "a"
    with PlannerClient(addr, tls_ca=str(cert), timeout=10) as anon:
        assert anon.health() == "SERVING"  # health stays open
        for call in (lambda: anon.get("a"), lambda: anon.submit([spec("b")]), anon.info,
                     lambda: anon.report_progress([StepReport("x")]),
                     lambda: next(iter(anon.stream_plans("x", [0])))):
            with pytest.raises(PlannerError) as info:
                call()
            assert info.value.code is grpc.StatusCode.UNAUTHENTICATED and "missing" in info.value.details
    with PlannerClient(addr, tls_ca=str(cert), token="wrong", timeout=10) as bad:
        with pytest.raises(PlannerError) as info:
            bad.get("a")
        assert info.value.code is grpc.StatusCode.UNAUTHENTICATED and "wrong" in info.value.details
    # Plaintext against the TLS port fails to connect.
    with PlannerClient(addr, token=TOKEN, timeout=2) as plain:
        with pytest.raises(PlannerError) as info:
            plain.get("a")
        assert info.value.code is grpc.StatusCode.UNAVAILABLE
    # The CLI takes the token from DITPLAN_TOKEN.
    monkeypatch.setenv("DITPLAN_TOKEN", TOKEN)
    r = CliRunner().invoke(app, ["status", "--server", addr, "--tls-ca", str(cert), "--json"])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("DITPLAN_TOKEN", "nope")
    r = CliRunner().invoke(app, ["status", "--server", addr, "--tls-ca", str(cert)])
    assert r.exit_code == 1 and "UNAUTHENTICATED" in r.output


def test_prometheus_metrics(server_factory):
    server = server_factory(simulate=True, speed=50.0, metrics_port=0, max_queue=3)
    with PlannerClient(server.address, timeout=10) as c:
        c.submit([spec("a"), spec("b")])
        with pytest.raises(PlannerError):
            c.submit([spec("c"), spec("d")])  # over max_queue
        deadline = time.monotonic() + 10
        while any(v.state != "done" for v in c.list()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        views = c.list()
    # The accelerated clock keeps running while the planner works, so whether a
    # deadline is met depends on machine load: compare the gauge with the
    # requests' own outcomes rather than with a constant.
    met = sum(v.finish is not None and v.finish <= v.deadline + 1e-6 for v in views) / len(views)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['ditplan_requests{state="done"}'] == 2
    assert samples["ditplan_slo_attainment"] == pytest.approx(met)
    assert samples["ditplan_submitted_total"] == 2
    assert samples['ditplan_refused_total{code="RESOURCE_EXHAUSTED"}'] == 2
    assert samples["ditplan_plans_total"] >= 1 and samples["ditplan_solver_seconds_count"] == samples["ditplan_plans_total"]
    assert 'ditplan_solver_seconds_bucket{le="+Inf"}' in samples
    assert samples["ditplan_executors"] == 1
    for name in ("ditplan_plan_fallbacks_total", "ditplan_preemptions_total", "ditplan_executors_lost_total"):
        assert name in samples


def test_bearer_metadata_on_streams_plaintext(server_factory):
    server = server_factory(token=TOKEN, heartbeat_timeout_s=30)
    with PlannerClient(server.address, token=TOKEN, timeout=10) as c:
        stream = c.stream_plans("node0", range(8))
        first = next(iter(stream))
        assert first.plan_epoch > 0
        assert c.report_progress([StepReport("node0", session_secret=first.session_secret)]) == 1  # a heartbeat
        stream.cancel()
    ch = grpc.insecure_channel(server.address)
    from ditplan.planner.service.gen import planner_pb2_grpc as pb_grpc
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.PlannerStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=5,
                                              metadata=(("authorization", "Basic abc"),))
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    ch.close()


def test_serve_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("DITPLAN_TOKEN", raising=False)
    help_text = " ".join(CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output.split())
    assert "process list" in help_text and "--token-file" in help_text and "--allow-insecure" in help_text
    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = CliRunner().invoke(app, ["serve", "--port", "0", "--state-dir", str(tmp_path / "a"), "--token-file", str(empty)])
    assert r.exit_code == 2 and "is empty" in r.output
    tok = tmp_path / "tok"
    tok.write_text(TOKEN + "\n")
    r = CliRunner().invoke(app, ["serve", "--port", "0", "--state-dir", str(tmp_path / "b"), "--token-file", str(tok),
                                 "--token", "x"])
    assert r.exit_code == 2 and "one way" in r.output
    r = CliRunner().invoke(app, ["serve", "--port", "0", "--state-dir", str(tmp_path / "c"),
                                 "--token-file", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "--token-file" in r.output
    # Bad budgets, then a --host beyond loopback without a token: refused before anything starts.
    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "0", "--state-dir", str(tmp_path / "d"),
                                 "--max-workers", "8"])
    assert r.exit_code == 2 and "--max-workers 8 leaves no thread for streams" in r.output  # options first
    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "0", "--state-dir", str(tmp_path / "d")])
    assert r.exit_code == 2 and "--allow-insecure" in r.output and not (tmp_path / "d").exists()
