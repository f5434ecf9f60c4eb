"""Closed loop: a real ``ditplan serve`` (no --simulate) on loopback drives ``ditplan executor`` (2 gloo ranks).

The executor runs tiny seeded FLUX/SD3 models at the planned SP degree and reports measured step times;
every request must finish with all its steps reported and a measured step time. ``fcfs-sp2`` forces
SP degree 2, so the closed loop also runs Ulysses attention across the two ranks.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planner.service.admission import RequestSpec
from planner.service.client import PlannerClient

ROOT = Path(__file__).resolve().parents[1]
DITPLAN = [sys.executable, "-c", "from planner.cli import main; main()"]


@contextlib.contextmanager
def closed_loop(tmp_path, cluster: str, policy: str, *executor_args: str):
    """A real ``ditplan serve`` (no --simulate) with a ``ditplan executor`` connected to it.

    Yields (client, executor process, deadline, outcome): the deadline (60 s from the start)
    covers connecting and the test's work; ``outcome["out"]`` holds the executor's output
    once server and executor have stopped.
    """
    outcome: dict = {}
    with open(tmp_path / "serve.log", "w") as log:
        serve = subprocess.Popen(DITPLAN + ["serve", "--port", "0", "--cluster", cluster, "--policy", policy,
                                            "--state-dir", str(tmp_path / "state"), "--log-level", "warning",
                                            "--heartbeat-timeout", "30"],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        executor = None
        try:
            line = serve.stdout.readline()
            assert "listening on" in line, line + (tmp_path / "serve.log").read_text()
            addr = line.split("listening on ")[1].split(";")[0].split(" ")[0]
            executor = subprocess.Popen(DITPLAN + ["executor", "--server", addr, *executor_args],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            with PlannerClient(addr, timeout=10) as c:
                deadline = time.monotonic() + 60
                while not c.info().executors:
                    assert executor.poll() is None, executor.stdout.read()
                    assert time.monotonic() < deadline, "executor did not connect"
                    time.sleep(0.2)
                yield c, executor, deadline, outcome
        finally:
            serve.terminate()
            serve.wait(10)
            if executor is not None:
                try:
                    outcome["out"], _ = executor.communicate(timeout=30)  # the plan stream ends with the server
                except subprocess.TimeoutExpired:
                    executor.kill()
                    outcome["out"], _ = executor.communicate()
                outcome["returncode"] = executor.returncode


@pytest.mark.parametrize("policy,sp", [("tetriserve-dp", None), ("fcfs-sp2", 2)])
def test_serve_drives_torch_executor(tmp_path, policy, sp):
    with closed_loop(tmp_path, "2xH100", policy, "--devices", "2", "--max-idle", "20") as (c, executor, deadline, out):
        specs = [RequestSpec("f1", "flux-dev", 512, 512, 1, 4, deadline_in_s=300.0),
                 RequestSpec("f2", "flux-dev", 1024, 1024, 1, 3, deadline_in_s=300.0),
                 RequestSpec("s1", "sd3-medium", 512, 512, 1, 5, deadline_in_s=300.0)]
        assert all(r.accepted for r in c.submit(specs))
        while not all(c.get(s.id).state == "done" for s in specs):
            assert executor.poll() is None, executor.stdout.read()
            assert time.monotonic() < deadline, [c.get(s.id) for s in specs]
            time.sleep(0.2)
        for s in specs:
            v = c.get(s.id)
            assert v.steps_done == s.steps and v.measured_step_s is not None and 0 < v.measured_step_s < 5
            if sp is not None:  # ran sequence-parallel over both gloo ranks
                assert v.sp == sp and len(v.gpus) == sp
    assert out["returncode"] == 0, out["out"]
    assert "assignment(s) run" in out["out"]


def test_cancel_stops_a_running_assignment_at_a_step_boundary(tmp_path):
    """A cancelled request's run stops at the next step boundary: the GPU is free for the next request."""
    # 1024 px / 16 = 64x64 latent: 4096 tokens, ~0.1-0.3 s a step on one CPU thread
    with closed_loop(tmp_path, "1xH100", "fcfs-sp1", "--devices", "1", "--downscale", "16",
                     "--max-idle", "20") as (c, executor, deadline, out):
        c.submit([RequestSpec("long", "flux-dev", 1024, 1024, 1, 400, deadline_in_s=3600.0)])
        while c.get("long").steps_done < 2:
            assert time.monotonic() < deadline, c.get("long")
            time.sleep(0.1)
        step_s = c.get("long").measured_step_s
        c.cancel("long")
        t0 = time.monotonic()
        c.submit([RequestSpec("next", "flux-dev", 512, 512, 1, 2, deadline_in_s=3600.0)])
        while c.get("next").state != "done":
            assert time.monotonic() - t0 < 60, (c.get("next"), c.get("long"))
            time.sleep(0.1)
        waited = time.monotonic() - t0
        long = c.get("long")
        assert long.state == "cancelled" and long.steps_done < 400
        # far less than the ~400 steps the cancelled run had left
        assert waited < 100 * step_s + 5, (waited, step_s)
    assert out["returncode"] == 0, out["out"]
