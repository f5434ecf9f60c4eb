"""Fidelity: the what-if simulator against ``ditplan run`` on this machine's CPU executor.

1. Profile the CPU executor: ``ditplan profile --model M --model-scale tiny --shapes ... --degrees ...
   --batches 1 --devices N --out P.json`` per model; with ``--profile-via-run`` (or where that command is
   missing) the same table is measured through ``ditplan run`` itself: one request at a time per
   (model, shape), ``fcfs-spK`` for each degree K, step time = its diffuse segment / its steps (so the
   table includes the per-flight overhead spread over the steps), encode and decode from their segments.
2. Generate one seeded trace of those models and shapes (Poisson arrivals at ``--util`` of the ranks'
   capacity by the profile), run it through ``ditplan run`` (real CPU worker ranks) and through
   ``ditplan whatif --profile`` with the same policy, and compare each request's latency
   (finish - arrival): the figure is the median of |whatif - run| / run (target <= 10%).
   The default policy is ``fcfs-sp1``: its decisions do not depend on predicted times, and the run's
   service plans with the built-in cost model (``ditplan serve`` takes no profile), so any difference is
   the simulator's and the profile's, not two plans.
   The same what-if with a profile of the run's own step times separates the simulator's own error from
   the profile's (this machine's load drifts between profiling and the run).
3. Measured against modelled, as multiples of one measured step, in the executor's own processes (two
   gloo ranks, the request shapes of the trace): pause/resume (a request resumed after another one ran on
   its rank, against one that continues; modelled: 0, the latent stays resident) and migration (its latent
   to the other rank, and to both; modelled: ``planner.state.handoff_time`` over the cluster's link, the
   catalog's real latent bytes); the run's hand-over between a request's flights (its report, the next
   plan, the dispatch; modelled: 0); and a latent checkpoint per step: the copy on the step path and the
   write in the rank's checkpoint writer thread.

Usage: python -m bench.fidelity [--executors 1] [--n 32] [--steps 20] [--downscale 16] [--policy fcfs-sp1]
       [--profile P.json ...] [--profile-via-run] [--json out/fidelity.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ditplan.models.catalog import Shape, get_model
from ditplan.models.cost import CostModel
from ditplan.models.profiles import builtin_profiles, load_profile

DITPLAN = [sys.executable, "-c", "from ditplan.planner.cli import main; main()"]
MODELS = ("flux-dev", "sd3-medium")


def ditplan(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(DITPLAN + list(args), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"ditplan {' '.join(args[:1])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def has_command(name: str) -> bool:
    return subprocess.run(DITPLAN + [name, "--help"], capture_output=True, text=True, timeout=120).returncode == 0


def write_trace(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def timeline(path: Path) -> tuple[list[dict], dict[str, dict]]:
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in recs if r["type"] == "segment"], {r["id"]: r for r in recs if r["type"] == "request"}


# --- 1. the profile -------------------------------------------------------------------------------

def profile_with_ditplan(models, shapes, degrees, ranks: int, downscale: int, out: Path) -> list[Path]:
    paths = []
    extra = ["--downscale", str(downscale)] if "--downscale" in ditplan("profile", "--help").stdout else []
    for m in models:
        p = out / f"profile-{m}.json"
        ditplan("profile", "--model", m, "--model-scale", "tiny", "--shapes", ",".join(map(str, shapes)),
                "--degrees", ",".join(map(str, degrees)), "--batches", "1", "--devices", str(ranks), "--out", str(p),
                *extra)
        paths.append(p)
    return paths


def measured_table(segments: list[dict], trace: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """Profile points (median diffuse segment / steps per model, shape, degree; batch 1 only) and stage
    points (median encode and decode segment) from a timeline of ``ditplan run``."""
    steps: dict[tuple, list[float]] = {}
    stage_s: dict[tuple, list[float]] = {}
    for g in segments:
        if len(g["request_ids"]) != 1:
            continue
        r = trace[g["request_ids"][0]]
        shape = (r["model"], r["height"], r["width"])
        if g["stage"] == "diffuse":
            steps.setdefault((*shape, g["sp"]), []).append((g["end"] - g["start"]) / g["steps"])
        else:
            stage_s.setdefault((*shape, g["stage"]), []).append(g["end"] - g["start"])
    points = [{"model": m, "height": h, "width": w, "frames": 1, "sp": k, "batch": 1,
               "step_s": round(statistics.median(v), 6)} for (m, h, w, k), v in sorted(steps.items())]
    stages = [{"model": m, "height": h, "width": w, "frames": 1, "stage": st, "batch": 1,
               "seconds": round(statistics.median(v), 6)} for (m, h, w, st), v in sorted(stage_s.items())]
    return points, stages


def write_profile(path: Path, name: str, kind: str, method: str, points: list[dict], stages: list[dict]) -> Path:
    doc = {"name": name, "gpu": kind, "role": "profile",
           "provenance": {"source": "bench/fidelity.py", "method": method, "host": os.uname().nodename,
                          "cpus": os.cpu_count()},
           "points": points, "stages": stages}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def profile_via_run(models, shapes, degrees, ranks: int, downscale: int, steps: int, repeats: int, kind: str,
                    out: Path) -> Path:
    """The CPU executor's table, measured through ``ditplan run``: one request at a time (idle gaps skipped),
    the repeats of a shape spread over the run (machine load drifts)."""
    points, stages = [], []
    for k in degrees:
        combos = [(m, s, r) for r in range(repeats) for m in models for s in shapes]
        lines = [{"id": f"{m}-{s}-{r}", "arrival": 1000.0 * i, "model": m, "height": s, "width": s, "frames": 1,
                  "steps": steps, "deadline": 1000.0 * i + 900.0} for i, (m, s, r) in enumerate(combos)]
        trace = write_trace(out / f"calibrate-sp{k}.jsonl", lines)
        tl = out / f"calibrate-sp{k}.timeline.jsonl"
        ditplan("run", "--trace", str(trace), "--executors", str(ranks), "--cluster", f"{ranks}x{kind}",
                "--policy", f"fcfs-sp{k}", "--downscale", str(downscale), "--speed", "1000000", "--timeline", str(tl))
        p, st = measured_table(timeline(tl)[0], {x["id"]: x for x in lines})
        points += p
        stages += st if k == degrees[0] else []
    return write_profile(out / "profile-via-run.json", "cpu-executor-via-run", kind,
                         f"ditplan run, tiny models, downscale {downscale}, {ranks} CPU ranks, one request at a "
                         f"time, fcfs-spK; step = diffuse segment / steps ({steps}), median of {repeats}",
                         points, stages)


# --- 2. the trace, both ways ----------------------------------------------------------------------

def fidelity_trace(cost: CostModel, models, shapes, n: int, steps: int, ranks: int, util: float, seed: int):
    """``n`` requests, models and shapes drawn uniformly, Poisson arrivals at ``util`` of the ranks' capacity."""
    rng = np.random.default_rng(seed)
    mix = [(m, s) for m in models for s in shapes]
    picks = [mix[i] for i in rng.integers(0, len(mix), n)]
    service = [cost.ideal_latency(get_model(m), Shape(s, s), steps, max_sp=1) for m, s in picks]
    rate = util * ranks / float(np.mean(service))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n)) - 1.0 / rate
    return [{"id": f"r{i}", "arrival": round(float(max(0.0, t)), 6), "model": m, "height": s, "width": s,
             "frames": 1, "steps": steps, "deadline": round(float(max(0.0, t)) + 60.0, 6)}
            for i, ((m, s), t) in enumerate(zip(picks, arrivals))]


def latencies(path: Path) -> dict[str, float]:
    _, reqs = timeline(path)
    return {rid: r["finish"] - r["arrival"] for rid, r in reqs.items() if r["finish"] is not None}


def handovers(path: Path, cost: CostModel, trace: dict[str, dict]) -> list[float]:
    """Where a request's next segment ran on the same GPUs with nothing between: the idle gap (its report,
    the next plan, the dispatch), in steps of that request at its degree by ``cost``."""
    segs, _ = timeline(path)
    out = []
    for rid, r in trace.items():
        mine = sorted((g for g in segs if rid in g["request_ids"]), key=lambda g: g["start"])
        step = cost.step_time(get_model(r["model"]), Shape(r["height"], r["width"]), 1)
        for a, b in zip(mine, mine[1:]):
            between = [g for g in segs if set(g["gpus"]) & set(a["gpus"]) and a["end"] <= g["start"] < b["start"]]
            if a["gpus"] == b["gpus"] and not between:
                out.append((b["start"] - a["end"]) / step)
    return out


# --- 3. executor-level costs (two gloo ranks, the executor's Worker) -----------------------------------

def executor_costs(rank: int, world: int, cases: list[tuple[str, int]], downscale: int, steps: int, repeats: int):
    """On rank 0: per case, median seconds of a step, a continued 1-step run, a resumed one, migrations, and a
    step with its latent checkpointed."""
    import torch.distributed as dist

    from ditplan.executor.checkpoints import CheckpointStore
    from ditplan.executor.runtime import Worker
    from ditplan.executor.service import latent_side, model_source, step_latents
    from ditplan.models.torch import LatentSpec

    w = Worker(rank, world, model_source({}, world))
    store = CheckpointStore(tempfile.mkdtemp(prefix="ditplan-ckpt-bench-"))
    out = {}
    n = 0

    def timed(cmd) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        w.handle(cmd)
        dist.barrier()
        return time.perf_counter() - t0

    for model, px in cases:
        side = latent_side(px, downscale)
        rows = {k: [] for k in ("step", "continue", "resume", "migrate_1_1", "migrate_1_2", "copy", "write")}
        for rep in range(repeats + 1):  # the first repetition warms up and is dropped
            a, b = f"a{n}", f"b{n}"
            n += 1
            for rid, seed in ((a, 1), (b, 2)):
                spec = LatentSpec(rid, get_model(model).family, side, side, 4 * steps, seed=seed)
                w.handle({"op": "encode", "specs": [spec], "model": model, "rank": 0})
            times = w.handle({"op": "run", "rids": [a], "steps": steps}) or []
            cont = timed({"op": "run", "rids": [a], "steps": 1})
            w.handle({"op": "pause", "rid": a})
            w.handle({"op": "run", "rids": [b], "steps": steps})
            w.handle({"op": "resume", "rid": a})
            resumed = timed({"op": "run", "rids": [a], "steps": 1})
            mig11 = timed({"op": "migrate", "rid": a, "ranks": (1,)})
            w.handle({"op": "migrate", "rid": a, "ranks": (0,)})
            mig12 = timed({"op": "migrate", "rid": a, "ranks": (0, 1)})
            w.handle({"op": "migrate", "rid": a, "ranks": (0,)})
            copy, write = [], []  # a checkpoint: the copy on the step path, the write in the writer thread
            for _ in range(steps if rank == 0 else 0):
                w.handle({"op": "run", "rids": [a], "steps": 1})
                t0 = time.perf_counter()
                [(rid, k, latent)] = step_latents(w, [a])
                t1 = time.perf_counter()
                store.save(rid, k, latent)
                copy.append(t1 - t0)
                write.append(time.perf_counter() - t1)
            for rid in (a, b):
                w.handle({"op": "release", "rid": rid})
            if rep:
                rows["step"] += times
                rows["continue"].append(cont)
                rows["resume"].append(resumed)
                rows["migrate_1_1"].append(mig11)
                rows["migrate_1_2"].append(mig12)
                rows["copy"] += copy
                rows["write"] += write
        if rank == 0:
            out[f"{model}@{px}"] = {k: statistics.median(v) for k, v in rows.items()} | {"latent_side": side}
    return out if rank == 0 else None


def modelled_costs(cost: CostModel, cluster, model: str, px: int) -> dict[str, float]:
    """Migration seconds by the cost model, one step at degree 1: the simulator's charges."""
    from ditplan.planner.request import Request, RequestStatus, Stage
    from ditplan.planner.state import handoff_time

    spec, shape = get_model(model), Shape(px, px)
    st = RequestStatus(Request("x", model, shape, 20, 0.0, 100.0), encoded=True, steps_done=4)
    st.latent_gpus = (0,)
    return {"step": cost.step_time(spec, shape, 1),
            "migrate_1_1": handoff_time(cluster, cost, st, Stage.DIFFUSE, (1,)),
            "migrate_1_2": handoff_time(cluster, cost, st, Stage.DIFFUSE, (0, 1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--executors", type=int, default=max(1, min(2, (os.cpu_count() or 2) - 1)),
                    help="CPU worker ranks (ditplan run --executors); default: one core left for the service")
    ap.add_argument("--n", type=int, default=32, help="requests in the fidelity trace")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shapes", default="256,512")
    ap.add_argument("--downscale", type=int, default=16, help="latent side = pixels / this")
    ap.add_argument("--util", type=float, default=0.6, help="offered load, share of the ranks' capacity")
    ap.add_argument("--policy", default="fcfs-sp1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=Path, action="append", default=[], help="use this profile (repeatable)")
    ap.add_argument("--profile-via-run", action="store_true", help="measure the profile through ditplan run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("out/fidelity.json"))
    ap.add_argument("--keep", type=Path, default=None, help="keep traces, profiles and timelines here")
    args = ap.parse_args()
    shapes = [int(s) for s in args.shapes.split(",")]
    degrees = [k for k in (1, 2) if k <= args.executors]
    work = args.keep or Path(tempfile.mkdtemp(prefix="ditplan-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    load = [os.getloadavg()[0]]

    if args.profile:
        profiles, how = list(args.profile), "given"
    elif args.profile_via_run or not has_command("profile"):
        if not args.profile_via_run:
            print("`ditplan profile` is not available here: measuring the profile through `ditplan run`", flush=True)
        profiles = [profile_via_run(MODELS, shapes, degrees, args.executors, args.downscale, args.steps,
                                    args.repeats, "H100", work)]
        how = "ditplan run (one request at a time)"
    else:
        profiles = profile_with_ditplan(MODELS, shapes, degrees, args.executors, args.downscale, work)
        how = "ditplan profile"
    loaded = [load_profile(p) for p in profiles]
    kind = loaded[0].gpu
    cluster_spec = f"{args.executors}x{kind}"
    cost = CostModel(kind, builtin_profiles() + loaded)
    print(f"profile ({how}): {', '.join(map(str, profiles))}; GPU kind {kind}", flush=True)

    lines = fidelity_trace(cost, MODELS, shapes, args.n, args.steps, args.executors, args.util, args.seed)
    trace = write_trace(work / "trace.jsonl", lines)
    run_tl, sim_tl = work / "run.timeline.jsonl", work / "whatif.timeline.jsonl"
    ditplan("run", "--trace", str(trace), "--executors", str(args.executors), "--cluster", cluster_spec,
            "--policy", args.policy, "--downscale", str(args.downscale), "--timeline", str(run_tl),
            "--json", str(work / "run.json"))
    ditplan("whatif", "--trace", str(trace), "--cluster", cluster_spec, "--policy", args.policy, "--no-plot",
            *[x for p in profiles for x in ("--profile", str(p))], "--timeline", str(sim_tl),
            "--json", str(work / "whatif.json"))
    by_id = {x["id"]: x for x in lines}
    # the same what-if with a profile of the run's own step times: what is left is the simulator's own error
    own = write_profile(work / "profile-of-the-run.json", "the-run-itself", kind, "this run's own segments",
                        *measured_table(timeline(run_tl)[0], by_id))
    own_tl = work / "whatif-own.timeline.jsonl"
    ditplan("whatif", "--trace", str(trace), "--cluster", cluster_spec, "--policy", args.policy, "--no-plot",
            "--profile", str(own), "--timeline", str(own_tl))
    measured, modelled, modelled_own = latencies(run_tl), latencies(sim_tl), latencies(own_tl)
    ids = sorted(set(measured) & set(modelled), key=lambda r: int(r[1:]))
    errors = [abs(modelled[r] - measured[r]) / measured[r] for r in ids]
    signed = [(modelled[r] - measured[r]) / measured[r] for r in ids]
    own_errors = [abs(modelled_own[r] - measured[r]) / measured[r] for r in ids if r in modelled_own]
    gaps = handovers(run_tl, CostModel(kind, builtin_profiles() + [load_profile(own)]), by_id)

    from ditplan.executor.launch import spawn_world
    from ditplan.planner.cluster import parse_cluster

    cases = [(m, s) for m in MODELS for s in shapes]
    ex = spawn_world(executor_costs, 2, cases, args.downscale, 8, args.repeats, timeout=1200)[0]
    model_cluster = parse_cluster(cluster_spec if args.executors >= 2 else f"2x{kind}")
    costs = []
    for m, s in cases:
        e, mod = ex[f"{m}@{s}"], modelled_costs(cost, model_cluster, m, s)
        step = e["step"]
        costs.append({"case": f"{m} {s}px (latent {e['latent_side']}x{e['latent_side']})",
                      "measured_step_ms": round(step * 1e3, 3), "modelled_step_ms": round(mod["step"] * 1e3, 3),
                      "pause_resume_steps": round((e["resume"] - e["continue"]) / step, 3),
                      "pause_resume_modelled_steps": 0.0,
                      "migrate_1_1_steps": round(e["migrate_1_1"] / step, 3),
                      "migrate_1_1_modelled_steps": round(mod["migrate_1_1"] / mod["step"], 4),
                      "migrate_1_2_steps": round(e["migrate_1_2"] / step, 3),
                      "migrate_1_2_modelled_steps": round(mod["migrate_1_2"] / mod["step"], 4),
                      "checkpoint_copy_us": round(e["copy"] * 1e6, 1),
                      "checkpoint_write_ms": round(e["write"] * 1e3, 3),
                      "checkpoint_write_steps": round(e["write"] / step, 3)})

    result = {
        "profile": {"how": how, "files": [str(p) for p in profiles], "gpu_kind": kind},
        "trace": {"requests": len(lines), "steps": args.steps, "shapes": shapes, "models": list(MODELS),
                  "policy": args.policy, "executors": args.executors, "downscale": args.downscale,
                  "util": args.util, "seed": args.seed},
        "latency": {"compared": len(ids), "median_abs_rel_error": round(statistics.median(errors), 4),
                    "p90_abs_rel_error": round(float(np.percentile(errors, 90)), 4),
                    "median_signed_rel_error": round(statistics.median(signed), 4),
                    "measured_p50_s": round(statistics.median(measured[r] for r in ids), 4),
                    "modelled_p50_s": round(statistics.median(modelled[r] for r in ids), 4),
                    "target": 0.10, "met": statistics.median(errors) <= 0.10,
                    "median_abs_rel_error_own_step_times": round(statistics.median(own_errors), 4)},
        "per_request": [{"id": r, "model": by_id[r]["model"], "side": by_id[r]["height"],
                         "measured_s": round(measured[r], 4), "modelled_s": round(modelled[r], 4),
                         "rel_error": round(s, 4)} for r, s in zip(ids, signed)],
        "handover_steps": {"median": round(statistics.median(gaps), 3) if gaps else None, "handovers": len(gaps),
                           "modelled": 0.0},
        "costs": costs,
        "wall_s": round(time.monotonic() - t0, 1),
        "load_average": {"start": round(load[0], 2), "end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()},
        "workdir": str(work),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")

    lat = result["latency"]
    print(f"per-request latency, {lat['compared']} requests ({args.policy}, {args.executors} CPU ranks): median "
          f"|whatif - run| / run = {lat['median_abs_rel_error']:.1%} (p90 {lat['p90_abs_rel_error']:.1%}, median "
          f"signed {lat['median_signed_rel_error']:+.1%}; p50 measured {lat['measured_p50_s']:.3f} s, modelled "
          f"{lat['modelled_p50_s']:.3f} s); target <= 10%: {'met' if lat['met'] else 'MISSED'}")
    print(f"  with a profile of the run's own step times instead: {lat['median_abs_rel_error_own_step_times']:.1%} "
          "(the simulator's own error; the rest is the profile's: the machine's load drifts)")
    ho = result["handover_steps"]
    print(f"hand-over between a request's flights in the run (report, plan, dispatch): median {ho['median']} of "
          f"its steps over {ho['handovers']} stage boundaries; modelled 0")
    print(f"{'case':<40}{'step ms':>9}{'pause/resume':>14}{'migrate 1->1':>14}{'migrate 1->2':>14}"
          f"{'ckpt copy us':>14}{'ckpt write ms':>15}")
    for c in costs:
        print(f"{c['case']:<40}{c['measured_step_ms']:>9.2f}"
              f"{c['pause_resume_steps']:>8.2f} ({c['pause_resume_modelled_steps']:.0f})"
              f"{c['migrate_1_1_steps']:>7.2f} ({c['migrate_1_1_modelled_steps']:.3f})"
              f"{c['migrate_1_2_steps']:>7.2f} ({c['migrate_1_2_modelled_steps']:.3f})"
              f"{c['checkpoint_copy_us']:>14.1f}{c['checkpoint_write_ms']:>15.3f}")
    print("(multiples of one measured step; modelled in parentheses, in modelled steps)")
    la = result["load_average"]
    print(f"wrote {args.json} ({result['wall_s']} s; 1-min load average {la['start']} -> {la['end']} on "
          f"{la['cpus']} CPUs)")
    if not math.isfinite(lat["median_abs_rel_error"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
