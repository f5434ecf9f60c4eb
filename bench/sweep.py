"""SLO attainment against arrival rate and against SLO scale, per policy.

Runs every policy on the same seeded TetriServe-style traces (``planner.workloads``) and writes a CSV and a PNG. Usage:

    python -m bench.sweep [--workloads tetriserve-uniform tetriserve-skewed]
                          [--policies fcfs-sp1 ... tetriserve-dp] [--n 300] [--seeds 0 1]
                          [--scales 3 5 10] [--rates 8 16] [--no-rates]

The CSP comparison (issue: PatchedServe's workload on 8xH100):

    python -m bench.sweep --workloads patchedserve-mixed --scales 3 5 10 --rates 8 16 --no-rates \
        --policies distrifusion nirvana-like patchedserve cpsat cpsat-nocsp genserve --n 300 --seeds 0 1
"""
from __future__ import annotations

import argparse
import itertools
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench import write_csv

DEFAULT_POLICIES = ["fcfs-sp1", "fcfs-sp2", "fcfs-sp4", "fcfs-sp8", "rssp", "edf", "tetriserve-dp"]
SMALL_SCALES = [1.25, 1.5, 2.0]
DEFAULT_WORKLOADS = ["tetriserve-uniform", "tetriserve-skewed"]
SCALES = [1.0, 1.1, 1.25, 1.5, 2.0, 3.0]
RATE_FACTORS = [0.5, 0.75, 1.0, 1.25, 1.5]  # x the workload's default rate
FIXED_SCALE = 1.5  # SLO scale of the rate sweep


OURS = ("cpsat", "milp", "milp-highs")


def one(job: tuple) -> dict:
    workload, policy, rate, scale, n, seed, cluster_spec = job
    from ditplan.models.cost import CostModel
    from ditplan.planner.cluster import parse_cluster
    from ditplan.planner.simulator import SimConfig
    from ditplan.planner.whatif import run_policies, to_requests
    from ditplan.planner.workloads import generate

    cluster = parse_cluster(cluster_spec)
    cost = CostModel(cluster.kind)
    records = generate(workload, n=n, rate=rate, seed=seed)
    reqs = to_requests(records, cost, cluster, scale)
    t0 = time.perf_counter()
    run = run_policies(reqs, cluster, cost, [policy], SimConfig(seed=seed))[policy]
    return {"workload": workload, "policy": policy, "rate": rate, "slo_scale": scale, "seed": seed,
            "slo_attainment": run.summary["slo_attainment"], "p99_s": run.summary["latency_s"]["p99"],
            "gpu_seconds": run.summary["gpu_seconds"], "sim_s": round(time.perf_counter() - t0, 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description="SLO attainment sweeps")
    ap.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS)
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    ap.add_argument("--cluster", default="8xH100")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--csv", type=Path, default=Path("out/sweep.csv"))
    ap.add_argument("--png", type=Path, default=Path("out/sweep.png"))
    ap.add_argument("--small-n", type=int, default=0,
                    help="also compare with offline-bound on small traces of this many requests (e.g. 40)")
    ap.add_argument("--small-workloads", nargs="+", default=["tetriserve-skewed", "genserve-mixed"])
    ap.add_argument("--offline-limit", type=float, default=20.0, help="offline-bound CP-SAT limit, s")
    ap.add_argument("--scales", type=float, nargs="+", default=SCALES, help="SLO scales of the scale sweep")
    ap.add_argument("--no-rates", action="store_true", help="skip the arrival-rate sweep")
    ap.add_argument("--scale-rate", action="store_true",
                    help="scale the workload's rate (and --n) by the cluster's GPUs / 8, for clusters past 8 GPUs")
    ap.add_argument("--rates", type=float, nargs="+", default=None,
                    help="arrival rates (req/s) of the scale sweep, one table each (default: the workload's rate)")
    args = ap.parse_args(argv)
    SCALES[:] = list(args.scales)
    if args.policies == ["all"]:
        from ditplan.planner.policies.base import policy_names

        args.policies = policy_names()

    from ditplan.planner.cluster import parse_cluster

    factor = parse_cluster(args.cluster).size / 8 if args.scale_rate else 1.0
    args.n = int(round(args.n * factor))
    args.rate_factor = factor
    if args.rates is not None and any(r <= 0 for r in args.rates):
        ap.error(f"--rates must be positive, got {args.rates}")
    jobs = []
    for wl in args.workloads:
        for pol, seed in itertools.product(args.policies, args.seeds):
            for base in bases(wl, args):
                jobs += [(wl, pol, base, s, args.n, seed, args.cluster) for s in SCALES]
            if not args.no_rates:
                base = bases(wl, args)[0]
                jobs += [(wl, pol, round(base * f, 6), FIXED_SCALE, args.n, seed, args.cluster)
                         for f in RATE_FACTORS if f != 1.0]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(one, jobs, chunksize=4))
    print(f"{len(rows)} simulations in {time.perf_counter() - t0:.1f} s")
    write_csv(args.csv, rows)
    report(rows, args)
    plot(rows, args)
    if args.small_n:
        small(args)
    return rows


def bases(workload: str, args) -> list[float]:
    """Arrival rates of the scale sweep: ``--rates``, else the workload's default (times the cluster factor)."""
    from ditplan.planner.workloads import WORKLOADS

    return list(args.rates) if args.rates else [round(WORKLOADS[workload].default_rate * args.rate_factor, 6)]


def small_one(job: tuple) -> dict:
    """Every policy and the offline bound on one small trace."""
    workload, scale, n, seed, cluster_spec, policies, limit = job
    from ditplan.models.cost import CostModel
    from ditplan.planner.cluster import parse_cluster
    from ditplan.planner.offline import solve_offline
    from ditplan.planner.simulator import SimConfig
    from ditplan.planner.whatif import run_policies, to_requests
    from ditplan.planner.workloads import WORKLOADS, generate

    cluster = parse_cluster(cluster_spec)
    cost = CostModel(cluster.kind)
    # Same mean load as the big sweep: the workload's default rate.
    reqs = to_requests(generate(workload, n=n, rate=WORKLOADS[workload].default_rate, seed=seed),
                       cost, cluster, scale)
    runs = run_policies(reqs, cluster, cost, policies, SimConfig(seed=seed))
    off = solve_offline(reqs, cluster, cost, time_limit_s=limit, num_workers=1, seed=seed)
    row = {"workload": workload, "slo_scale": scale, "seed": seed, "n": n,
           "offline_best": off.attainment, "offline_upper_bound": off.upper_bound, "offline_status": off.status}
    row.update({p: r.summary["slo_attainment"] for p, r in runs.items()})
    return row


def small(args) -> None:
    from rich.console import Console
    from rich.table import Table

    jobs = [(wl, sc, args.small_n, seed, args.cluster, args.policies, args.offline_limit)
            for wl in args.small_workloads for sc in SMALL_SCALES for seed in args.seeds]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(small_one, jobs))
    path = args.csv.with_name(args.csv.stem + "-small.csv")
    write_csv(path, rows)
    t = Table(title=f"small traces ({args.small_n} requests, {args.cluster}): SLO attainment, mean of seeds "
                    f"{args.seeds}; offline = best schedule found / proven upper bound")
    for c in ("workload", "scale", *args.policies, "offline best", "upper bound"):
        t.add_column(c, justify="right")
    for wl in args.small_workloads:
        for sc in SMALL_SCALES:
            rs = [r for r in rows if r["workload"] == wl and r["slo_scale"] == sc]
            mean = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
            t.add_row(wl, str(sc), *(f"{mean(p):.3f}" for p in args.policies),
                      f"{mean('offline_best'):.3f}", f"{mean('offline_upper_bound'):.3f}")
    Console(width=200).print(t)
    print(f"wrote {path}")


def _mean(rows, **match) -> float:
    vals = [r["slo_attainment"] for r in rows if all(r[k] == v for k, v in match.items())]
    return float(np.mean(vals)) if vals else float("nan")


def report(rows: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=200)
    for wl, base in ((wl, b) for wl in args.workloads for b in bases(wl, args)):
        t = Table(title=f"{wl}: SLO attainment vs SLO scale (rate {base}/s, {args.cluster}, "
                        f"mean of seeds {args.seeds})")
        t.add_column("policy")
        for s in SCALES:
            t.add_column(f"x{s}", justify="right")
        for p in args.policies:
            t.add_row(p, *(f"{_mean(rows, workload=wl, policy=p, slo_scale=s, rate=base):.3f}" for s in SCALES))
        con.print(t)
        for p in args.policies:
            if all(_mean(rows, workload=wl, policy=p, slo_scale=s, rate=base) == 0 for s in SCALES):
                con.print(f"  [bold red]{p} met no request at any scale (rate {base}/s): check it[/]")
        peers = [p for p in args.policies if p not in OURS]
        if "cpsat" in args.policies and peers:
            for s in SCALES:
                best = max(peers, key=lambda p: _mean(rows, workload=wl, policy=p, slo_scale=s, rate=base))
                b = _mean(rows, workload=wl, policy=best, slo_scale=s, rate=base)
                c = _mean(rows, workload=wl, policy="cpsat", slo_scale=s, rate=base)
                con.print(f"  x{s}: cpsat {c:.3f} vs best peer {best} {b:.3f}: {100 * (c - b):+.1f} points")
        fixed = [p for p in args.policies if p.startswith("fcfs-sp")]
        if "tetriserve-dp" in args.policies and fixed:
            gaps = []
            for s in SCALES:
                best_fixed = max(_mean(rows, workload=wl, policy=p, slo_scale=s, rate=base) for p in fixed)
                dp = _mean(rows, workload=wl, policy="tetriserve-dp", slo_scale=s, rate=base)
                gaps.append((s, best_fixed, dp))
            tight = gaps[0]
            con.print(f"  tightest scale x{tight[0]}: best fixed degree {tight[1]:.3f}")
            for s, bf, dp in gaps:
                if s <= 1.5:
                    con.print(f"  x{s}: tetriserve-dp {dp:.3f} vs best fixed {bf:.3f}: {100 * (dp - bf):+.1f} points")


def plot(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_rates = not getattr(args, "no_rates", False)
    cols = [(wl, b) for wl in args.workloads for b in bases(wl, args)]
    fig, axes = plt.subplots(2 if with_rates else 1, len(cols),
                             figsize=(6 * len(cols), 8 if with_rates else 4.5), squeeze=False)
    for col, (wl, base) in enumerate(cols):
        rates = sorted({r["rate"] for r in rows if r["workload"] == wl})
        for p in args.policies:
            style = {"linewidth": 2.5} if p in ("tetriserve-dp", "cpsat", "patchedserve") else {"linewidth": 1.2}
            axes[0][col].plot(SCALES, [_mean(rows, workload=wl, policy=p, slo_scale=s, rate=base) for s in SCALES],
                              marker="o", label=p, **style)
            if with_rates:
                axes[1][col].plot(rates, [_mean(rows, workload=wl, policy=p, slo_scale=FIXED_SCALE, rate=r)
                                          for r in rates], marker="o", label=p, **style)
        axes[0][col].set(title=f"{wl} (rate {base}/s)", xlabel="SLO scale", ylabel="SLO attainment", ylim=(0, 1.02))
        if with_rates:
            axes[1][col].set(title=f"{wl} (SLO scale {FIXED_SCALE})", xlabel="arrival rate (req/s)",
                             ylabel="SLO attainment", ylim=(0, 1.02))
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"ditplan sweep on {args.cluster}, {args.n} requests, seeds {args.seeds}")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.csv} and {args.png}")


if __name__ == "__main__":
    main()
