"""Calibration error of the cost model's roofline on the published tables.

The table itself is reproduced exactly (tests/test_cost_model.py); this
reports how well the *roofline* alone fits the profiled points (in sample),
and how well the L20-calibrated roofline transfers to the held-out H100 points
from PatchedServe (out of sample). Usage: python -m bench.calibration [--csv F]
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench import write_csv
from ditplan.models.catalog import get_model
from ditplan.models.cost import CostModel
from ditplan.models.profiles import builtin_profiles


def rows() -> list[dict]:
    out = []
    for prof in builtin_profiles(role=None):
        cm = CostModel(prof.gpu, builtin_profiles())
        for p in prof.points:
            m = get_model(p.model)
            pred = (cm.roofline_step(m, p.shape, p.sp, p.batch) if prof.role == "profile"
                    else cm.step_time(m, p.shape, p.sp, p.batch))
            out.append({"table": prof.name, "role": prof.role, "gpu": prof.gpu, "model": p.model,
                        "shape": str(p.shape), "sp": p.sp, "published_s": p.step_s,
                        "predicted_s": round(pred, 5), "rel_err": round((pred - p.step_s) / p.step_s, 4)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=Path("out/calibration.csv"))
    args = ap.parse_args()
    data = rows()
    write_csv(args.csv, data)
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in data:
        groups[(r["table"], r["gpu"], r["model"])].append(abs(r["rel_err"]))
    t = Table(title="roofline calibration: |predicted - published| / published")
    for c in ("table", "GPU", "model", "points", "median", "max"):
        t.add_column(c)
    for (table, gpu, model), errs in groups.items():
        t.add_row(table, gpu, model, str(len(errs)), f"{np.median(errs):.1%}", f"{max(errs):.1%}")
    every = [abs(r["rel_err"]) for r in data if r["role"] == "profile"]
    held = [abs(r["rel_err"]) for r in data if r["role"] == "validation"]
    t.add_row("all profiled", "", "", str(len(every)), f"{np.median(every):.1%}", f"{max(every):.1%}")
    if held:
        t.add_row("held out", "", "", str(len(held)), f"{np.median(held):.1%}", f"{max(held):.1%}")
    Console().print(t)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
