"""``ditplan run``: replay a trace through the planning service and real CPU worker ranks, and measure it.

It starts ``ditplan serve`` on loopback (a fresh state directory) and the torch executors, replays the
trace at its arrival times, waits until every request has ended, and writes the what-if JSON and the
timeline (docs/architecture.md, Contracts) from what really ran: the service records each flight from its
dispatch to the report that ended it (``planner/service/recorder.py``, exported by ``GetTimeline``), so
``planner.checker.check_timeline`` validates a run exactly as it validates a simulation.

* **Ranks.** ``ranks`` worker ranks are the cluster's GPUs. They run as ``ranks / ranks_per_executor``
  executor processes of ``ranks_per_executor`` ranks each (default: one executor with them all); each
  executor is one node of the cluster (``NODESxRANKSxKIND``), so an SP block never spans two of them.
* **Time.** Measured step times are real, so busy time always runs at wall speed. ``speed`` > 1 divides
  only the idle gaps (no request live, so nothing can happen) by ``speed``; every time written is on the
  trace's clock (a service time plus the idle time skipped before it), so the outputs are those of a
  replay at speed 1. A request's arrival is its trace arrival and its deadline the trace's, as ``whatif``
  gives them; its latency counts the submit's own delay.
* **Faults.** An executor that exits before the run is done (a worker rank killed, the service declaring it
  lost) is started again, up to ``max_restarts`` times each; its GPUs were marked lost and its work
  requeued from the last reported step, and the executors share a latent checkpoint directory, so a
  requeued request resumes where it was reported.
* **Processes.** Every child runs in its own process group and dies with this process (``PR_SET_PDEATHSIG``,
  armed by ``child_main``); on any exit, error or signal each group gets SIGTERM, then SIGKILL.

The planner side runs without torch: this module never imports the executor package.
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ditplan.models.catalog import SP_DEGREES
from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster, parse_cluster
from ditplan.planner.errors import InputError
from ditplan.planner.execution import Segment
from ditplan.planner.metrics import summarize, timeline_records
from ditplan.planner.request import Request, RequestState, RequestStatus, meets
from ditplan.planner.sim_result import SimResult
from ditplan.planner.traces import TraceRecord

MODEL_SCALES = ("tiny",)  # tiny seeded transformers built from code (the executor's models)
TERMINAL = ("done", "cancelled", "rejected", "failed")
SUBMIT_CHUNK = 1000
TICK_S = 0.05  # replay and supervision step
POLL_S = 0.25  # service status poll
EXIT_WAIT_S = 15.0  # at the end: how long an executor the service let go may take to exit, before it is reported
RESUME_LOG = "resumed.jsonl"  # written by the executors' checkpoint store (executor/checkpoints.py)
BOOT = "from ditplan.planner.run import child_main; child_main()"


class RunError(RuntimeError):
    """The run could not start or finish; the message says why (and where the logs are)."""


@dataclass(frozen=True)
class RunConfig:
    trace: Path
    ranks: int  # worker ranks = the cluster's GPUs
    ranks_per_executor: int | None = None  # None: one executor with every rank
    cluster: str | None = None  # None: NODESxRANKSxH100, one node per executor
    policy: str | None = None  # None: the service's default
    speed: float = 1.0
    slo_scale: float = 1.5
    model_scale: str = "tiny"
    downscale: int = 64  # latent side = pixels / downscale (the executor's option)
    state_dir: Path | None = None  # None: a temporary directory, removed after a run that succeeded
    heartbeat_timeout_s: float = 10.0
    max_restarts: int = 3  # per executor
    start_timeout_s: float = 180.0
    timeout_s: float = 600.0  # after the last submit, for every request to end
    checkpoints: bool = True
    out_dir: Path | None = None  # decoded images (the executors' --out-dir)

    @property
    def per_executor(self) -> int:
        return self.ranks_per_executor or self.ranks


@dataclass(frozen=True)
class Progress:
    submitted: int
    total: int
    ended: int
    on_time: int  # done by the service's deadline so far
    restarts: int


@dataclass
class RunOutcome:
    policy: str
    result: SimResult
    summary: dict
    problems: list[str]  # check_timeline's findings on the run's own timeline (empty: legal)
    restarts: dict[str, int]
    resumed: list[dict]  # requests resumed from a latent checkpoint
    idle_compressed_s: float  # idle trace seconds skipped (speed > 1)
    state_dir: Path


def resolve(cfg: RunConfig) -> tuple[list[TraceRecord], Cluster, list[Request]]:
    """The trace, the cluster and the requests with their deadlines; ``InputError`` on bad input."""
    from ditplan.planner.placement import check_fits
    from ditplan.planner.traces import read_trace
    from ditplan.planner.whatif import to_requests

    if cfg.model_scale not in MODEL_SCALES:
        raise InputError(f"--model-scale {cfg.model_scale!r} is unknown; known: {', '.join(MODEL_SCALES)}")
    k = cfg.per_executor
    if cfg.ranks < 1 or k < 1 or cfg.ranks % k:
        raise InputError(f"--executors {cfg.ranks} must be a positive multiple of --ranks-per-executor {k}")
    if not cfg.speed >= 1:
        raise InputError(f"--speed {cfg.speed!r} must be >= 1 (it compresses idle gaps; busy time is real)")
    if k not in SP_DEGREES:
        raise InputError(f"--ranks-per-executor {k} must be one of {SP_DEGREES}: each executor is one node")
    n = cfg.ranks // k
    spec = cfg.cluster or (f"{k}xH100" if n == 1 else f"{n}x{k}xH100")
    cluster = parse_cluster(spec)
    if cluster.size != cfg.ranks:
        raise InputError(f"--cluster {spec!r} has {cluster.size} GPUs but --executors gives {cfg.ranks} worker ranks")
    for i in range(n):  # each executor's GPUs are one node: no SP block spans two executors
        if tuple(range(i * k, (i + 1) * k)) not in cluster.nodes:
            raise InputError(f"--cluster {spec!r}: executor {i}'s GPUs {i * k}..{(i + 1) * k - 1} are not one node; "
                             f"give nodes of --ranks-per-executor ({k}) GPUs")
    records = read_trace(cfg.trace)
    if not records:
        raise InputError(f"trace {str(cfg.trace)!r} has no requests")
    # deadlines as the service gives them (its cost model: the cluster kind's built-in tables)
    requests = to_requests(records, CostModel(cluster.kind), cluster, cfg.slo_scale)
    check_fits(requests, cluster, {r.id: f"line {r.line}" for r in records if r.line})
    return records, cluster, requests


# --- processes ------------------------------------------------------------------------------------

def child_main() -> None:
    """Entry of every child: die with the run (``PR_SET_PDEATHSIG``), then run ``ditplan ARGS``.

    ``argv``: ``PARENT_PID ARGS...``. Armed in the child itself, so the run never needs ``preexec_fn``
    (unsafe next to its gRPC threads)."""
    parent = int(sys.argv[1])
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the run died before the signal was armed
        os._exit(1)
    sys.argv = ["ditplan", *sys.argv[2:]]
    from ditplan.planner.cli import main
    main()


class Child:
    """A ``ditplan`` subcommand this run started: its own process group, output to ``log``."""

    def __init__(self, name: str, args: Sequence[str], log: Path) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", BOOT, str(os.getpid()), *args],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            return ""
        return "\n".join(f"  | {line}" for line in text[-lines:])

    def stop(self, grace_s: float) -> None:
        """SIGTERM to the group, up to ``grace_s`` for the leader to exit, then SIGKILL to what is left."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            if sig is signal.SIGTERM:  # the leader is gone: make sure the rest of its group is too
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return


class Deployment:
    """The service and the executors of one run, supervised; ``close`` stops every process it started."""

    def __init__(self, cfg: RunConfig, state_dir: Path) -> None:
        self.cfg, self.state_dir = cfg, state_dir
        self.serve: Child | None = None
        self.executors: dict[str, Child] = {}
        self.restarts: dict[str, int] = {}
        self.exits: dict[str, int] = {}  # executors that exited as the run ended (not restarted), with the status
        self.address = ""
        self.client = None
        self.checkpoint_dir = state_dir / "checkpoints"

    # -- start ----------------------------------------------------------------------------------
    def start(self, cluster_spec: str) -> None:
        from ditplan.planner.service.client import PlannerClient

        cfg = self.cfg
        args = ["serve", "--host", "127.0.0.1", "--port", "0", "--cluster", cluster_spec,
                "--state-dir", str(self.state_dir / "service"), "--journal-sync", "normal",
                "--slo-scale", repr(cfg.slo_scale), "--heartbeat-timeout", repr(cfg.heartbeat_timeout_s)]
        if cfg.policy:
            args += ["--policy", cfg.policy]
        self.serve = Child("service", args, self.state_dir / "service.log")
        self.address = self._wait_listening(time.monotonic() + cfg.start_timeout_s)
        self.client = PlannerClient(self.address, timeout=30)
        for i in range(cfg.ranks // cfg.per_executor):
            self._start_executor(f"executor{i}")
        self._write_processes()
        self._wait_connected(set(self.executors), time.monotonic() + cfg.start_timeout_s)

    def _wait_listening(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            text = self.serve.log.read_text(errors="replace") if self.serve.log.exists() else ""
            for line in text.splitlines():
                if "listening on " in line:
                    return line.split("listening on ")[1].split(";")[0].split(" ")[0]
            if (code := self.serve.exited()) is not None:
                raise RunError(f"the planning service exited with status {code} before listening:\n{self.serve.tail()}")
            time.sleep(0.05)
        raise RunError(f"the planning service did not listen within {self.cfg.start_timeout_s:g} s:\n{self.serve.tail()}")

    def _start_executor(self, name: str) -> None:
        cfg = self.cfg
        i = int(name.removeprefix("executor"))
        args = ["executor", "--server", self.address, "--devices", str(cfg.per_executor),
                "--first-gpu", str(i * cfg.per_executor), "--executor-id", name, "--downscale", str(cfg.downscale)]
        if cfg.checkpoints:
            args += ["--checkpoint-dir", str(self.checkpoint_dir)]
        if cfg.out_dir is not None:
            args += ["--out-dir", str(cfg.out_dir)]
        self.executors[name] = Child(name, args, self.state_dir / f"{name}.log")

    def _connected(self) -> set[str]:
        return {e.executor_id for e in self.client.info().executors}

    def _wait_connected(self, names: set[str], deadline: float) -> None:
        """Until every executor in ``names`` has connected (its worker ranks are up); RunError if one exits."""
        while not names <= self._connected():
            for name in sorted(names):
                child = self.executors[name]
                if (code := child.exited()) is not None:
                    raise RunError(f"{name} could not start its worker ranks (exit status {code}):\n{child.tail()}")
            if self.serve.exited() is not None:
                raise RunError(f"the planning service exited with status {self.serve.exited()}:\n{self.serve.tail()}")
            if time.monotonic() > deadline:
                raise RunError(f"{', '.join(sorted(names - self._connected()))} did not connect within "
                               f"{self.cfg.start_timeout_s:g} s:\n" + "\n".join(self.executors[n].tail() for n in names))
            time.sleep(0.1)

    def _write_processes(self) -> None:
        """``run.json``: the service's address and every process started (for ``ditplan status``, debugging)."""
        doc = {"address": self.address, "processes": [{"name": c.name, "pid": c.pid}
                                                      for c in (self.serve, *self.executors.values())]}
        (self.state_dir / "run.json").write_text(json.dumps(doc, indent=1) + "\n")

    # -- supervise ------------------------------------------------------------------------------
    def supervise(self, say: Callable[[str], None], restart: bool = True) -> None:
        """Restart an executor that exited (up to ``max_restarts`` each); RunError if the service died.
        ``restart=False`` (the run is over): only say which exited, so none goes unreported."""
        if (code := self.serve.exited()) is not None:
            raise RunError(f"the planning service exited with status {code}:\n{self.serve.tail()}")
        if not restart:  # an executor the service no longer has is on its way out: let it finish exiting
            gone = set(self.executors) - self._connected()
            deadline = time.monotonic() + EXIT_WAIT_S
            while any(self.executors[n].exited() is None for n in gone) and time.monotonic() < deadline:
                time.sleep(0.1)
        for name, child in list(self.executors.items()):
            code = child.exited()
            if code is None:
                continue
            if not restart:
                say(f"{name} exited with status {code} ({_why(code)}) before the run ended; its work was requeued")
                self.exits[name] = code
                continue
            n = self.restarts.get(name, 0)
            if n >= self.cfg.max_restarts:
                raise RunError(f"{name} exited with status {code} and was restarted {n} time(s) already "
                               f"(--max-restarts {self.cfg.max_restarts}):\n{child.tail()}")
            self.restarts[name] = n + 1
            say(f"{name} exited with status {code} ({_why(code)}); its GPUs are lost and their work requeued; "
                f"restarting it ({n + 1}/{self.cfg.max_restarts})")
            child.stop(0.0)  # what is left of its group
            deadline = time.monotonic() + self.cfg.heartbeat_timeout_s + 5
            while name in self._connected() and time.monotonic() < deadline:  # the service lets it go first
                time.sleep(0.1)
            self._start_executor(name)
            self._write_processes()

    # -- stop -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for child in self.executors.values():
            child.stop(5.0)
        if self.serve is not None:
            self.serve.stop(10.0)


def _why(code: int) -> str:
    return {3: "declared lost by the service", 4: "a worker rank died"}.get(
        code, f"killed by {signal.Signals(-code).name}" if code < 0 else "unexpected exit")


# --- the trace clock ------------------------------------------------------------------------------

class TraceClock:
    """Trace seconds from service (Unix) seconds: ``base + (t - origin)`` plus the idle time skipped before ``t``."""

    def __init__(self, base: float, origin: float) -> None:
        self.base, self.origin = base, origin
        self._at: list[float] = []  # service time of each skip
        self._skip: list[float] = []  # skipped so far, after it
        self.skipped = 0.0

    def skip(self, at: float, seconds: float) -> None:
        self.skipped += seconds
        self._at.append(at)
        self._skip.append(self.skipped)

    def __call__(self, t: float) -> float:
        i = bisect.bisect_right(self._at, t) - 1
        return self.base + (t - self.origin) + (self._skip[i] if i >= 0 else 0.0)


# --- the run ------------------------------------------------------------------------------------

def run(cfg: RunConfig, say: Callable[[str], None] = print,
        progress: Callable[[Progress], None] | None = None) -> RunOutcome:
    """Start, replay, wait, measure, stop. ``RunError`` when it cannot; every process is stopped either way."""
    records, cluster, requests = resolve(cfg)
    temporary = cfg.state_dir is None
    state_dir = Path(tempfile.mkdtemp(prefix="ditplan-run-")) if temporary else Path(cfg.state_dir)
    if (state_dir / "service").exists():
        raise InputError(f"--state-dir {str(state_dir)!r} holds an earlier run's journal; give a fresh directory")
    state_dir.mkdir(parents=True, exist_ok=True)
    dep = Deployment(cfg, state_dir)
    ok = False
    try:
        dep.start(cfg.cluster or cluster.name)
        say(f"ditplan run: service {dep.address}, {len(dep.executors)} executor(s) x {cfg.per_executor} rank(s) on "
            f"{cluster.name}; state {state_dir}")
        policy = dep.client.info().policy
        clock = _replay(cfg, dep, records, say, progress)
        outcome = _measure(dep, policy, requests, cluster, clock, state_dir)
        ok = not outcome.problems  # a timeline the checker refuses keeps its logs
        return outcome
    except RunError as exc:
        raise RunError(f"{exc}\nlogs and journal kept in {state_dir}") from None
    finally:
        dep.close()
        if temporary and ok:
            shutil.rmtree(state_dir, ignore_errors=True)


def _replay(cfg: RunConfig, dep: Deployment, records: Sequence[TraceRecord], say: Callable[[str], None],
            progress: Callable[[Progress], None] | None) -> TraceClock:
    """Submit each record at its arrival on the trace clock, supervising, until every request has ended."""
    from ditplan.planner.service.client import PlannerError, spec_from_record

    client = dep.client
    groups = _groups(records)
    clock = TraceClock(groups[0][0].arrival, time.time())
    submitted = 0
    idle = False  # every request submitted so far has ended: nothing can happen until the next arrival
    next_poll = 0.0
    last_submit = time.monotonic()
    while True:
        dep.supervise(say)
        if groups and clock(time.time()) >= groups[0][0].arrival - 1e-9:
            group = groups.pop(0)
            try:
                submitted += len(client.submit([spec_from_record(r) for r in group]))
            except PlannerError as exc:
                raise RunError(f"the service refused requests {[r.id for r in group][:5]}: "
                               f"{exc.code.name}: {exc.details}") from None
            last_submit, idle = time.monotonic(), False
            continue
        if time.monotonic() >= next_poll:
            next_poll = time.monotonic() + POLL_S
            counts = client.info().requests_by_state
            ended = sum(counts.get(s, 0) for s in TERMINAL)
            idle = ended == submitted
            if progress is not None:
                on_time = sum(1 for v in client.list(states=["done"]) if meets(v.finish, v.deadline))
                progress(Progress(submitted, len(records), ended, on_time, sum(dep.restarts.values())))
            if not groups and idle:
                dep.supervise(say, restart=False)
                return clock
            if not groups and time.monotonic() - last_submit > cfg.timeout_s:
                left = [f"{v.id} ({v.state}, {v.steps_done}/{v.steps} steps)" for v in client.list()
                        if v.state not in TERMINAL]
                raise RunError(f"{len(left)} request(s) did not end within --timeout {cfg.timeout_s:g} s of the "
                               f"last arrival: {', '.join(left[:10])}{' ...' if len(left) > 10 else ''}")
        wait = TICK_S
        if groups:
            to_due = groups[0][0].arrival - clock(time.time())
            if idle and cfg.speed > 1 and to_due > 0:  # nothing live: skip all of the gap but 1/speed of it
                sleep = min(TICK_S, to_due / cfg.speed)
                time.sleep(sleep)
                clock.skip(time.time(), min(to_due, sleep * cfg.speed) - sleep)
                continue
            wait = max(0.0, min(TICK_S, to_due))
        time.sleep(wait)


def _groups(records: Sequence[TraceRecord]) -> list[list[TraceRecord]]:
    """Records by arrival (same arrival: one Submit, up to ``SUBMIT_CHUNK``)."""
    out: list[list[TraceRecord]] = []
    for r in sorted(records, key=lambda r: r.arrival):
        if out and out[-1][0].arrival == r.arrival and len(out[-1]) < SUBMIT_CHUNK:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _measure(dep: Deployment, policy: str, requests: Sequence[Request], cluster: Cluster, clock: TraceClock,
              state_dir: Path) -> RunOutcome:
    """The run as a ``SimResult`` on the trace clock, its summary and its check."""
    from ditplan.planner.checker import check_timeline

    client = dep.client
    tl = client.timeline_all()
    if tl.dropped:
        raise RunError(f"the service kept only the last {tl.total - tl.dropped} of {tl.total} segments: the "
                       "timeline would be incomplete")
    views = {v.id: v for v in client.list()}
    statuses = []
    for req in requests:
        v = views[req.id]
        st = RequestStatus(req, encoded=v.encoded, steps_done=v.steps_done, preemptions=v.preemptions,
                           sp_changes=v.sp_changes, migrations=v.migrations)
        st.sp = v.sp
        if v.state == "done":
            st.state, st.finish = RequestState.DONE, clock(v.finish)
        else:
            st.state = RequestState.FAILED
            st.rejected = v.reason if v.state == "rejected" else None
        statuses.append(st)
    segments = [Segment(g.request_ids, g.stage, g.gpus, g.steps, clock(g.start), clock(g.end)) for g in tl.segments]
    end = max([g.end for g in segments] + [s.finish for s in statuses if s.finish is not None], default=0.0)
    result = SimResult(policy, statuses, segments, [], tl.fallbacks, tl.plans, end)
    summary = summarize(result)
    # the service timed every plan; the SimResult holds none of them (no per-plan list crosses the wire)
    summary["solver_ms"] = {k: None if x is None else round(x, 6) for k, x in tl.solver_ms.items()}
    records = timeline_records(result)
    problems = check_timeline(requests, cluster, [r for r in records if r["type"] == "segment"],
                              {r["id"]: r for r in records if r["type"] == "request"})
    log = dep.checkpoint_dir / RESUME_LOG
    resumed = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    return RunOutcome(policy, result, summary, problems, dict(dep.restarts), resumed, clock.skipped, state_dir)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP end a run like Ctrl-C (``KeyboardInterrupt``), so every process is stopped."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def fmt_restarts(restarts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(restarts.items())) or "none"

