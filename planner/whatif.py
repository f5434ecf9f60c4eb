"""Offline what-if: one trace, one cluster, several policies, same seed."""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import Cluster
from ditplan.planner.policies.base import policy_names
from ditplan.planner.request import Request
from ditplan.planner.runners import PolicyRun, RunOptions, get_runner, runner_names
from ditplan.planner.simulator import SimConfig
from ditplan.planner.traces import TraceRecord, ideal_latency_from, resolve_deadlines


def to_requests(records: Sequence[TraceRecord], cost: CostModel, cluster: Cluster,
                slo_scale: float) -> list[Request]:
    """Requests with deadlines; ``slo_scale`` is relative to the ideal latency on ``cluster``."""
    return resolve_deadlines(records, ideal_latency_from(cost, cluster.max_node_gpus), slo_scale)


# The PuLP MILP policies: minutes on a few hundred requests (500 requests: milp 325 s, milp-highs 135 s),
# so ``--policy all`` leaves them out and ``--policy all+milp`` takes them too.
SLOW_POLICIES = ("milp", "milp-highs")


def expand_policies(requested: Sequence[str], default: Sequence[str]) -> list[str]:
    """The policies ``--policy`` names, in order, without repeats; every runner is known (``planner/runners.py``).

    ``all`` is every round policy but the slow MILP ones (``SLOW_POLICIES``);
    ``all+milp`` adds the MILP ones; a runner that is not a round policy
    (``offline-bound``) runs only by its name. No names: ``default`` (those of
    it that are known).
    """
    known = runner_names()
    if not requested:
        return [p for p in default if p in known]
    rounds = policy_names()
    chosen: list[str] = []
    for p in requested:
        if p == "all":
            names = [k for k in rounds if k not in SLOW_POLICIES]
        elif p == "all+milp":
            names = rounds
        else:
            names = [p]
        for n in names:
            if n not in known:
                raise ValueError(f"--policy {n!r} is unknown; known: {', '.join(known)} "
                                 "(or 'all', 'all+milp' with the slow MILP policies)")
            if n not in chosen:
                chosen.append(n)
    return chosen


def gantt_policies(names: Sequence[str], requested: str | None = None) -> list[str]:
    """The policies to draw a Gantt chart of: ``requested`` (a policy run, or ``all``: one chart each);
    by default the one the user cares about, ``cpsat`` if it ran, else the first given."""
    if requested == "all":
        return list(names)
    if requested is not None:
        if requested not in names:
            raise ValueError(f"--gantt-policy {requested!r} is not among the policies run ({', '.join(names)}); "
                             "name one of them, or 'all'")
        return [requested]
    return ["cpsat"] if "cpsat" in names else list(names[:1])


def fmt_duration(seconds: float) -> str:
    """``7.2 s``, ``5m 25s``, ``1h 02m``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


class PolicyProgress:
    """Progress of a what-if run, one policy after another, as lines for a log.

    ``update`` (the ``run_policies`` progress callback) emits at most one
    line per ``every_s`` wall seconds: the policy, its requests finished,
    its elapsed time and its ETA (elapsed x unfinished / finished, so it
    sharpens as the run goes). ``done`` emits one line per policy with its
    wall time. ``every_s=inf`` keeps only the ``done`` lines (a terminal
    shows a live bar instead).
    """

    def __init__(self, names: Sequence[str], emit: Callable[[str], None], every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.names, self.emit, self.every_s, self.clock = list(names), emit, every_s, clock
        self._t0: dict[str, float] = {}
        self._last = -math.inf

    def _tag(self, name: str) -> str:
        return f"[{self.names.index(name) + 1}/{len(self.names)}] {name}"

    def start(self, name: str) -> None:
        self._t0[name] = self._last = self.clock()

    def eta(self, name: str, done: int, total: int) -> float:
        elapsed = self.clock() - self._t0[name]
        return elapsed * (total - done) / done if done else math.inf

    def update(self, name: str, done: int, total: int) -> None:
        now = self.clock()
        if name not in self._t0:
            self.start(name)
            return
        if now - self._last < self.every_s:
            return
        self._last = now
        self.emit(f"{self._tag(name)}: {done}/{total} requests finished, {fmt_duration(now - self._t0[name])}, "
                  f"ETA {fmt_duration(self.eta(name, done, total))}")

    def done(self, name: str, run: "PolicyRun", seconds: float) -> None:
        s = run.summary
        self.emit(f"{self._tag(name)}: done in {fmt_duration(seconds)} ({s['finished']}/{s['requests']} finished, "
                  f"SLO {'-' if s['slo_attainment'] is None else format(s['slo_attainment'], '.3f')})")


@contextmanager
def native_stdout_silenced() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null for the block.

    Native solver code writes there behind Python's back: HiGHS prints its
    banner from C the first time a ``Highs`` object is made, ahead of the
    what-if table. Python-level output is flushed first; nothing meant for
    stdout should be written inside the block.
    """
    for stream in (sys.stdout, sys.__stdout__):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def run_policies(requests: Sequence[Request], cluster: Cluster, cost: CostModel,
                 policies: Sequence[str], config: SimConfig,
                 progress: Callable[[str, int, int], None] | None = None,
                 offline_budget_s: float = 4.0, late: str = "serve",
                 on_start: Callable[[str], None] | None = None,
                 on_done: Callable[[str, PolicyRun, float], None] | None = None) -> dict[str, PolicyRun]:
    """Run each policy on the same requests with its runner (``planner/runners.py``).

    A round policy runs through the simulator, a fresh policy object per run.
    ``offline-bound`` solves the whole trace with CP-SAT (``offline_budget_s``
    deterministic seconds, so the result repeats for a seed) and its summary
    adds ``slo_attainment_upper_bound``, the proven bound on any policy's
    attainment. ``late`` (``serve`` or ``reject``) is what the solver policies
    do with requests that can no longer make their deadline; the peers always
    serve them. ``on_start(name)`` and ``on_done(name, run, wall_seconds)``
    bracket each policy's run.
    """
    out: dict[str, PolicyRun] = {}
    for name in policies:
        t0 = time.perf_counter()
        if on_start:
            on_start(name)
        cb = (lambda done, total, _n=name: progress(_n, done, total)) if progress else None
        out[name] = get_runner(name)(requests, cluster, cost, RunOptions(config, late, offline_budget_s, cb))
        if on_done:
            on_done(name, out[name], time.perf_counter() - t0)
    return out
