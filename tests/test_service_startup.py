"""``ditplan serve`` start-up errors: a port in use, a state directory another server holds, a bad cluster.

Each fails fast with one line and exit status 2 from the CLI (a real subprocess, as an operator runs it),
or a clear exception in-process, and leaves nothing open behind it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from ditplan.planner.service import server as server_mod
from ditplan.planner.service.client import PlannerClient, PlannerError
from ditplan.planner.service.journal import LOCK_NAME, Journal, JournalLockedError
from ditplan.planner.service.server import PlannerServer, PortInUseError, ServeConfig
from ditplan.planner.service.stateless import InvalidArgument, PlanIn, cluster_from_text

ROOT = Path(__file__).resolve().parents[1]
DITPLAN = [sys.executable, "-c", "from ditplan.planner.cli import main; main()"]
POLICY = "tetriserve-dp"


@pytest.fixture
def taken_port():
    """A port with a real listener on it (what another server looks like)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _serve_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(DITPLAN + ["serve", "--policy", POLICY, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 2, out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    return out


def _journal_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "ditplan-journal"]


def _config(state_dir: Path, **kw) -> ServeConfig:
    kw.setdefault("port", 0)
    return ServeConfig(policy=POLICY, state_dir=str(state_dir), **kw)


# --- a port in use --------------------------------------------------------------------------
def test_cli_port_in_use_is_one_line_and_exit_2(tmp_path, taken_port):
    r = _serve_cli("--port", str(taken_port), "--state-dir", str(tmp_path / "state"))
    line = _one_line_error(r)
    assert f"port 127.0.0.1:{taken_port} is in use (another ditplan serve?); pick another --port" in line
    assert Journal.open(tmp_path / "state")[0].close() is None  # the failed server left the lock free


def test_port_in_use_in_process_leaves_nothing_open(tmp_path, taken_port):
    before = _journal_threads()
    with pytest.raises(PortInUseError, match=f"127.0.0.1:{taken_port} is in use"):
        PlannerServer(_config(tmp_path, port=taken_port)).start()
    assert _journal_threads() == before  # the journal was closed...
    j, _ = Journal.open(tmp_path)  # ...and its lock released
    j.close()


def test_port_taken_between_probe_and_bind_is_still_named(tmp_path, taken_port, monkeypatch):
    probes = iter([False, True])  # the probe misses it; gRPC's bind fails; the second probe sees it
    monkeypatch.setattr(server_mod, "_in_use", lambda host, port: next(probes))
    with pytest.raises(PortInUseError, match="is in use"):
        PlannerServer(_config(tmp_path, port=taken_port)).start()
    Journal.open(tmp_path)[0].close()


def test_metrics_port_in_use(tmp_path, taken_port):
    with pytest.raises(PortInUseError, match=f"metrics port 127.0.0.1:{taken_port} is in use"):
        PlannerServer(_config(tmp_path, metrics_port=taken_port)).start()
    with PlannerServer(_config(tmp_path)):  # everything was released: the same state dir starts again
        pass


# --- one server per state directory ---------------------------------------------------------
def test_two_servers_on_one_state_dir_in_process(tmp_path):
    first = PlannerServer(_config(tmp_path)).start()
    try:
        with pytest.raises(JournalLockedError) as info:
            PlannerServer(_config(tmp_path)).start()
        msg = str(info.value)
        assert f"pid {os.getpid()}" in msg and f"address {first.address}" in msg and "since " in msg
        assert "pick another --state-dir" in msg
        assert info.value.holder["address"] == first.address
        lock = json.loads((tmp_path / LOCK_NAME).read_text())
        assert lock["pid"] == os.getpid() and lock["address"] == first.address and lock["host"]
        with PlannerClient(first.address, timeout=5) as c:  # the first one is unharmed
            assert c.info().now >= 0
    finally:
        first.stop(grace=0)
    again = PlannerServer(_config(tmp_path)).start()  # stop() released the lock
    again.stop(grace=0)


def test_journal_open_twice_and_after_close(tmp_path):
    j, _ = Journal.open(tmp_path, owner={"address": "here:1"})
    with pytest.raises(JournalLockedError, match="address here:1"):
        Journal.open(tmp_path)
    j.close()
    j, rec = Journal.open(tmp_path)
    assert rec.generation == 2  # the refused open did not touch the journal
    j.close()


def test_cli_second_server_exits_2_naming_the_holder(tmp_path):
    with PlannerServer(_config(tmp_path)) as holder:
        line = _one_line_error(_serve_cli("--port", "0", "--state-dir", str(tmp_path)))
        assert f"pid {os.getpid()}" in line and f"address {holder.address}" in line and "--state-dir" in line


def test_a_kill9_holder_does_not_block_a_restart(tmp_path):
    proc = subprocess.Popen(DITPLAN + ["serve", "--simulate", "--port", "0", "--state-dir", str(tmp_path),
                                       "--policy", POLICY, "--no-planner-process", "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "listening on" in proc.stdout.readline()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # a stale lock file stays...
    with PlannerServer(_config(tmp_path)):  # ...but the OS dropped the dead holder's flock
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


# --- strict cluster JSON through the service ------------------------------------------------
def test_stateless_cluster_with_unknown_field_is_invalid_argument(tmp_path):
    bad = json.dumps({"nodes": [{"kind": "H100", "gpus": 8, "memory_gb": 80}]})
    with pytest.raises(InvalidArgument, match=r"nodes\[0\]: unknown field 'memory_gb' \(did you mean 'memory_gib'"):
        cluster_from_text(bad)
    with PlannerServer(_config(tmp_path)) as server, PlannerClient(server.address, timeout=5) as c:
        with pytest.raises(PlannerError) as info:
            c.plan(PlanIn(now=0.0, cluster=json.dumps({"nodes": [{"kind": "H100", "gpus": 8}], "internode_gpbs": 5})))
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "field 'cluster'" in info.value.details and "unknown field 'internode_gpbs'" in info.value.details
        assert "did you mean 'internode_gbps'?" in info.value.details


def test_cli_serve_cluster_with_unknown_field(tmp_path):
    spec = tmp_path / "c.json"
    spec.write_text(json.dumps({"nodes": [{"kind": "A40", "gpus": 4, "nvlinks": "none"}]}))
    line = _one_line_error(_serve_cli("--port", "0", "--state-dir", str(tmp_path / "s"), "--cluster", str(spec)))
    assert "unknown field 'nvlinks' (did you mean 'nvlink'?)" in line
    assert not (tmp_path / "s").exists()  # refused before the journal is touched
