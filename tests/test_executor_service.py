"""Closed loop: a real ``ditplan serve`` (no --simulate) on loopback drives ``ditplan executor`` (2 gloo ranks).

The executor runs tiny seeded models of every request's family (text encoders, backbone, VAE) at the planned
SP degree and reports measured step and stage times; every request must finish with all its steps reported
and a measured step time. ``fcfs-sp2`` forces SP degree 2, so the closed loop also runs Ulysses attention
across the two ranks. A CogVideoX request runs for real and its frames land in ``--out-dir``. With
``--models`` the service places weights per GPU and the executor really builds and frees the modules it is
told to.
"""
from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditplan.planner.placement import WeightLoad
from ditplan.planner.request import Stage
from ditplan.planner.service.admission import RequestSpec
from ditplan.planner.service.client import PlannerClient
from ditplan.planner.service.messages import AssignmentMsg, LoadMsg, PlanDelta, RequestData

ROOT = Path(__file__).resolve().parents[1]
DITPLAN = [sys.executable, "-c", "from ditplan.planner.cli import main; main()"]


@contextlib.contextmanager
def closed_loop(tmp_path, cluster: str, policy: str, *executor_args: str, serve_args: tuple[str, ...] = ()):
    """A real ``ditplan serve`` (no --simulate, plus ``serve_args``) with a ``ditplan executor`` connected to it.

    Yields (client, executor process, deadline, outcome): the deadline (60 s from the start)
    covers connecting and the test's work; ``outcome["out"]`` holds the executor's output
    once server and executor have stopped.
    """
    outcome: dict = {}
    with open(tmp_path / "serve.log", "w") as log:
        serve = subprocess.Popen(DITPLAN + ["serve", "--port", "0", "--cluster", cluster, "--policy", policy,
                                            "--state-dir", str(tmp_path / "state"), "--log-level", "warning",
                                            "--heartbeat-timeout", "30", *serve_args],
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
    # no --models: no loads, each component built on first use on the ranks that run it
    events = weight_events(out["out"])
    assert events and {e["op"] for e in events} == {"build"}, events
    assert {e["name"] for e in events} == {f"{m}/{c}" for m in ("flux-dev", "sd3-medium")
                                           for c in ("text", "backbone", "vae")}
    assert all(e["module"] and e["params"] > 0 for e in events)


def test_serve_runs_a_video_model_for_real_and_writes_its_frames(tmp_path):
    """CogVideoX through the closed loop: encode, diffuse and decode run their real modules (no sleep), report
    measured times, and the decoded frames are PNGs in --out-dir."""
    frames_dir = tmp_path / "out"
    with closed_loop(tmp_path, "2xH100", "fcfs-sp2", "--devices", "2", "--max-idle", "20", "--out-dir",
                     str(frames_dir)) as (c, executor, deadline, out):
        run_to_done(c, executor, deadline, RequestSpec("v1", "cogvideox-5b", 512, 512, 9, 3, deadline_in_s=300.0))
        v = c.get("v1")
        assert v.steps_done == 3 and v.measured_step_s is not None and v.sp == 2
        assert v.measured_encode_s is not None and v.measured_encode_s > 0
        assert v.measured_decode_s is not None and v.measured_decode_s > 0
    assert out["returncode"] == 0, out["out"]
    assert "sleeping" not in out["out"]
    from PIL import Image
    pngs = sorted((frames_dir / "v1").glob("frame_*.png"))
    assert [p.name for p in pngs] == [f"frame_{i:04d}.png" for i in range(9)]  # 4 x (3 latent - 1) + 1 frames
    # 512 px / --downscale 64 = 8 latent rows, x 4 (the tiny video VAE's factor)
    assert Image.open(pngs[0]).size == (32, 32)


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


# "weights: GPU 0 load sd3-medium/backbone: module=yes params=N bytes=B seconds=S (reported loaded); holds
# flux-dev/backbone=N1,sd3-medium/backbone=N2, T params": one line per load / unload the executor's rank did
WEIGHT_LINE = re.compile(r"weights: GPU (\d+) (load|unload|build) (\S+): module=(yes|no) params=(\d+) bytes=(\d+)"
                         r"(?: gone=(yes|no))?(?: seconds=\S+)? \(([^)]*)\); holds (\S+), (\d+) params")


def weight_events(out: str) -> list[dict]:
    return [dict(gpu=int(m[1]), op=m[2], name=m[3], module=m[4] == "yes", params=int(m[5]), bytes=int(m[6]),
                 gone=m[7], note=m[8], held=m[9], total=int(m[10])) for m in WEIGHT_LINE.finditer(out)]


def run_to_done(c, executor, deadline, spec: RequestSpec) -> None:
    assert c.submit([spec])[0].accepted
    while c.get(spec.id).state != "done":
        assert executor.poll() is None, executor.stdout.read()
        assert time.monotonic() < deadline, c.get(spec.id)
        time.sleep(0.1)


def test_placement_loads_builds_and_frees_torch_modules(tmp_path):
    """One L20 serving flux-dev, cpsat: an sd3-medium request makes the planner load sd3-medium (the rank
    builds its transformer and reports it loaded); a cogvideox-5b request then needs room, so the planner
    evicts weights: a freed backbone's module is really gone from the rank."""
    with closed_loop(tmp_path, "1xL20", "cpsat", "--devices", "1", "--max-idle", "20",
                     serve_args=("--models", "flux-dev")) as (c, executor, deadline, out):
        first = c.info().placement
        assert first == (("flux-dev/backbone", "flux-dev/text", "flux-dev/vae"),)
        run_to_done(c, executor, deadline, RequestSpec("s1", "sd3-medium", 512, 512, 1, 3, deadline_in_s=300.0))
        info = c.info()
        assert info.weight_loads >= 1 and "sd3-medium/backbone" in info.placement[0], info
        assert c.get("s1").steps_done == 3 and c.get("s1").measured_step_s is not None
        with_sd3 = set(info.placement[0])
        # flux-dev (31 GiB) + sd3-medium (14 GiB) + cogvideox-5b (20 GiB) > 48 GiB: something must go
        run_to_done(c, executor, deadline, RequestSpec("c1", "cogvideox-5b", 256, 256, 9, 2, deadline_in_s=300.0))
        last = c.info()
        assert "cogvideox-5b/backbone" in last.placement[0] and last.weight_loads > info.weight_loads
        evicted = with_sd3 - set(last.placement[0])
        assert evicted
    assert out["returncode"] == 0, out["out"]
    events = weight_events(out["out"])
    by = {(e["op"], e["name"]): e for e in events}
    # the deployment's weights: built before any assignment, not reported
    for comp in ("backbone", "text", "vae"):
        assert by["load", f"flux-dev/{comp}"]["note"] == "initial: not reported", events
    flux = by["load", "flux-dev/backbone"]
    assert flux["module"] and flux["params"] > 0
    # the planner's load: a real module on rank 0, reported to the service
    sd3 = by["load", "sd3-medium/backbone"]
    assert sd3["module"] and sd3["params"] > 0 and sd3["note"] == "reported loaded"
    assert f"sd3-medium/backbone={sd3['params']}" in sd3["held"]
    for name in ("sd3-medium/text", "sd3-medium/vae", "cogvideox-5b/backbone"):  # real modules too
        assert by["load", name]["module"] and by["load", name]["note"] == "reported loaded"
    assert {e["name"] for e in events if e["op"] == "unload"} == evicted
    for name in evicted:
        e = by["unload", name]
        assert e["module"] and e["params"] > 0 and e["gone"] == "yes", e  # dropped and collected
        assert name not in e["held"]
    modules = [e for e in events if e["module"] and e["op"] in ("load", "unload")]
    held = 0
    for e in modules:  # what the rank holds goes up with every built module and down with every freed one
        held += e["params"] if e["op"] == "load" else -e["params"]
        assert e["total"] == held, (e, modules)
    assert not [e for e in events if e["op"] == "build"]  # with a placement, nothing is built on first use
    assert "not resident" not in out["out"]


def _placement_world(rank, world):
    """Two gloo ranks: a load builds on its rank only; a run on a block with a rank lacking the module fails
    on every rank of the block (no collective left waiting); an unload really frees the module."""
    from ditplan.executor.runtime import MissingWeights, Worker
    from ditplan.executor.service import model_source
    from ditplan.models.torch import LatentSpec as Spec

    w = Worker(rank, world, model_source({}, world))
    load = {"op": "load", "model": "sd3-medium", "component": "backbone", "family": "sd3", "id": 0}
    run = {"op": "run", "rids": ["r"], "steps": 1, "id": 3}
    out = {"load": w.handle(dict(load, rank=0)), "held": w.held()}
    w.handle({"op": "load", "model": "sd3-medium", "component": "text", "family": "sd3", "rank": 1, "id": 1})
    out["encode"] = w.handle({"op": "encode", "specs": [Spec("r", "sd3", 8, 8, 2, seed=1)], "model": "sd3-medium",
                              "rank": 1, "id": 1})  # the text encoders are on rank 1 only
    w.handle({"op": "migrate", "rid": "r", "ranks": (0, 1), "id": 2})  # rank 1 holds no sd3 backbone
    try:
        w.handle(run)
        out["run"] = "ran"
    except MissingWeights:
        out["run"] = "missing"
    w.handle(dict(load, rank=1))
    out["times"] = w.handle(run)  # SP 2 over both ranks once both hold the module
    out["unload"] = w.handle({"op": "unload", "rank": 0, "model": "sd3-medium", "component": "backbone", "id": 4})
    out["after"] = w.held()
    return out


def test_worker_loads_on_its_rank_fails_a_run_without_weights_and_frees_on_unload():
    from ditplan.executor.launch import spawn_world
    r0, r1 = spawn_world(_placement_world, 2, timeout=120)
    assert r0["load"]["module"] and r0["load"]["params"] > 0 and r1["load"] is None
    assert r0["held"] == {"sd3-medium/backbone": r0["load"]["params"]} and r1["held"] == {}
    assert r0["encode"] is None and r1["encode"] > 0  # measured seconds, on the rank that encoded
    assert r0["run"] == r1["run"] == "missing"
    assert len(r0["times"]) == len(r1["times"]) == 1
    assert r0["unload"]["gone"] and r0["unload"]["params"] == r0["load"]["params"] and r1["unload"] is None
    text = r1["after"]["sd3-medium/text"]
    assert r0["after"] == {} and r1["after"] == {"sd3-medium/backbone": r0["load"]["params"], "sd3-medium/text": text}


def test_the_executor_refuses_a_model_whose_family_it_cannot_run():
    from ditplan.executor.service import UnsupportedModel, check_runnable, served_models
    from ditplan.models.catalog import CATALOG
    check_runnable(CATALOG)  # every catalog family has a torch model
    with pytest.raises(UnsupportedModel, match=r"cannot run cogvideox-5b \(family 'cogvideox'\), sdxl \(family "
                                               r"'sdxl'\); it runs the families flux, sd3"):
        check_runnable(["flux-dev", "sdxl", "cogvideox-5b"], families=("flux", "sd3"))

    class Info:
        placement = (("flux-dev/backbone", "flux-dev/text"), ("sdxl/vae",))
    assert served_models(Info()) == ["flux-dev", "sdxl"]
    Info.placement = ()
    assert served_models(Info()) == sorted(CATALOG)


class _Link:
    """Stands in for ExecutorLink: request data known, reports recorded."""

    executor_id = "e0"

    def __init__(self, *data: RequestData) -> None:
        self.requests = {d.id: d for d in data}
        self.reports: list = []

    def report(self, *reports, timeout=None):
        self.reports.extend(reports)
        return len(reports)


def test_controller_ends_a_stage_whose_weights_are_not_resident():
    """With a placement, a diffuse on a GPU lacking the backbone ends at once (done, 0 steps), nothing runs;
    without one (no load ever received) the same assignment runs, its module built on first use."""
    import queue

    from ditplan.executor.service import Controller

    data = RequestData("s1", "sd3-medium", 512, 512, 1, 4, 100.0, 0, True)
    diffuse = AssignmentMsg(("s1",), Stage.DIFFUSE, (1,), 4, 0, 1.0, 0.25, 0.0, True)
    for placed in (True, False):
        link, cmds = _Link(data), [queue.Queue(), queue.Queue()]
        ctl = Controller(link, 2, 0, 64, cmds, queue.Queue())
        loads = [LoadMsg(WeightLoad(0, "sd3-medium", "backbone"), 0.1, True)] if placed else []
        ctl.handle(PlanDelta(7, 0.0, requests=[data], loads=loads, assignments=[diffuse]))
        sent = [cmds[1].get_nowait()["op"] for _ in range(cmds[1].qsize())]
        if placed:
            assert sent == ["load"] and ctl.missing("sd3-medium", Stage.DIFFUSE, (0, 1)) == [1]
            (rep,) = link.reports
            assert rep.request_ids == ("s1",) and rep.steps == 0 and rep.done and rep.plan_epoch == 7
            assert "not resident on GPU(s) [1]" in ctl.errors[0]
        else:  # never encoded here: encoded on the block's GPU first
            assert sent == ["encode", "setstep", "run"] and not link.reports and not ctl.errors


def test_controller_moves_embeddings_to_the_diffuse_block_and_the_latent_to_the_decode_gpu():
    """Encode on GPU 2, diffuse on GPUs 0-1, decode on GPU 3: the commands every rank sees, in order."""
    import queue

    from ditplan.executor.service import Controller

    data = RequestData("v", "cogvideox-5b", 512, 512, 9, 4, 100.0, 0, False)
    link, cmds = _Link(data), [queue.Queue() for _ in range(4)]
    ctl = Controller(link, 4, 0, 64, cmds, queue.Queue())
    for stage, gpus, steps in ((Stage.ENCODE, (2,), 0), (Stage.DIFFUSE, (0, 1), 4), (Stage.DECODE, (3,), 0)):
        ctl.handle(PlanDelta(1, 0.0, requests=[data], assignments=[
            AssignmentMsg(("v",), stage, gpus, steps, 0, 1.0, 0.25, 0.0, True)]))
    sent = [cmds[0].get_nowait() for _ in range(cmds[0].qsize())]
    assert [c["op"] for c in sent] == ["encode", "migrate", "setstep", "run", "migrate", "decode"]
    encode, to_block, _, run, to_decoder, decode = sent
    assert encode["rank"] == 2 and encode["model"] == "cogvideox-5b"
    (spec,) = encode["specs"]
    assert (spec.family, spec.height, spec.width, spec.frames, spec.steps) == ("cogvideox", 8, 8, 9, 4)
    assert to_block["ranks"] == (0, 1) and run["rids"] == ["v"] and run["steps"] == 4
    assert to_decoder["ranks"] == (3,) and decode["rids"] == ["v"] and decode["rank"] == 3
    assert ctl.runs[encode["id"]][2] is Stage.ENCODE and ctl.runs[decode["id"]][2] is Stage.DECODE
    assert "v" not in ctl.where and not link.reports  # reports come from the ranks' answers


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


BLOCKED_WORLD = """
import os, sys, time
from pathlib import Path

def block(rank, world, marks):
    import torch
    import torch.distributed as dist
    Path(marks, str(os.getpid())).touch()
    dist.recv(torch.zeros(1), src=1 - rank)  # both ranks wait for each other inside gloo: a deadlock in C++,
    time.sleep(600)                           # where torch's own SIGINT on parent death is never handled
"""


def test_worker_ranks_die_with_their_killed_parent_even_inside_a_collective(tmp_path):
    import os
    import signal

    (tmp_path / "blocked_world.py").write_text(BLOCKED_WORLD)
    marks = tmp_path / "marks"
    marks.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", "import blocked_world; from ditplan.executor.launch import "
                               f"spawn_world; spawn_world(blocked_world.block, 2, {str(marks)!r}, timeout=600)"],
                              cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    try:
        ready = time.monotonic() + 60
        while len(list(marks.iterdir())) < 2:
            assert parent.poll() is None and time.monotonic() < ready, "the world did not start"
            time.sleep(0.1)
        workers = [int(p.name) for p in marks.iterdir()]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        gone_by = time.monotonic() + 2.0
        while any(_alive(p) for p in workers) and time.monotonic() < gone_by:
            time.sleep(0.05)
        left = [p for p in workers if _alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, "worker ranks outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_an_executor_the_service_declares_lost_exits_non_zero(tmp_path):
    import os
    import signal

    with closed_loop(tmp_path, "1xL20", "tetriserve-dp", "--devices", "1",
                     serve_args=("--heartbeat-timeout", "1")) as (c, executor, deadline, outcome):
        os.kill(executor.pid, signal.SIGSTOP)  # silent: no heartbeat reaches the service
        try:
            while c.info().executors:
                assert time.monotonic() < deadline, "the executor was never declared lost"
                time.sleep(0.1)
        finally:
            os.kill(executor.pid, signal.SIGCONT)
        executor.wait(30)
    assert outcome["returncode"] == 3, outcome["out"]
    assert "declared executor 'executor0' lost" in outcome["out"]
