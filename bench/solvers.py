"""Solver comparison on planning instants drawn from simulations.

For each cell (GPUs x live requests) it simulates an overloaded
``genserve-mixed`` trace (driven by ``edf``, which is cheap) and keeps the
round problems seen while the number of waiting requests is near the target.
The problems are written to ``out/solver-problems/`` and reloaded, so every
backend is fed exactly the same inputs: the schedule data of each scope the
``cpsat`` policy solves at that instant (``SchedulePolicy.solved_scopes``).

* ``plan``: the whole ``cpsat`` plan call on the problem (scopes, schedule
  data, warm start, CP-SAT, commit, best-effort fill) by a fresh policy: the
  figure the latency targets are about;
* ``cpsat``: CP-SAT alone at the policy's deterministic budget, warm-started
  as the policy does;
* ``cpsat-ref``: the same model with a long limit, for a tight bound;
* ``milp-cbc`` / ``milp-highs``: the PuLP twin (skipped past --milp-max-jobs);
* ``greedy``: the warm-start list schedule, scored by ``solution.evaluate``.

Reported per backend and cell: time p50 / p99 (ms), and the gap to the best
bound any backend proved (objectives summed over the scopes). Usage:
python -m bench.solvers [--quick]
"""
from __future__ import annotations

import ditplan.planner.solvers  # noqa: F401  (ortools before pulp: shared libhighs, see planner/solvers)

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench import write_csv
from ditplan.models.cost import CostModel
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.policies.base import make_policy
from ditplan.planner.policies.solver import CpSatPolicy
from ditplan.planner.problem import RoundProblem, build_problem, load_problems, save_problems
from ditplan.planner.simulator import SimConfig, Simulator
from ditplan.planner.solvers import cpsat, milp
from ditplan.planner.solvers.data import Weights, build_schedule
from ditplan.planner.solvers.greedy import greedy
from ditplan.planner.whatif import to_requests
from ditplan.planner.workloads import generate

GPUS = (8, 32, 128)
LIVE = (16, 64, 256, 1000)
TARGETS = {(8, 64): 50.0, (128, 1000): 500.0}  # plan-call p99 ms


class _Enough(Exception):
    pass


def draw_problems(gpus: int, live: int, count: int) -> list[RoundProblem]:
    """Round problems with about ``live`` waiting requests on ``gpus`` H100s.

    Each seed simulates a burst of ``live`` requests (arrivals within ~1 s)
    on an already busy cluster and keeps up to two problems whose waiting
    count is within [0.8, 1.25] x ``live``; seeds continue until ``count``.
    """
    cluster = parse_cluster("8xH100" if gpus == 8 else f"{gpus // 8}x8xH100")
    cost = CostModel(cluster.kind)
    got: list[RoundProblem] = []
    for seed in range(4 * count):
        records = generate("genserve-mixed", n=live + gpus, rate=float(live + gpus), seed=seed)
        reqs = to_requests(records, cost, cluster, 2.0)
        mine: list[RoundProblem] = []

        def on_plan(state, plan):
            waiting = len(state.waiting())
            if 0.8 * live <= waiting <= 1.25 * live and (not mine or state.now >= mine[-1].now + 0.2):
                mine.append(build_problem(state))
                if len(mine) >= 2 or len(got) + len(mine) >= count:
                    raise _Enough

        try:
            Simulator(cluster, cost, make_policy("edf"), SimConfig(seed=seed, check_plans=False),
                      on_plan=on_plan).run(reqs)
        except _Enough:
            pass
        got.extend(mine)
        if len(got) >= count:
            break
    return got


def run_backends(p: RoundProblem, args) -> list[dict]:
    policy = CpSatPolicy()
    t0 = time.perf_counter()
    policy.plan_problem(p)
    plan_ms = (time.perf_counter() - t0) * 1e3
    scopes = [build_schedule(p, reqs, gpus, policy.params) for gpus, reqs in CpSatPolicy().solved_scopes(p)]
    jobs = sum(len(d.jobs) for d in scopes)
    alts = sum(len(j.alts) for d in scopes for j in d.jobs)
    rows = [{"backend": "plan", "status": "-", "objective": None, "bound": None, "ms": plan_ms,
             "jobs": jobs, "alternatives": alts}]

    def run(name, solve_one):
        objective, bound, ms, statuses = 0, 0, 0.0, []
        for data in scopes:
            t = time.perf_counter()
            s = solve_one(data)
            ms += (time.perf_counter() - t) * 1e3
            statuses.append(s.status.value)
            objective = None if objective is None or s.objective is None else objective + s.objective
            bound = None if bound is None or s.bound is None else bound + s.bound
        status = "optimal" if all(x == "optimal" for x in statuses) else ",".join(sorted(set(statuses))) or "-"
        rows.append({"backend": name, "status": status, "objective": objective, "bound": bound, "ms": ms,
                     "jobs": jobs, "alternatives": alts})

    run("cpsat", lambda d: cpsat.solve(d, policy.time_limit_s, greedy(d), seed=policy.seed))
    run("cpsat-ref", lambda d: cpsat.solve(d, args.ref_limit, greedy(d)))
    if jobs <= args.milp_max_jobs:
        for solver in ("cbc", "highs"):
            run(f"milp-{solver}", lambda d, s=solver: milp.solve(d, args.milp_limit, solver=s))
    run("greedy", lambda d: _scored(greedy(d)))
    return rows


def _scored(s):
    s.bound = None
    return s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="solver comparison on simulated round problems")
    ap.add_argument("--per-cell", type=int, default=6, help="problems per (GPUs, live) cell")
    ap.add_argument("--ref-limit", type=float, default=2.0)
    ap.add_argument("--milp-limit", type=float, default=5.0)
    ap.add_argument("--milp-max-jobs", type=int, default=12, help="skip the MILPs on instants with more jobs")
    ap.add_argument("--quick", action="store_true", help="8 and 32 GPUs, up to 64 live, 3 per cell")
    ap.add_argument("--dir", type=Path, default=Path("out/solver-problems"))
    ap.add_argument("--csv", type=Path, default=Path("out/solvers.csv"))
    ap.add_argument("--png", type=Path, default=Path("out/solvers.png"))
    args = ap.parse_args(argv)
    gpus, live = (GPUS[:2], LIVE[:2]) if args.quick else (GPUS, LIVE)
    per_cell = 3 if args.quick else args.per_cell

    rows = []
    for g in gpus:
        for n in live:
            path = args.dir / f"g{g}-n{n}.jsonl"
            save_problems(path, draw_problems(g, n, per_cell))
            problems = load_problems(path)  # every backend sees the file's problems
            if not problems:
                print(f"{g} GPUs / {n} live: no problem reached that load")
                continue
            for i, p in enumerate(problems):
                cell_rows = run_backends(p, args)
                best = min((r["bound"] for r in cell_rows if r["bound"] is not None), default=None)
                for r in cell_rows:
                    gap = None
                    if best is not None and r["objective"] is not None:
                        gap = max(0.0, (best - r["objective"]) / Weights().on_time)  # in on-time requests
                    rows.append({"gpus": g, "live": n, "waiting": len(p.requests), "problem": i,
                                 **r, "gap": gap})
            print(f"{g:>4} GPUs / {n:>4} live: {len(problems)} problems done", flush=True)
    write_csv(args.csv, rows)
    summary = report(rows)
    plot(summary, args.png)
    print(f"wrote {args.csv} and {args.png}")


def report(rows: list[dict]) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="schedule solvers: time (ms; plan = the whole plan call), gap to the best bound")
    for c in ("GPUs", "live", "backend", "jobs", "n", "p50 ms", "p99 ms", "optimal", "mean gap (req)", "max gap (req)"):
        t.add_column(c, justify="right")
    summary = []
    cells = sorted({(r["gpus"], r["live"]) for r in rows})
    backends = ["plan", "cpsat", "cpsat-ref", "milp-cbc", "milp-highs", "greedy"]
    for g, n in cells:
        for b in backends:
            rs = [r for r in rows if r["gpus"] == g and r["live"] == n and r["backend"] == b]
            if not rs:
                continue
            ms = [r["ms"] for r in rs]
            gaps = [r["gap"] for r in rs if r["gap"] is not None]
            s = {"gpus": g, "live": n, "backend": b, "p50": statistics.median(ms),
                 "p99": float(np.percentile(ms, 99)), "gap": float(np.mean(gaps)) if gaps else None}
            summary.append(s)
            t.add_row(str(g), str(n), b, f"{statistics.median(r['jobs'] for r in rs):.0f}", str(len(rs)), f"{s['p50']:.1f}",
                      f"{s['p99']:.1f}", f"{sum(r['status'] == 'optimal' for r in rs)}/{len(rs)}",
                      "-" if s["gap"] is None else f"{s['gap']:.3f}",
                      "-" if not gaps else f"{max(gaps):.3f}")
    Console(width=160).print(t)
    for (g, n), target in TARGETS.items():
        s = next((x for x in summary if x["gpus"] == g and x["live"] == n and x["backend"] == "plan"), None)
        if s:
            print(f"target plan-call p99 <= {target:.0f} ms at {g} GPUs / {n} live: measured {s['p99']:.1f} ms "
                  f"({'met' if s['p99'] <= target else 'NOT met'})")
    return summary


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(s["gpus"], s["live"]) for s in summary})
    labels = [f"{g}/{n}" for g, n in cells]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    backends = sorted({s["backend"] for s in summary})
    width = 0.8 / len(backends)
    for i, b in enumerate(backends):
        xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(cells))]
        get = {(s["gpus"], s["live"]): s for s in summary if s["backend"] == b}
        a1.bar(xs, [get[c]["p99"] if c in get else 0 for c in cells], width, label=b)
        a2.bar(xs, [(get[c]["gap"] or 0) if c in get else 0 for c in cells], width, label=b)
    a1.set_yscale("log")
    a1.set(title="solve time p99 (ms)", xlabel="GPUs / live requests")
    a2.set(title="mean gap to best bound (on-time requests)", xlabel="GPUs / live requests")
    for ax in (a1, a2):
        ax.set_xticks(range(len(cells)), labels, rotation=30)
        ax.grid(alpha=0.3, axis="y")
    a1.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
