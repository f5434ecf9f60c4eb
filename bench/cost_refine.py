"""Cost of a step-time lookup on a corrected cost model (cost refinement) vs the plain one.

The policies ask ``CostModel.step_time`` for every candidate block; a running service hands them a
``CorrectedCostModel`` view once its refiner has estimates. Interleaved in random order in this one
process, ratios of medians against the plain model's lookup measured in the same run.
Usage: python -m bench.cost_refine [--repeats 40] [--number 20000]
"""
from __future__ import annotations

import argparse
import random
import statistics
import timeit

from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--number", type=int, default=20000, help="lookups per timing")
    args = ap.parse_args()
    plain = CostModel("H100")
    flux, shape = get_model("flux-dev"), Shape(1024, 1024)
    view = plain.with_corrections({("flux-dev", shape, 2, 1): 0.9})
    cases = {"plain CostModel": lambda: plain.step_time(flux, shape, 2),
             "view, corrected key": lambda: view.step_time(flux, shape, 2),
             "view, key at its prior": lambda: view.step_time(flux, shape, 4)}
    for f in cases.values():
        f()  # fill the caches: the policies' steady state
    times: dict[str, list[float]] = {k: [] for k in cases}
    rng = random.Random(0)
    for _ in range(args.repeats):
        for name in rng.sample(list(cases), len(cases)):
            times[name].append(timeit.timeit(cases[name], number=args.number) / args.number)
    base = statistics.median(times["plain CostModel"])
    print(f"{'lookup':<24}{'median ns':>10}{'ratio':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<24}{med * 1e9:>10.0f}{med / base:>8.2f}")


if __name__ == "__main__":
    main()
