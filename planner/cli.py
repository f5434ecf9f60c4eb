"""``ditplan`` command line: what-if planning and trace tools."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from ditplan.models.catalog import CATALOG, UnknownModelError
from ditplan.models.profiles import ProfileError, load_profile, builtin_profiles
from ditplan.planner.errors import InputError

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
DEFAULT_POLICIES = BASELINES + ["genserve", "cpsat"]  # what `whatif` compares unless told otherwise
BIG_GANTT_BARS = 20_000  # whatif says it is drawing a Gantt chart this big (about a second) before it does


def fail(message: str) -> "typer.Exit":
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


def _policies(requested: list[str]) -> list[str]:
    from ditplan.planner.whatif import expand_policies

    try:
        return expand_policies(requested, DEFAULT_POLICIES)
    except ValueError as exc:
        raise InputError(str(exc)) from None


@app.command()
def whatif(
    trace: Optional[Path] = typer.Option(None, help="Trace file (JSON Lines, or Hetu-DiT Request(...) lines)."),
    workload: Optional[str] = typer.Option(None, help="Built-in workload instead of a trace (see `ditplan trace list`)."),
    n: Optional[int] = typer.Option(None, min=1, help="Requests to generate with --workload."),
    rate: Optional[float] = typer.Option(None, min=1e-9, help="Arrival rate, req/s, with --workload."),
    cluster: str = typer.Option(DEFAULT_CLUSTER, help="8xH100, 2x8xL20, ... or a cluster JSON file."),
    policy: List[str] = typer.Option([], "--policy", "-p", help="Policy (repeatable), 'all' (every round policy "
                                     "but the slow MILP ones) or 'all+milp'. Default: the baselines, genserve, cpsat. "
                                     "'offline-bound' solves the whole trace offline and reports a proven upper bound."),
    slo_scale: float = typer.Option(DEFAULT_SLO_SCALE, min=1e-9,
                                    help="Deadline = arrival + scale x ideal latency, for requests without one."),
    seed: int = typer.Option(0, help="Seed of the workload and of step-time noise."),
    model: Optional[str] = typer.Option(None, help="Model for Hetu-DiT traces, which name none."),
    noise: float = typer.Option(0.0, min=0.0, help="Sigma of lognormal step-time noise."),
    round_s: float = typer.Option(2.0, min=1e-3, help="Planning round length, seconds."),
    late: str = typer.Option("serve", help="cpsat/milp: 'serve' runs requests that can no longer make their "
                             "deadline in capacity no on-time request needs; 'reject' ends them with a reason."),
    placement: str = typer.Option("auto", help="Starting placement of the weights: 'auto' (every model on every GPU "
                                  "when they fit, else 'split'; hetu-ilp: its own encode/decode GPUs apart), 'replicate', "
                                  "'split' (each node's GPUs in proportion to each model's GPU-seconds) or "
                                  "MODEL:GPUS,... per node. Peers keep it; cpsat loads and evicts weights as the "
                                  "load shifts."),
    offline_budget: float = typer.Option(4.0, min=0.01, help="offline-bound: CP-SAT deterministic seconds."),
    profile: List[Path] = typer.Option([], help="Extra measured step-time profile JSON (the format of models/profiles/*.json)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write metrics per policy (the what-if JSON contract, docs/architecture.md)."),
    timeline: Optional[Path] = typer.Option(None, help="Write the timeline JSONL (one policy only)."),
    plot: Optional[Path] = typer.Option(None, help="PNG prefix: PREFIX-attainment.png, PREFIX-gantt.png "
                                        "(default: beside --json, e.g. out/m.json -> out/m-*.png; else out/whatif)."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Write no plots."),
    gantt_policy: Optional[str] = typer.Option(None, help="Policy drawn in the Gantt chart (default: cpsat if run, "
                                               "else the first given); 'all': PREFIX-gantt-POLICY.png for each."),
    gantt_color: str = typer.Option("class", help="Gantt colours: 'class' (model and shape) or 'outcome' "
                                    "(on time, late, unfinished); missed deadlines are marked either way."),
    dump_problems: Optional[Path] = typer.Option(
        None, help="Write every round's RoundProblem (JSON Lines, one policy only) for solver benchmarks."),
) -> None:
    """Simulate policies on a trace or workload and compare SLO attainment."""
    from ditplan.models.cost import CostModel
    from ditplan.planner.cluster import parse_cluster
    from ditplan.planner.metrics import unfinished_reasons, write_summary, write_timeline
    from ditplan.planner.placement import check_fits, static_placement, validate_placement
    from ditplan.planner.simulator import SimConfig
    from ditplan.planner.traces import read_trace
    from ditplan.planner.whatif import (PolicyProgress, fmt_duration, gantt_policies, native_stdout_silenced,
                                run_policies, to_requests)
    from ditplan.planner.workloads import generate

    try:
        if trace is not None and workload is not None:
            raise InputError("give --trace or --workload, not both")
        names = _policies(policy)
        if late not in ("serve", "reject"):
            raise InputError(f"--late {late!r} is unknown; use 'serve' or 'reject'")
        for flag, value in (("--timeline", timeline), ("--dump-problems", dump_problems)):
            if value is not None and len(names) != 1:
                raise InputError(f"{flag} takes exactly one --policy, got {len(names)}: {', '.join(names)}")
        drawn = gantt_policies(names, gantt_policy)
        if gantt_color not in ("class", "outcome"):
            raise InputError(f"--gantt-color {gantt_color!r} is unknown; use 'class' or 'outcome'")
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
        check_fits(requests, topo, {r.id: f"line {r.line}" for r in records if r.line} if trace is not None else None)
        if placement == "stages":
            raise InputError("--placement stages (encode and decode GPUs apart) is hetu-ilp's own; it takes it "
                             "by itself under auto when the models do not all fit")
        start = static_placement(topo, requests, cost, placement)
        validate_placement(start, topo)
    except (InputError, ProfileError, UnknownModelError, KeyError, ValueError) as exc:
        raise fail(str(exc).strip('"')) from None

    config = SimConfig(round_s=round_s, noise=noise, seed=seed, record_problems=dump_problems is not None,
                       placement=placement)
    console.print(f"[bold]ditplan whatif[/]: {source} on {topo.name} ({topo.size} GPUs), "
                  f"{len(requests)} requests, policies: {', '.join(names)}; placement {placement}: "
                  f"{start.describe()}", highlight=False)
    # Progress on stderr: a live bar with each policy's ETA on a terminal, else a line every 10 s of a
    # policy's run (finished requests, elapsed, ETA); on both, one line per policy done with its wall time.
    # Native solver output (the HiGHS banner) is kept off stdout, which carries only the table.
    if "all" in policy and "all+milp" not in policy:
        from ditplan.planner.whatif import SLOW_POLICIES

        left = [p for p in SLOW_POLICIES if p not in names]
        if left:
            console.print(f"--policy all leaves out the slow {', '.join(left)} (minutes per few hundred requests); "
                          "--policy all+milp runs them too", highlight=False)
    live = console.is_terminal
    report = PolicyProgress(names, lambda line: console.print(line, highlight=False),
                            every_s=float("inf") if live else 10.0)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
                  disable=not live) as bar:
        tasks = {p: bar.add_task(p, total=len(requests), start=False) for p in names}

        def started(p: str) -> None:
            report.start(p)
            bar.start_task(tasks[p])

        def progressed(p: str, done: int, total: int) -> None:
            report.update(p, done, total)
            bar.update(tasks[p], completed=done)

        with native_stdout_silenced():
            runs = run_policies(requests, topo, cost, names, config, progress=progressed,
                                offline_budget_s=offline_budget, late=late, on_start=started, on_done=report.done)
    summaries = {name: run.summary for name, run in runs.items()}
    out.print(_table(summaries, f"{source} on {topo.name}, slo-scale {slo_scale}"))
    for name, s in summaries.items():
        unfinished = s["requests"] - s["finished"] - s.get("rejected", 0)
        if unfinished:
            console.print(f"[bold red]warning[/]: {name} left {unfinished} of {s['requests']} requests unfinished "
                          "(counted as misses)", highlight=False)
            for why in unfinished_reasons(runs[name].result):
                console.print(f"  {why}", highlight=False)
    if json_out is not None:
        write_summary(json_out, summaries)
        console.print(f"wrote {json_out}")
    if timeline is not None:
        write_timeline(timeline, runs[names[0]].result)
        console.print(f"wrote {timeline}")
    if dump_problems is not None:
        from ditplan.planner.problem import save_problems

        count = save_problems(dump_problems, runs[names[0]].result.round_problems)
        console.print(f"wrote {count} round problems to {dump_problems}")
    if not no_plot:
        import time
        from contextlib import nullcontext

        from ditplan.planner.plots import gantt_bars, plot_attainment, plot_gantt

        prefix = plot if plot is not None else json_out.with_suffix("") if json_out is not None else Path("out/whatif")
        a = plot_attainment(summaries, f"{prefix}-attainment.png", f"SLO attainment: {source}, {topo.name}")
        console.print(f"wrote {a}", highlight=False)
        for gp in drawn:
            path = f"{prefix}-gantt.png" if len(drawn) == 1 else f"{prefix}-gantt-{gp}.png"
            bars = gantt_bars(runs[gp].result)
            what = f"drawing the Gantt chart of {gp} ({bars:,} bars on {topo.size} GPUs) ..."
            if not live and bars >= BIG_GANTT_BARS:  # a second or more: say so in the log
                console.print(what, highlight=False)
            t0 = time.perf_counter()
            with console.status(what, spinner="dots") if live else nullcontext():
                g = plot_gantt(runs[gp].result, topo, path, color_by=gantt_color)
            console.print(f"wrote {g}: Gantt chart of {gp} ({fmt_duration(time.perf_counter() - t0)})",
                          highlight=False)


@app.command("run")
def run_cmd(
    trace: Path = typer.Option(..., help="Trace file (JSON Lines, or Hetu-DiT Request(...) lines)."),
    executors: int = typer.Option(2, "--executors", min=1, help="CPU worker ranks: the cluster's GPUs, one rank each."),
    ranks_per_executor: Optional[int] = typer.Option(None, min=1, help="Ranks per executor process, each one node "
                                                     "of the cluster (default: one executor with every rank)."),
    model_scale: str = typer.Option("tiny", help="Models the ranks run: 'tiny' (seeded transformers from code)."),
    policy: Optional[str] = typer.Option(None, help="Planning policy (default: the service's, cpsat)."),
    cluster: Optional[str] = typer.Option(None, help="Cluster the planner plans for (default: NODESxRANKSxH100, "
                                          "one node per executor); its GPUs must be the worker ranks."),
    speed: float = typer.Option(1.0, min=1.0, help="Divide idle gaps (nothing live) by this; busy time is real. "
                                "Outputs stay on the trace's clock."),
    slo_scale: float = typer.Option(DEFAULT_SLO_SCALE, min=1e-9, help="Deadline scale for lines without one."),
    downscale: int = typer.Option(64, min=1, help="Latent side = pixels / this (the executor's --downscale)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the what-if JSON of the run (docs/architecture.md)."),
    timeline: Optional[Path] = typer.Option(None, help="Write the measured timeline JSONL."),
    out_dir: Optional[Path] = typer.Option(None, help="Write each decoded image here as <request id>.png (a video "
                                           "as <request id>/frame_NNNN.png)."),
    state_dir: Optional[Path] = typer.Option(None, help="A fresh directory for the journal, logs and latent "
                                             "checkpoints (default: a temporary one, removed after success)."),
    heartbeat_timeout: float = typer.Option(10.0, min=0.1, help="The service declares a silent executor lost after this, s."),
    max_restarts: int = typer.Option(3, min=0, help="Restarts of each executor that exits before the run ends."),
    timeout: float = typer.Option(600.0, min=1.0, help="Seconds after the last arrival for every request to end."),
    checkpoints: bool = typer.Option(True, "--checkpoints/--no-checkpoints", help="Latent checkpoints on the host at "
                                     "every reported step, so requeued requests resume."),
) -> None:
    """Replay a trace through the planning service and real CPU worker ranks; write what was measured.

    Starts `ditplan serve` on loopback and the torch executors, replays the trace at its arrival times,
    waits until every request has ended, prints the what-if table and writes --json and --timeline from
    the measured segments. Every process it started is stopped on exit, error and Ctrl-C."""
    import time

    from ditplan.planner.metrics import write_summary, write_timeline
    from ditplan.planner.run import RunConfig, RunError, fmt_restarts, install_signal_handlers, resolve, run
    from ditplan.planner.whatif import fmt_duration

    cfg = RunConfig(trace=trace, ranks=executors, ranks_per_executor=ranks_per_executor, cluster=cluster,
                    policy=policy, speed=speed, slo_scale=slo_scale, model_scale=model_scale, downscale=downscale,
                    state_dir=state_dir, heartbeat_timeout_s=heartbeat_timeout, max_restarts=max_restarts,
                    timeout_s=timeout, checkpoints=checkpoints, out_dir=out_dir)
    try:
        resolve(cfg)
    except (InputError, UnknownModelError, KeyError, ValueError) as exc:
        raise fail(str(exc).strip('"')) from None
    live = console.is_terminal
    say = lambda line: console.print(line, highlight=False)  # noqa: E731
    t0 = time.monotonic()
    last = [0.0]
    with Progress(TextColumn("ditplan run"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[what]}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not live) as bar:
        task = bar.add_task("run", total=None, what="")

        def progressed(p) -> None:
            what = (f"{p.on_time} on time, {p.submitted}/{p.total} submitted"
                    + (f", {p.restarts} executor restart(s)" if p.restarts else ""))
            bar.update(task, total=p.total, completed=p.ended, what=f"ended; {what}")
            if not live and time.monotonic() - last[0] >= 10.0:
                last[0] = time.monotonic()
                say(f"{p.ended}/{p.total} ended, {what}, {fmt_duration(time.monotonic() - t0)}")

        install_signal_handlers()
        try:
            outcome = run(cfg, say=say, progress=progressed)
        except KeyboardInterrupt:
            bar.stop()
            console.print("[bold red]interrupted[/]: stopped every process the run started", highlight=False)
            raise typer.Exit(130) from None
        except RunError as exc:
            bar.stop()
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        except (InputError, OSError) as exc:
            raise fail(str(exc).strip('"')) from None
    s = outcome.summary
    out.print(_table({outcome.policy: s}, f"ditplan run: {trace} on {executors} CPU worker rank(s), measured"))
    resumed = ", ".join(f"{r['id']} at step {r['step']}" for r in outcome.resumed[:5])
    say(f"ran in {fmt_duration(time.monotonic() - t0)}; executor restarts: {fmt_restarts(outcome.restarts)}; "
        f"resumed from latent checkpoints: {len(outcome.resumed)}" + (f" ({resumed})" if resumed else "")
        + (f"; idle time compressed: {outcome.idle_compressed_s:.1f} s" if speed > 1 else ""))
    if json_out is not None:
        write_summary(json_out, {outcome.policy: s})
        say(f"wrote {json_out}")
    if timeline is not None:
        write_timeline(timeline, outcome.result)
        say(f"wrote {timeline}")
    if outcome.problems:
        console.print(f"[bold red]error:[/] the measured timeline fails the checker ({len(outcome.problems)} "
                      f"problem(s)); state kept in {outcome.state_dir}", highlight=False)
        for p in outcome.problems[:20]:
            say(f"  {p}")
        raise typer.Exit(1)
    say("timeline: legal (planner.checker.check_timeline)")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(summaries: dict[str, dict], title: str) -> Table:
    t = Table(title=title)
    bounded = any("slo_attainment_upper_bound" in s for s in summaries.values())
    for col in ("policy", "SLO", *(("bound",) if bounded else ()), "image", "video", "p50 s", "p99 s", "GPU-s",
                "preempt", "sp chg", "finished", "late", "rejected", "solver p99 ms"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    best = max((s["slo_attainment"] or 0) for s in summaries.values())
    for name, s in summaries.items():
        slo = _fmt(s["slo_attainment"], ".3f")
        t.add_row(name, f"[bold green]{slo}[/]" if s["slo_attainment"] == best else slo,
                  *((_fmt(s.get("slo_attainment_upper_bound"), ".3f"),) if bounded else ()),
                  _fmt(s["slo_attainment_by_kind"]["image"], ".3f"),
                  _fmt(s["slo_attainment_by_kind"]["video"], ".3f"),
                  _fmt(s["latency_s"]["p50"], ".2f"), _fmt(s["latency_s"]["p99"], ".2f"),
                  _fmt(s["gpu_seconds"], ".0f"), str(s["preemptions"]), str(s["sp_changes"]),
                  f"{s['finished']}/{s['requests']}", str(s.get("late_finished", "-")), str(s.get("rejected", "-")),
                  _fmt(s["solver_ms"]["p99"], ".2f"))
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

    from ditplan.planner.traces import write_trace
    from ditplan.planner.workloads import generate

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
    from ditplan.planner.workloads import WORKLOADS

    t = Table(title="built-in workloads")
    t.add_column("name")
    t.add_column("description")
    for name, wl in WORKLOADS.items():
        t.add_row(name, wl.description)
    out.print(t)


# --- the planning service (planner/service) -------------------------------------------

DEFAULT_SERVER = "127.0.0.1:50051"


@app.command()
def serve(
    port: int = typer.Option(50051, min=0, max=65535, help="gRPC port (0: any free port, printed at start); "
                             "one in use is an error (exit 2)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (default: loopback only). Beyond loopback a "
                             "token is required (DITPLAN_TOKEN or --token-file), unless --allow-insecure."),
    allow_insecure: bool = typer.Option(False, "--allow-insecure", help="Serve a --host beyond loopback without "
                                        "a token (every client that reaches it is trusted; warns)."),
    cluster: str = typer.Option(DEFAULT_CLUSTER, help="8xH100, 2x8xL20, ... or a cluster JSON file."),
    policy: Optional[str] = typer.Option(None, help="Planning policy (default: cpsat if available, else tetriserve-dp)."),
    simulate: bool = typer.Option(False, "--simulate", help="Run plans on a built-in simulated executor (no GPU)."),
    speed: float = typer.Option(1.0, min=1e-6, help="With --simulate: simulated seconds per wall second. The "
                                "virtual clock stands still while the planner solves, so the speed sets the pace, "
                                "not the outcome."),
    noise: float = typer.Option(0.0, min=0.0, help="With --simulate: sigma of lognormal step-time noise."),
    seed: int = typer.Option(0, help="With --simulate: noise seed."),
    state_dir: Path = typer.Option(Path("ditplan-state"), help="Journal directory (SQLite, WAL); reused on restart. "
                                   "Locked while this server runs: a second server on it exits naming the holder."),
    journal_sync: str = typer.Option("full", help="SQLite synchronous mode: full (survives power loss) or normal."),
    slo_scale: float = typer.Option(DEFAULT_SLO_SCALE, min=1e-9, help="Deadline scale for requests without one."),
    round_s: float = typer.Option(2.0, min=1e-3, help="Planning round length, seconds."),
    max_queue: int = typer.Option(10_000, min=1, help="Unfinished requests at most; beyond: RESOURCE_EXHAUSTED."),
    heartbeat_timeout: float = typer.Option(10.0, min=0.01, help="Executor declared lost after this silence, s."),
    min_plan_gap: float = typer.Option(0.005, min=0.0, help="Wall seconds between plans at least (coalesces bursts)."),
    plan_window: int = typer.Option(512, min=0, help="Not-yet-started requests a plan sees at most, earliest "
                                    "deadlines first (0: all)."),
    planner_process: bool = typer.Option(True, "--planner-process/--no-planner-process",
                                         help="Solve in a child process, off the RPC threads' GIL."),
    metrics_port: Optional[int] = typer.Option(None, min=0, max=65535, help="Serve Prometheus /metrics here."),
    metrics_host: str = typer.Option("127.0.0.1", help="Address of /metrics (no authentication: loopback "
                                     "unless told otherwise)."),
    tls_cert: Optional[Path] = typer.Option(None, help="PEM certificate chain: serve TLS (with --tls-key)."),
    tls_key: Optional[Path] = typer.Option(None, help="PEM private key of --tls-cert."),
    token: Optional[str] = typer.Option(None, envvar="DITPLAN_TOKEN", show_default=False,
                                        help="Require 'authorization: Bearer TOKEN' (health stays open). On the "
                                        "command line the token shows in the process list (ps): prefer the "
                                        "DITPLAN_TOKEN environment variable or --token-file."),
    token_file: Optional[Path] = typer.Option(None, help="Read the bearer token from this file (surrounding "
                                              "whitespace stripped)."),
    max_workers: int = typer.Option(64, min=4, help="gRPC worker threads (each executor holds two)."),
    health_reserve: int = typer.Option(4, min=1, help="Worker threads only health checks may use."),
    unary_reserve: int = typer.Option(8, min=1, help="Worker threads streams may not use (kept for unary calls)."),
    max_plan_streams: int = typer.Option(16, min=1, help="Concurrent StreamPlans at most; beyond: "
                                         "RESOURCE_EXHAUSTED."),
    max_report_streams: int = typer.Option(32, min=1, help="Concurrent ReportProgress at most; beyond: "
                                           "RESOURCE_EXHAUSTED."),
    max_other_streams: int = typer.Option(4, min=1, help="Concurrent other streams (server reflection) at most."),
    handshake_timeout: float = typer.Option(5.0, min=0.01, help="A StreamPlans or ReportProgress call whose first "
                                            "message takes longer is ended (DEADLINE_EXCEEDED), s."),
    stream_idle_timeout: float = typer.Option(30.0, min=0.01, help="A ReportProgress stream silent this long "
                                              "between messages is ended (DEADLINE_EXCEEDED), s."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    late: str = typer.Option("serve", help="cpsat/milp: 'serve' runs requests that can no longer make their "
                             "deadline in spare capacity; 'reject' ends them (state rejected, with a reason)."),
    models: Optional[str] = typer.Option(None, help="Models this deployment serves, comma-separated, placed per GPU "
                                         "by --placement (default: every model requests name, on every GPU; they "
                                         "must fit together)."),
    placement: str = typer.Option("auto", help="With --models: auto (replicate if all fit, else split evenly), "
                                  "replicate, split, or MODEL:GPUS,... per node. cpsat re-places weights as the "
                                  "load shifts; other policies keep this placement."),
    profile: List[Path] = typer.Option([], help="Extra measured step-time profile JSON (repeatable; `ditplan "
                                       "profile` writes one): the cost model the planner starts from."),
    refine: bool = typer.Option(True, "--refine/--no-refine", help="Refine step times per (model, shape, SP "
                                "degree, batch) from the executors' reports (GetServerInfo, /metrics)."),
) -> None:
    """Run the gRPC planning service.

    Start-up fails with exit status 2 and a one-line error, leaving nothing open, on a bad option or
    cluster spec (a cluster JSON with an unknown field included), on a --port (or --metrics-port) already
    in use, and on a --state-dir another `ditplan serve` holds: the journal is locked (flock on
    STATE_DIR/lock, which names the holder's pid, host, address and start time) for as long as its server
    runs. The OS releases the lock when a server dies, even by kill -9, so a restart is never blocked.
    """
    import logging

    from ditplan.planner.service.journal import JournalError
    from ditplan.planner.service.server import ServeConfig, serve as run_server

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if journal_sync not in ("full", "normal"):
        raise fail(f"--journal-sync {journal_sync!r} must be full or normal")
    if late not in ("serve", "reject"):
        raise fail(f"--late {late!r} must be serve or reject")
    if token_file is not None:
        if token:
            raise fail("give the token one way: --token (or DITPLAN_TOKEN) or --token-file")
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise fail(f"--token-file {str(token_file)!r}: {exc.strerror or exc}") from None
        if not token:
            raise fail(f"--token-file {str(token_file)!r} is empty")
    served = tuple(m.strip() for m in (models or "").split(",") if m.strip())
    for m in served:
        if m not in CATALOG:
            raise fail(f"--models: {m!r} unknown model; known: {', '.join(sorted(CATALOG))}")
    config = ServeConfig(host=host, port=port, cluster=cluster, policy=policy, simulate=simulate, speed=speed,
                         noise=noise, seed=seed, state_dir=str(state_dir), journal_sync=journal_sync,
                         slo_scale=slo_scale, round_s=round_s, max_queue=max_queue,
                         heartbeat_timeout_s=heartbeat_timeout, min_plan_gap_s=min_plan_gap,
                         plan_window=plan_window, planner_process=planner_process, metrics_port=metrics_port,
                         tls_cert=str(tls_cert) if tls_cert else None, tls_key=str(tls_key) if tls_key else None,
                         token=token or None, max_workers=max_workers, late=late, models=served,
                         placement=placement, metrics_host=metrics_host, allow_insecure=allow_insecure,
                         health_reserve=health_reserve, unary_reserve=unary_reserve,
                         max_plan_streams=max_plan_streams, max_report_streams=max_report_streams,
                         max_other_streams=max_other_streams, handshake_s=handshake_timeout,
                         stream_idle_s=stream_idle_timeout, profiles=tuple(str(p) for p in profile), refine=refine)
    try:
        run_server(config, announce=lambda line: print(line, flush=True))
    except (InputError, KeyError, ValueError, OSError, JournalError) as exc:
        raise fail(str(exc).strip('"')) from None


def _client(server: str, token: Optional[str], tls_ca: Optional[Path], timeout: float):
    """A connected client: waits up to ``timeout`` for the server (one started a moment ago, too)."""
    from ditplan.planner.service.client import PlannerClient, PlannerError

    client = PlannerClient(server, token=token or None, tls_ca=str(tls_ca) if tls_ca else None, timeout=timeout)
    try:
        client.wait_ready(timeout)
    except PlannerError:
        client.close()
        raise
    return client


_SERVER_OPT = typer.Option(DEFAULT_SERVER, envvar="DITPLAN_SERVER", help="Service address host:port.")
_TOKEN_OPT = typer.Option(None, envvar="DITPLAN_TOKEN", show_default=False, help="Bearer token.")
_TLS_CA_OPT = typer.Option(None, help="PEM CA certificate: connect with TLS.")
_TIMEOUT_OPT = typer.Option(30.0, min=0.1, help="Per-call deadline, seconds.")


def _refused(exc) -> "typer.Exit":
    console.print(f"[bold red]error:[/] {exc.code.name}: {exc.details}", highlight=False)
    return typer.Exit(1)


@app.command()
def submit(
    trace: Path = typer.Option(..., help="Trace file (JSON Lines, or Hetu-DiT Request(...) lines)."),
    server: str = _SERVER_OPT,
    replay: bool = typer.Option(False, "--replay", help="Keep the trace's inter-arrival times (server clock)."),
    model: Optional[str] = typer.Option(None, help="Model for Hetu-DiT traces, which name none."),
    slo_scale: Optional[float] = typer.Option(None, min=1e-9, help="For lines without deadline or slo_scale "
                                              "(default: the server's --slo-scale)."),
    token: Optional[str] = _TOKEN_OPT,
    tls_ca: Optional[Path] = _TLS_CA_OPT,
    timeout: float = _TIMEOUT_OPT,
) -> None:
    """Send a trace's requests to a running service (all at once, arrival = now, unless --replay)."""
    from ditplan.planner.service.commands import submit_trace
    from ditplan.planner.traces import read_trace

    try:
        records = read_trace(trace, model=model)
    except InputError as exc:
        raise fail(str(exc)) from None
    with _client(server, token, tls_ca, timeout) as client:
        summary = submit_trace(client, records, replay=replay, slo_scale=slo_scale)
    if summary.error is not None:
        console.print(f"submitted {summary.accepted} of {len(records)} requests before the refusal", highlight=False)
        raise _refused(summary.error)
    console.print(f"submitted {summary.accepted} requests to {server}", highlight=False)


@app.command()
def status(
    server: str = _SERVER_OPT,
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list (id, state, progress, times)."),
    state: List[str] = typer.Option([], help="Only requests in this state (repeatable)."),
    token: Optional[str] = _TOKEN_OPT,
    tls_ca: Optional[Path] = _TLS_CA_OPT,
    timeout: float = _TIMEOUT_OPT,
) -> None:
    """List the service's requests and their state."""
    from ditplan.planner.service.client import PlannerError
    from ditplan.planner.service.commands import status_json, status_rows
    from ditplan.planner.service.messages import STATES

    for s in state:
        if s not in STATES:
            raise fail(f"--state {s!r} is unknown; known: {', '.join(STATES)}")
    try:
        with _client(server, token, tls_ca, timeout) as client:
            views = client.list(states=state)
            info = client.info()
    except PlannerError as exc:
        raise _refused(exc) from None
    if json_out:
        print(status_json(views))
        return
    t = Table(title=f"{len(views)} requests on {server}")
    for col in ("id", "state", "steps", "deadline in s", "predicted finish in s", "finish in s", "note"):
        t.add_column(col, justify="left" if col in ("id", "state", "note") else "right")
    for row in status_rows(views, info.now):
        t.add_row(*row)
    out.print(t)
    if info.placement:
        from ditplan.planner.placement import Placement
        out.print(f"placement (backbones by GPU): {Placement.from_names(info.placement).describe()}; "
                  f"{info.weight_loads} weight loads so far", highlight=False)


@app.command()
def cancel(
    request_id: str = typer.Argument(..., metavar="ID", help="Request id."),
    server: str = _SERVER_OPT,
    token: Optional[str] = _TOKEN_OPT,
    tls_ca: Optional[Path] = _TLS_CA_OPT,
    timeout: float = _TIMEOUT_OPT,
) -> None:
    """Cancel a request on a running service."""
    from ditplan.planner.service.client import PlannerError

    try:
        with _client(server, token, tls_ca, timeout) as client:
            view = client.cancel(request_id)
    except PlannerError as exc:
        raise _refused(exc) from None
    console.print(f"cancelled {view.id} at step {view.steps_done}/{view.steps}", highlight=False)


@app.command()
def executor(
    server: str = _SERVER_OPT,
    devices: int = typer.Option(1, min=1, max=8, help="Worker processes, one per device (GPU, or CPU rank)."),
    executor_id: str = typer.Option("executor0", help="Name this executor gives the service."),
    first_gpu: int = typer.Option(0, min=0, help="Global index of this executor's first GPU."),
    downscale: int = typer.Option(64, min=1, help="Latent side = pixels / this (8 = real VAE; 64 keeps tiny CPU "
                                  "models fast)."),
    checkpoint: list[str] = typer.Option([], help="FAMILY=PATH: a local diffusers checkpoint (flux, sd3, sdxl, "
                                         "cogvideox, hunyuanvideo, wan); default: tiny seeded models."),
    out_dir: Optional[Path] = typer.Option(None, help="Write each decoded image here as <request id>.png (a "
                                           "video as <request id>/frame_0000.png, ...)."),
    token: Optional[str] = _TOKEN_OPT,
    max_idle: Optional[float] = typer.Option(None, min=0.0, help="Exit after this many seconds without a plan "
                                             "update."),
    checkpoint_dir: Optional[Path] = typer.Option(None, help="Latent checkpoints on the host: each step's latents are "
                                                  "written here before the step is reported, and a requeued request "
                                                  "resumes from them (share it between executors)."),
) -> None:
    """Run torch workers that execute the service's plans and report measured step times.

    Exits 3 when the service declared this executor lost and 4 when a worker rank died (its work is
    requeued either way), so a supervisor can start it again."""
    try:
        from ditplan.executor.launch import RankDied
        from ditplan.executor.service import ExecutorLost, RanksFailed, UnsupportedModel, run_executor
    except ImportError as exc:
        raise fail(f"the executor needs the 'executor' extra (torch, yunchang, diffusers): {exc}") from None
    ckpts = {}
    for item in checkpoint:
        fam, sep, path = item.partition("=")
        if not sep or not path:
            raise fail(f"--checkpoint {item!r} must be FAMILY=PATH")
        ckpts[fam] = path
    try:
        n = run_executor(server, devices, executor_id=executor_id, first_gpu=first_gpu, downscale=downscale,
                         checkpoints=ckpts, token=token, max_idle_s=max_idle,
                         checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                         out_dir=str(out_dir) if out_dir is not None else None)
    except UnsupportedModel as exc:
        raise fail(str(exc)) from None
    except ExecutorLost as exc:  # exit non-zero, so a supervisor restarts it
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(3) from None
    except RankDied as exc:
        console.print(f"[bold red]error:[/] executor {executor_id}: {exc}; the other ranks were stopped and the "
                      "service requeues this executor's work", highlight=False)
        raise typer.Exit(4) from None
    except RanksFailed as exc:
        print(exc.detail, file=sys.stderr)
        console.print(f"[bold red]error:[/] executor {executor_id}: {exc}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"executor {executor_id}: {n} assignment(s) run", highlight=False)


@app.command()
def profile(
    model: str = typer.Option(..., help="Catalog model to measure (its family needs a torch model: flux, sd3)."),
    model_scale: str = typer.Option("tiny", help="'tiny' (seeded models built from code, as `ditplan executor` "
                                    "runs them) or 'full' (a local checkpoint, --checkpoint)."),
    shapes: str = typer.Option("256,512,1024", help="Output sizes in pixels, comma-separated: SIZE (square), HxW "
                               "or HxWxF (frames)."),
    degrees: str = typer.Option("1", help="SP degrees, comma-separated; each at most --devices."),
    batches: str = typer.Option("1", help="Batch sizes, comma-separated."),
    devices: int = typer.Option(1, help="Ranks to spawn: one per CUDA device, or CPU ranks (gloo)."),
    out_path: Path = typer.Option(..., "--out", help="Profile JSON to write (the format of models/profiles/*.json)."),
    checkpoint: Optional[Path] = typer.Option(None, help="--model-scale full: a local diffusers checkpoint."),
    warmup: int = typer.Option(3, help="Steps measured and dropped first, per point."),
    repeats: int = typer.Option(10, help="Steps whose median is the point."),
    downscale: Optional[int] = typer.Option(None, help="Latent side = pixels / this (default: 64 tiny, as "
                                            "`ditplan executor`; 8 full, the real VAE factor)."),
    gpu: Optional[str] = typer.Option(None, help="GPU kind to file the profile under (the cost model's key). Default: "
                                      "the CUDA device's kind; on CPU the default cluster's kind."),
    csp: bool = typer.Option(False, "--csp", help="Also measure CSP batch steps (one request per shape, every pair "
                             "of distinct --shapes and all of them together, at each --degrees) as csp rows; the "
                             "model must run CSP batches (catalog)."),
) -> None:
    """Measure step, encode and decode times on the local devices and write a profile for --profile."""
    import shlex

    from ditplan.planner.cluster import parse_cluster

    try:
        from ditplan.executor.profile import ProfileInputError, make_job, measure, measurements
    except ImportError as exc:
        raise fail(f"profiling needs the 'executor' extra (torch, yunchang, diffusers): {exc}") from None
    given = [("--checkpoint", checkpoint), ("--downscale", downscale), ("--gpu", gpu)]
    argv = ["ditplan", "profile", "--model", model, "--model-scale", model_scale, "--shapes", shapes,
            "--degrees", degrees, "--batches", batches, "--devices", devices, "--warmup", warmup,
            "--repeats", repeats, *[x for flag, v in given if v is not None for x in (flag, v)],
            *(["--csp"] if csp else []), "--out", out_path]
    try:
        job = make_job(model, model_scale, shapes, degrees, batches, devices,
                       str(checkpoint) if checkpoint else None, warmup, repeats, downscale, gpu,
                       fallback_gpu=parse_cluster(DEFAULT_CLUSTER).kind.name,
                       command=" ".join(shlex.quote(str(a)) for a in argv), csp=csp)
    except ProfileInputError as exc:
        raise fail(str(exc)) from None
    console.print(f"[bold]ditplan profile[/]: {model} ({model_scale}), shapes {', '.join(map(str, job.shapes))}, "
                  f"degrees {', '.join(map(str, job.degrees))}, batches {', '.join(map(str, job.batches))} on "
                  f"{devices} rank(s){', CSP mixes' if csp else ''}; {warmup} warm-up + {repeats} steps per point",
                  highlight=False)
    live = console.is_terminal
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not live) as bar:
        task = bar.add_task("measuring", total=measurements(job))

        def measured(m) -> None:
            what = f"{m.label}: {m.median * 1e3:.3f} ms (iqr {m.iqr * 1e3:.3f})"
            bar.update(task, advance=1, description=what)
            if not live:
                console.print(what, highlight=False)

        try:
            prof = measure(job, measured)
        except (RuntimeError, TimeoutError) as exc:
            console.print(f"[bold red]error:[/] profiling failed: {exc}", highlight=False)
            raise typer.Exit(1) from None
    t = Table(title=f"{prof.name}: seconds per step (median of {repeats})")
    for col in ("shape", "sp", "batch", "step ms", "iqr ms"):
        t.add_column(col, justify="right")
    for p in prof.points:
        t.add_row(str(p.shape), str(p.sp), str(p.batch), f"{p.step_s * 1e3:.3f}", f"{(p.iqr_s or 0) * 1e3:.3f}")
    out.print(t)
    if prof.csp:
        t = Table(title=f"{prof.name}: seconds per CSP batch step (median of {repeats})")
        for col in ("shapes", "sp", "step ms", "iqr ms"):
            t.add_column(col, justify="right")
        for c in prof.csp:
            t.add_row(" + ".join(map(str, c.shapes)), str(c.sp), f"{c.step_s * 1e3:.3f}", f"{(c.iqr_s or 0) * 1e3:.3f}")
        out.print(t)
    prof.write(out_path)
    console.print(f"wrote {out_path}: {len(prof.points)} step points, {len(prof.stages)} stage points, "
                  f"{len(prof.csp)} csp points, filed under "
                  f"{prof.gpu} (measured on {prof.provenance['device']})", highlight=False)


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. `ditplan ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
