"""``ditplan`` command line: what-if planning and trace tools."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from models.catalog import UnknownModelError
from models.profiles import ProfileError, load_profile, builtin_profiles
from planner.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ditplan: SLO-aware planning for diffusion serving.")
trace_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Generate and inspect traces.")
app.add_typer(trace_app, name="trace")

console = Console(stderr=True, soft_wrap=True)  # never break an error message mid-path
out = Console() if sys.stdout.isatty() else Console(width=160)  # tables unsquashed in logs and pipes

# The embedded default: what `ditplan whatif` runs with no trace or workload.
DEFAULT_WORKLOAD = "tetriserve-skewed"
DEFAULT_CLUSTER = "8xH100"
DEFAULT_SLO_SCALE = 1.5
BASELINES = ["fcfs-sp1", "fcfs-sp2", "fcfs-sp4", "fcfs-sp8", "rssp", "edf", "tetriserve-dp"]


def fail(message: str) -> "typer.Exit":
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


def _policies(requested: list[str]) -> list[str]:
    from planner.policies.base import policy_names

    known = policy_names()
    if not requested:
        return [p for p in BASELINES if p in known]
    chosen: list[str] = []
    for p in requested:
        names = known if p == "all" else [p]
        for n in names:
            if n not in known:
                raise InputError(f"--policy {n!r} is unknown; known: {', '.join(known)} (or 'all')")
            if n not in chosen:
                chosen.append(n)
    return chosen


@app.command()
def whatif(
    trace: Optional[Path] = typer.Option(None, help="Trace file (JSON Lines, or Hetu-DiT Request(...) lines)."),
    workload: Optional[str] = typer.Option(None, help="Built-in workload instead of a trace (see `ditplan trace list`)."),
    n: Optional[int] = typer.Option(None, min=1, help="Requests to generate with --workload."),
    rate: Optional[float] = typer.Option(None, min=1e-9, help="Arrival rate, req/s, with --workload."),
    cluster: str = typer.Option(DEFAULT_CLUSTER, help="8xH100, 2x8xL20, ... or a cluster JSON file."),
    policy: List[str] = typer.Option([], "--policy", "-p", help="Policy (repeatable, or 'all'). Default: the baselines."),
    slo_scale: float = typer.Option(DEFAULT_SLO_SCALE, min=1e-9,
                                    help="Deadline = arrival + scale x ideal latency, for requests without one."),
    seed: int = typer.Option(0, help="Seed of the workload and of step-time noise."),
    model: Optional[str] = typer.Option(None, help="Model for Hetu-DiT traces, which name none."),
    noise: float = typer.Option(0.0, min=0.0, help="Sigma of lognormal step-time noise."),
    round_s: float = typer.Option(2.0, min=1e-3, help="Planning round length, seconds."),
    profile: List[Path] = typer.Option([], help="Extra profile JSON (e.g. from `ditplan profile`)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write metrics per policy (DESIGN 3.3)."),
    timeline: Optional[Path] = typer.Option(None, help="Write the timeline JSONL (one policy only)."),
    plot: Optional[Path] = typer.Option(Path("out/whatif"), help="PNG prefix: PREFIX-attainment.png, PREFIX-gantt.png."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Write no plots."),
    gantt_policy: Optional[str] = typer.Option(None, help="Policy drawn in the Gantt chart (default: the last)."),
    dump_problems: Optional[Path] = typer.Option(
        None, help="Write every round's RoundProblem (JSON Lines, one policy only) for solver benchmarks."),
) -> None:
    """Simulate policies on a trace or workload and compare SLO attainment."""
    from models.cost import CostModel
    from planner.cluster import parse_cluster
    from planner.metrics import write_summary, write_timeline
    from planner.simulator import SimConfig
    from planner.traces import read_trace
    from planner.whatif import run_policies, to_requests
    from planner.workloads import generate

    try:
        if trace is not None and workload is not None:
            raise InputError("give --trace or --workload, not both")
        names = _policies(policy)
        for flag, value in (("--timeline", timeline), ("--dump-problems", dump_problems)):
            if value is not None and len(names) != 1:
                raise InputError(f"{flag} takes exactly one --policy, got {len(names)}: {', '.join(names)}")
        if gantt_policy is not None and gantt_policy not in names:
            raise InputError(f"--gantt-policy {gantt_policy!r} is not among the policies run")
        topo = parse_cluster(cluster)
        profiles = builtin_profiles() + [load_profile(p) for p in profile]
        cost = CostModel(topo.kind, profiles)
        if trace is not None:
            records = read_trace(trace, model=model)
            source = str(trace)
        else:
            wl = workload or DEFAULT_WORKLOAD
            records = generate(wl, n=n, rate=rate, seed=seed)
            source = f"workload {wl} (n={len(records)}, seed={seed})"
        requests = to_requests(records, cost, topo, slo_scale)
    except (InputError, ProfileError, UnknownModelError, KeyError, ValueError) as exc:
        raise fail(str(exc).strip('"')) from None

    config = SimConfig(round_s=round_s, noise=noise, seed=seed, record_problems=dump_problems is not None)
    console.print(f"[bold]ditplan whatif[/]: {source} on {topo.name} ({topo.size} GPUs), "
                  f"{len(requests)} requests, policies: {', '.join(names)}", highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        tasks = {p: bar.add_task(p, total=len(requests)) for p in names}
        runs = run_policies(requests, topo, cost, names, config,
                            progress=lambda p, done, total: bar.update(tasks[p], completed=done))
    summaries = {name: run.summary for name, run in runs.items()}
    out.print(_table(summaries, f"{source} on {topo.name}, slo-scale {slo_scale}"))
    if json_out is not None:
        write_summary(json_out, summaries)
        console.print(f"wrote {json_out}")
    if timeline is not None:
        write_timeline(timeline, runs[names[0]].result)
        console.print(f"wrote {timeline}")
    if dump_problems is not None:
        from planner.problem import save_problems

        count = save_problems(dump_problems, runs[names[0]].result.round_problems)
        console.print(f"wrote {count} round problems to {dump_problems}")
    if not no_plot and plot is not None:
        from planner.plots import plot_attainment, plot_gantt

        a = plot_attainment(summaries, f"{plot}-attainment.png", f"SLO attainment: {source}, {topo.name}")
        gp = gantt_policy or names[-1]
        g = plot_gantt(runs[gp].result, topo.size, f"{plot}-gantt.png")
        console.print(f"wrote {a} and {g}")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(summaries: dict[str, dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("policy", "SLO", "image", "video", "p50 s", "p99 s", "GPU-s", "preempt", "sp chg",
                "finished", "solver p99 ms"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    best = max((s["slo_attainment"] or 0) for s in summaries.values())
    for name, s in summaries.items():
        slo = _fmt(s["slo_attainment"], ".3f")
        t.add_row(name, f"[bold green]{slo}[/]" if s["slo_attainment"] == best else slo,
                  _fmt(s["slo_attainment_by_kind"]["image"], ".3f"),
                  _fmt(s["slo_attainment_by_kind"]["video"], ".3f"),
                  _fmt(s["latency_s"]["p50"], ".2f"), _fmt(s["latency_s"]["p99"], ".2f"),
                  _fmt(s["gpu_seconds"], ".0f"), str(s["preemptions"]), str(s["sp_changes"]),
                  f"{s['finished']}/{s['requests']}", _fmt(s["solver_ms"]["p99"], ".2f"))
    return t


@trace_app.command("gen")
def trace_gen(
    workload: str = typer.Option(..., help="Built-in workload name."),
    out_path: Path = typer.Option(..., "--out", help="Trace file to write (JSON Lines)."),
    n: Optional[int] = typer.Option(None, min=1, help="Number of requests."),
    rate: Optional[float] = typer.Option(None, min=1e-9, help="Mean arrival rate, req/s."),
    seed: int = typer.Option(0),
    video_share: Optional[float] = typer.Option(None, help="genserve-mixed: share of videos."),
    arrival: Optional[str] = typer.Option(None, help="genserve-mixed: poisson or bursty."),
    slo_scale: Optional[float] = typer.Option(None, min=1e-9, help="Write this slo_scale on every line."),
) -> None:
    """Write a built-in workload to a trace file."""
    from dataclasses import replace

    from planner.traces import write_trace
    from planner.workloads import generate

    opts = {k: v for k, v in (("video_share", video_share), ("arrival", arrival)) if v is not None}
    try:
        records = generate(workload, n=n, rate=rate, seed=seed, **opts)
    except (InputError, KeyError, ValueError, TypeError) as exc:
        raise fail(str(exc).strip('"')) from None
    if slo_scale is not None:
        records = [replace(r, slo_scale=slo_scale) for r in records]
    write_trace(out_path, records)
    console.print(f"wrote {len(records)} requests to {out_path}")


@trace_app.command("list")
def trace_list() -> None:
    """List the built-in workloads."""
    from planner.workloads import WORKLOADS

    t = Table(title="built-in workloads")
    t.add_column("name")
    t.add_column("description")
    for name, wl in WORKLOADS.items():
        t.add_row(name, wl.description)
    out.print(t)


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. `ditplan ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
