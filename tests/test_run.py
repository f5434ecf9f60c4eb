"""``ditplan run``: a trace through a real ``ditplan serve`` and real torch worker ranks (gloo, CPU), measured.

The service records what really ran (a flight from its dispatch to the report that ended it) and
``GetTimeline`` exports it; the run writes the what-if JSON and the timeline from it, and the independent
checker (``planner.checker``) validates them as it validates a simulation. Ctrl-C leaves no process.
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

from ditplan.models.cost import CostModel
from ditplan.planner.checker import check_timeline
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.request import Stage
from ditplan.planner.service.admission import RequestSpec
from ditplan.planner.service.clock import ManualClock
from ditplan.planner.service.core import CoreConfig, PlannerCore
from ditplan.planner.service.errors import InvalidArgument
from ditplan.planner.service.journal import Journal
from ditplan.planner.service.messages import StepReport

ROOT = Path(__file__).resolve().parents[1]
DITPLAN = [sys.executable, "-c", "from ditplan.planner.cli import main; main()"]
CONTRACT = {"slo_attainment", "slo_attainment_by_kind", "latency_s", "gpu_seconds", "preemptions", "sp_changes",
            "migrations", "requests", "finished", "late_finished", "rejected", "solver_ms", "plans", "fallbacks",
            "makespan_s", "weight_loads", "weight_load_s"}


def write_trace(path: Path, n: int, gap: float, steps: int, side=(256, 512), slo_scale: float = 20.0,
                idle_after: int | None = None, idle_s: float = 0.0) -> Path:
    """``n`` requests ``gap`` s apart, flux-dev and sd3-medium in turn; after the first ``idle_after``, ``idle_s``
    more."""
    lines = [{"id": f"r{i}", "arrival": round(gap * i + (idle_s if idle_after is not None and i >= idle_after else 0), 3),
              "model": ("flux-dev", "sd3-medium")[i % 2], "height": side[i % len(side)], "width": side[i % len(side)],
              "frames": 1, "steps": steps, "slo_scale": slo_scale} for i in range(n)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_run_finishes_a_tiny_trace_and_its_measured_timeline_passes_the_checker(tmp_path):
    """12 requests, the last 6 after 40 s of nothing: --speed 40 compresses that idle gap, and every time
    written stays on the trace's clock."""
    trace = write_trace(tmp_path / "t.jsonl", 12, 0.25, 6, idle_after=6, idle_s=40.0)
    proc = subprocess.run(DITPLAN + ["run", "--trace", str(trace), "--executors", "2", "--model-scale", "tiny",
                                     "--speed", "40", "--json", str(tmp_path / "m.json"),
                                     "--timeline", str(tmp_path / "tl.jsonl"), "--state-dir", str(tmp_path / "state")],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "timeline: legal" in proc.stderr and "cpsat" in proc.stdout  # the what-if table
    compressed = float(proc.stderr.split("idle time compressed: ")[1].split(" s")[0])
    assert 30 < compressed < 40.5, proc.stderr
    [(policy, m)] = json.loads((tmp_path / "m.json").read_text()).items()
    assert policy == "cpsat" and CONTRACT <= set(m)
    assert (m["requests"], m["finished"], m["rejected"]) == (12, 12, 0)
    assert m["plans"] > 0 and m["solver_ms"]["max"] is not None and m["gpu_seconds"] > 0
    recs = [json.loads(x) for x in (tmp_path / "tl.jsonl").read_text().splitlines()]
    requests = [r for r in recs if r["type"] == "request"]
    assert len(requests) == 12 and all(r["finish"] is not None for r in requests)
    diffuse = [r for r in recs if r["type"] == "segment" and r["stage"] == "diffuse"]
    assert sum(r["steps"] * len(r["request_ids"]) for r in diffuse) == 12 * 6  # every step, measured once
    late = [r for r in recs if r["type"] == "segment" and {"r6", "r7"} & set(r["request_ids"])]
    assert min(r["start"] for r in late) >= 41.5  # after the gap, on the trace's clock
    # the same independent checker as for a what-if, from the trace alone
    check = subprocess.run([sys.executable, "-m", "ditplan.planner.checker", str(trace), str(tmp_path / "tl.jsonl"),
                            "--cluster", "2xH100"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (tmp_path / "state" / "service.log").read_text().count("Traceback")


def test_run_exits_non_zero_with_the_reason_when_a_worker_rank_cannot_start(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", 2, 0.1, 2)
    env = dict(os.environ, DITPLAN_COLLECTIVE_TIMEOUT_S="not-a-number")  # every rank fails at start
    proc = subprocess.run(DITPLAN + ["run", "--trace", str(trace), "--executors", "1",
                                     "--state-dir", str(tmp_path / "state")],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "executor0 could not start its worker ranks" in proc.stderr
    assert "not-a-number" in proc.stderr  # the rank's own error, from the executor's log
    assert_gone(json.loads((tmp_path / "state" / "run.json").read_text())["processes"])


def test_run_rejects_a_cluster_that_is_not_its_worker_ranks(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", 2, 0.1, 2)
    proc = subprocess.run(DITPLAN + ["run", "--trace", str(trace), "--executors", "2", "--cluster", "4xH100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--cluster '4xH100' has 4 GPUs but --executors gives 2 worker ranks" in proc.stderr


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited (init reaps it)


def assert_gone(procs, within: float = 15.0) -> None:
    pids = {p["pid"] if isinstance(p, dict) else p for p in procs}
    deadline = time.monotonic() + within
    while {p for p in pids if alive(p)} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not {p for p in pids if alive(p)}, [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids if alive(p)]


def test_ctrl_c_stops_every_process_the_run_started(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", 40, 1.0, 4)  # 40 s of arrivals: interrupted long before
    state = tmp_path / "state"
    run = subprocess.Popen(DITPLAN + ["run", "--trace", str(trace), "--executors", "2", "--state-dir", str(state)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (state / "run.json").exists():  # written once every process is started
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        from ditplan.planner.service.client import PlannerClient
        with PlannerClient(json.loads((state / "run.json").read_text())["address"], timeout=10) as c:
            while c.info().requests_by_state.get("done", 0) < 1:  # running: executors connected, work done
                assert run.poll() is None, run.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.2)
        procs = descendants(run.pid)
        assert len(procs) >= 4, procs  # the service (and its planner), the executor and its two ranks
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, err
    assert "interrupted" in err
    assert_gone(procs)


def test_the_trace_clock_adds_the_idle_time_skipped_before_each_instant():
    from ditplan.planner.run import TraceClock

    clock = TraceClock(base=2.0, origin=100.0)
    assert clock(100.5) == 2.5
    clock.skip(101.0, 30.0)  # idle until 101: 30 trace seconds skipped
    clock.skip(102.0, 5.0)
    assert (clock(100.9), clock(101.5), clock(103.0)) == pytest.approx((2.9, 33.5, 40.0))
    assert clock.skipped == 35.0


# --- the recorder, in-process ---------------------------------------------------------------------

@pytest.fixture
def core(tmp_path):
    c = parse_cluster("2xH100")
    journal, recovered = Journal.open(tmp_path / "state")
    core = PlannerCore(CoreConfig(cluster=c, cost=CostModel(c.kind), policy="edf"), journal, recovered,
                       ManualClock())
    yield core
    core.stop()
    journal.close()


def _next(sess):
    while (d := sess.next(0)) is not None:
        for a in d.assignments:
            return d.plan_epoch, a
    raise AssertionError("no assignment")


def test_the_recorder_keeps_a_lost_flights_reported_steps_and_the_timeline_checks(core):
    """A flight cut by a lost executor is a segment of the steps reported before the loss, ending at it;
    encode and decode count once they report done; the whole timeline passes check_timeline."""
    sess = core.connect_executor("ex", [0, 1], heartbeats=False)
    core.submit([RequestSpec("a", "flux-dev", 512, 512, 1, 10, deadline_in_s=100.0)])
    clock = core.clock

    def finish(sess, stage: Stage, steps: int = 0, done: bool = True):
        epoch, a = _next(sess)
        assert a.stage is stage
        clock.advance(0.5)
        core.report(StepReport(sess.id, epoch, a.request_ids, stage, steps, done=done, session_secret=sess.secret),
                    wait=True)
        return a

    core.plan_once()
    finish(sess, Stage.ENCODE)
    core.plan_once()
    finish(sess, Stage.DIFFUSE, 4, done=False)  # 4 of 10 steps reported, then the executor dies
    clock.advance(0.25)
    core.disconnect_executor(sess, "test: kill -9")
    again = core.connect_executor("ex2", [0, 1], heartbeats=False)
    core.plan_once()
    a = finish(again, Stage.DIFFUSE, 6)
    assert a.start_step == 4
    core.plan_once()
    finish(again, Stage.DECODE)
    tl = core.timeline()
    got = [(s.stage, s.steps, s.start, s.end) for s in tl.segments]
    assert got == [(Stage.ENCODE, 0, 0.0, 0.5), (Stage.DIFFUSE, 4, 0.5, 1.25), (Stage.DIFFUSE, 6, 1.25, 1.75),
                   (Stage.DECODE, 0, 1.75, 2.25)]
    assert (tl.total, tl.dropped, tl.next, tl.plans, tl.fallbacks) == (4, 0, 4, 4, 0)
    assert core.timeline(3).segments == tl.segments[3:] and core.timeline(1, 1).next == 2
    with pytest.raises(InvalidArgument, match="page_size"):
        core.timeline(0, 10**6)
    view = core.get("a")
    req = core._book.tracked["a"].status.request  # noqa: SLF001 - the request as admitted
    segs = [{"request_ids": list(s.request_ids), "stage": s.stage.value, "gpus": list(s.gpus), "sp": len(s.gpus),
             "steps": s.steps, "start": s.start, "end": s.end} for s in tl.segments]
    assert check_timeline([req], core.cluster, segs, {"a": {"finish": view.finish, "met": True}}) == []
