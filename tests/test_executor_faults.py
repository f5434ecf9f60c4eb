"""Faults under ``ditplan run``: a worker rank killed with -9 mid-step loses nothing.

Two executors of one rank each (cluster ``2x1xH100``) share a latent checkpoint directory. The rank of
``executor0`` is killed while a request runs on it: the executor stops its world and exits 4, its plan
stream closes, the service marks GPU 0 lost and requeues the request from its last reported step, the
run restarts ``executor0``, and the request resumes from the checkpoint of that step (on ``executor1`` or on
the restarted ``executor0``). Every request ends done and the measured timeline passes the checker.
Also: the checkpoint store's contract, and a rank restored from a checkpoint continues exactly as an
uninterrupted rank would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ditplan.executor.checkpoints import RESUME_LOG, CheckpointStore  # noqa: E402
from ditplan.planner.service.client import PlannerClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DITPLAN = [sys.executable, "-c", "from ditplan.planner.cli import main; main()"]


def rank_of(executor_pid: int) -> int:
    """The worker rank process an executor spawned (not its multiprocessing resource tracker)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == executor_pid and b"spawn_main" in cmd:
            return int(d.name)
    raise AssertionError(f"no worker rank under {executor_pid}")


def test_a_worker_rank_killed_mid_step_loses_nothing_and_its_request_resumes_from_a_checkpoint(tmp_path):
    # 512 px / 16: 32x32 latents (1024 tokens), some 20-100 ms a step on one CPU thread
    lines = [{"id": f"r{i}", "arrival": round(0.5 * i, 3), "model": "flux-dev", "height": 512, "width": 512,
              "frames": 1, "steps": 24, "slo_scale": 50.0} for i in range(4)]
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    state = tmp_path / "state"
    run = subprocess.Popen(DITPLAN + ["run", "--trace", str(trace), "--executors", "2", "--ranks-per-executor", "1",
                                      "--downscale", "16", "--json", str(tmp_path / "m.json"),
                                      "--timeline", str(tmp_path / "tl.jsonl"), "--state-dir", str(state)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (state / "run.json").exists():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.2)
        info = json.loads((state / "run.json").read_text())
        executor0 = next(p["pid"] for p in info["processes"] if p["name"] == "executor0")
        with PlannerClient(info["address"], timeout=10) as c:
            while True:  # a request mid-run on GPU 0, some steps reported
                victim = next((v for v in c.list() if v.state == "running" and v.gpus == (0,)
                               and 2 <= v.steps_done <= v.steps // 2), None)
                if victim is not None:
                    break
                assert run.poll() is None, run.communicate()
                assert time.monotonic() < deadline, [(v.id, v.state, v.gpus, v.steps_done) for v in c.list()]
                time.sleep(0.05)
            os.kill(rank_of(executor0), signal.SIGKILL)
        out, err = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out + err
    # restarted, or (when the other executor finished the rest first) reported as the run ended
    assert "executor0 exited with status 4 (a worker rank died)" in err, err
    [m] = json.loads((tmp_path / "m.json").read_text()).values()
    assert (m["requests"], m["finished"]) == (4, 4)  # nothing accepted is lost
    resumed = [json.loads(x) for x in (state / "checkpoints" / RESUME_LOG).read_text().splitlines()]
    assert any(r["id"] == victim.id and r["step"] >= victim.steps_done for r in resumed), (victim, resumed)
    assert "timeline: legal" in err
    check = subprocess.run([sys.executable, "-m", "ditplan.planner.checker", str(trace), str(tmp_path / "tl.jsonl"),
                            "--cluster", "2x1xH100"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_checkpoint_store_keeps_the_two_newest_steps_and_names_the_exact_one(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in (1, 2, 3):
        store.save("a/b", step, torch.full((2, 2), float(step)))
    assert store.find("a/b", 1) is None  # older than the two newest
    assert store.find("a/b", 2) is not None and store.find("a/b", 4) is None
    assert torch.equal(CheckpointStore.load(store.find("a/b", 3), "a/b", 3), torch.full((2, 2), 3.0))
    with pytest.raises(ValueError, match="not 'a/b' at step 2"):
        CheckpointStore.load(store.find("a/b", 3), "a/b", 2)
    store.drop("a/b")
    assert not list(tmp_path.glob("*.pt"))


def test_a_request_restored_from_a_checkpoint_continues_exactly(tmp_path):
    """2 steps, checkpoint, a fresh rank restores it and runs the rest: the same latent as 4 steps in one go."""
    import torch.distributed as dist

    from ditplan.executor.runtime import Worker
    from ditplan.executor.service import model_source, restore_latent, step_latents
    from ditplan.models.torch import LatentSpec

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        spec = LatentSpec("r", "flux", 8, 8, 4, seed=3)
        encode = {"op": "encode", "specs": [spec], "model": "flux-dev", "rank": 0}
        whole = Worker(0, 1, model_source({}, 1))
        whole.handle(encode)
        whole.handle({"op": "run", "rids": ["r"], "steps": 4})
        store = CheckpointStore(tmp_path / "ckpt")
        first = Worker(0, 1, model_source({}, 1))
        first.handle(encode)
        first.handle({"op": "run", "rids": ["r"], "steps": 2})
        for rid, step, latent in step_latents(first, ["r"]):
            store.save(rid, step, latent)
        second = Worker(0, 1, model_source({}, 1))  # a restarted rank: encoded again, then the checkpoint
        second.handle(encode)
        restore_latent(second, {"id": 7, "rid": "r", "step": 2, "path": str(store.find("r", 2))})
        second.handle({"op": "run", "rids": ["r"], "steps": 2})
        assert second.states["r"].step == 4
        assert torch.equal(second.states["r"].latent, whole.states["r"].latent)
    finally:
        dist.destroy_process_group()
