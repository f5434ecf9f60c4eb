"""Gantt chart drawing time: `whatif`'s Gantt of edf on 2,000, 5,000 and 20,000 requests, before and after.

For each size the trace (tetriserve-uniform on 2x8xH100 at 1.8 req/s, a rate
16 H100s keep up with) is simulated once with edf, then its Gantt chart is
written with the current ``planner.plots.plot_gantt`` (``--repeats`` times,
median) and with the old drawing code path, one ``broken_barh`` per segment
per GPU (kept below as ``old_plot_gantt``, a verbatim copy of the function
before issue 11), in a forked child killed after ``--old-timeout`` seconds
(the old path took minutes at 5,000 requests and did not finish 20,000 in
16 minutes). The ratio is old / new, both measured in this run.

Usage: python -m bench.gantt [--sizes 2000 5000 20000] [--repeats 3] [--old-repeats 1]
                             [--old-timeout 120] [--csv out/gantt.csv]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from bench import write_csv  # noqa: E402
from ditplan.models.cost import CostModel  # noqa: E402
from ditplan.planner.cluster import parse_cluster  # noqa: E402
from ditplan.planner.plots import gantt_bars, plot_gantt  # noqa: E402
from ditplan.planner.sim_result import SimResult  # noqa: E402
from ditplan.planner.simulator import SimConfig  # noqa: E402
from ditplan.planner.whatif import run_policies, to_requests  # noqa: E402
from ditplan.planner.workloads import generate  # noqa: E402

STAGE_COLORS = {"encode": "#bdbdbd", "decode": "#636363"}


def old_plot_gantt(result: SimResult, n_gpus: int, path: str | Path, title: str = "") -> Path:
    """The Gantt chart before issue 11 (planner/plots.py at 12f08e6), kept here only to time it."""
    index = {s.id: i for i, s in enumerate(result.requests)}
    kinds = {s.id: s.request.kind for s in result.requests}
    palette = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (14, 15)]  # no greys
    fig, ax = plt.subplots(figsize=(11, 0.35 * n_gpus + 1.5))
    for seg in result.segments:
        lead = seg.request_ids[0]
        color = STAGE_COLORS.get(seg.stage.value) or palette[index[lead] % len(palette)]
        hatch = "///" if seg.stage.value == "diffuse" and kinds[lead] == "video" else None
        for g in seg.gpus:
            ax.broken_barh([(seg.start, seg.end - seg.start)], (g - 0.4, 0.8),
                           facecolors=color, edgecolors="none", hatch=hatch)
    ax.set_yticks(range(n_gpus), [f"GPU {g}" for g in range(n_gpus)])
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(title or f"{result.policy}: GPUs over time (colour = request)")
    handles = [Patch(facecolor="white", edgecolor="black", label="diffuse: image"),
               Patch(facecolor="white", edgecolor="black", hatch="///", label="diffuse: video")]
    handles += [Patch(color=c, label=s) for s, c in STAGE_COLORS.items()]
    ax.legend(handles=handles, fontsize=7, loc="upper right", ncols=4)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_CHILD: dict = {}  # what the forked child draws (inherited, not pickled)


def _old_child(path: str, out: str) -> None:
    t0 = time.perf_counter()
    old_plot_gantt(_CHILD["result"], _CHILD["n_gpus"], path)
    Path(out).write_text(repr(time.perf_counter() - t0))


def time_old(result: SimResult, n_gpus: int, path: Path, timeout_s: float) -> float | None:
    """Seconds the old path took to write ``path``, or None if it ran past ``timeout_s`` (killed)."""
    _CHILD.update(result=result, n_gpus=n_gpus)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t"
        p = mp.get_context("fork").Process(target=_old_child, args=(str(path), str(out)))
        p.start()
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            p.join()
            return None
        return float(out.read_text()) if p.exitcode == 0 and out.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 20000])
    ap.add_argument("--workload", default="tetriserve-uniform")
    ap.add_argument("--cluster", default="2x8xH100")
    ap.add_argument("--rate", type=float, default=1.8)
    ap.add_argument("--repeats", type=int, default=3, help="draws of the new path per size (median)")
    ap.add_argument("--old-repeats", type=int, default=1, help="draws of the old path per size (median)")
    ap.add_argument("--old-timeout", type=float, default=120.0, help="seconds an old draw may take (0: skip it)")
    ap.add_argument("--out-dir", type=Path, default=Path("out/bench-gantt"))
    ap.add_argument("--csv", type=Path, default=Path("out/gantt.csv"))
    args = ap.parse_args()
    cluster = parse_cluster(args.cluster)
    cost = CostModel(cluster.kind)
    rows = []
    print(f"edf on {args.cluster}, {args.workload} at {args.rate} req/s; new: median of {args.repeats}, "
          f"old: median of {args.old_repeats} (killed after {args.old_timeout:.0f} s)")
    for n in args.sizes:
        reqs = to_requests(generate(args.workload, n=n, rate=args.rate, seed=0), cost, cluster, 1.5)
        t0 = time.perf_counter()
        result = run_policies(reqs, cluster, cost, ["edf"], SimConfig(seed=0))["edf"].result
        sim_s = time.perf_counter() - t0
        new = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plot_gantt(result, cluster, args.out_dir / f"new-{n}.png")
            new.append(time.perf_counter() - t0)
        old: list[float] = []
        timed_out = False
        for _ in range(args.old_repeats if args.old_timeout > 0 else 0):
            t = time_old(result, cluster.size, args.out_dir / f"old-{n}.png", args.old_timeout)
            if t is None:
                timed_out = True
                break
            old.append(t)
        new_med = statistics.median(new)
        old_med = statistics.median(old) if old else None
        if old_med is not None:
            old_txt, ratio = f"{old_med:8.2f} s", f"{old_med / new_med:7.1f}x"
        elif timed_out:
            old_txt, ratio = f"> {args.old_timeout:.0f} s".rjust(10), f"> {args.old_timeout / new_med:.0f}x".rjust(8)
        else:
            old_txt, ratio = "-".rjust(10), "-".rjust(8)
        print(f"{n:>6} requests, {gantt_bars(result):>7,} bars: simulate {sim_s:6.2f} s | Gantt new {new_med:6.2f} s "
              f"(min {min(new):.2f}, max {max(new):.2f}) | old {old_txt} | old/new {ratio}", flush=True)
        rows.append({"requests": n, "segments": len(result.segments), "bars": gantt_bars(result),
                     "simulate_s": round(sim_s, 3), "new_median_s": round(new_med, 3),
                     "new_min_s": round(min(new), 3), "new_max_s": round(max(new), 3),
                     "old_median_s": None if old_med is None else round(old_med, 3),
                     "old_timed_out_after_s": args.old_timeout if timed_out else None,
                     "ratio_old_over_new": None if old_med is None else round(old_med / new_med, 2)})
    write_csv(args.csv, rows)
    print(f"wrote {args.csv} and the charts under {args.out_dir}/")


if __name__ == "__main__":
    main()
