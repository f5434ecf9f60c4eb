"""Simulator speed: 1,000 requests with tetriserve-dp on 8 GPUs (target <= 10 s).

Reports the median of several repetitions (wall time of Simulator.run alone)
and, as a baseline from the same run, fcfs-sp1 on the same trace.
Usage: python -m bench.simspeed [--n 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

from ditplan.models.cost import CostModel
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.policies.base import make_policy
from ditplan.planner.simulator import SimConfig, Simulator
from ditplan.planner.whatif import to_requests
from ditplan.planner.workloads import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workload", default="tetriserve-skewed")
    ap.add_argument("--cluster", default="8xH100")
    ap.add_argument("--policy", default="tetriserve-dp")
    ap.add_argument("--baseline", default="fcfs-sp1")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cluster = parse_cluster(args.cluster)
    cost = CostModel(cluster.kind)
    reqs = to_requests(generate(args.workload, n=args.n, seed=0), cost, cluster, 1.5)
    times: dict[str, list[float]] = {args.policy: [], args.baseline: []}
    plans = {}
    for _ in range(args.repeats):
        for name in times:
            t0 = time.perf_counter()
            res = Simulator(cluster, cost, make_policy(name), SimConfig(seed=0)).run(reqs)
            times[name].append(time.perf_counter() - t0)
            plans[name] = (res.plans, len(res.segments))
    for name, ts in times.items():
        print(f"{name:>14}: median {statistics.median(ts):.2f} s over {args.repeats} runs "
              f"(min {min(ts):.2f}, max {max(ts):.2f}); {plans[name][0]} plans, {plans[name][1]} segments")
    med = statistics.median(times[args.policy])
    print(f"{args.n} requests, {args.policy} on {args.cluster}: {med:.2f} s "
          f"(target <= 10 s: {'met' if med <= 10 else 'NOT met'}); "
          f"ratio to {args.baseline}: {med / statistics.median(times[args.baseline]):.2f}x")


if __name__ == "__main__":
    main()
