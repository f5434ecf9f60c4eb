"""Load test of the planning service: concurrent clients submit over loopback while it plans.

    python -m bench.service_load --clients 4 --duration 5

Starts ``ditplan serve --simulate`` in a subprocess (its own state directory,
``--journal-sync full`` unless told otherwise), runs ``--clients`` client
processes that call Submit (``--batch`` requests per call) for
``--duration`` seconds, then reports:

* submits/s (requests acknowledged per second, all clients) and calls/s;
* Submit latency p50 / p99 / max, per call, as the clients measured it;
* lost: acknowledged ids that ListRequests cannot return afterwards (must be
  0); with ``--crash``, also after a ``kill -9`` and a restart on the same
  state directory (durability of every acknowledged id);
* refusals by status code, and how much the server planned meanwhile.

Target (the service issue): >= 2,000 submits/s with p99 <= 20 ms on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-c", "from ditplan.planner.cli import main; main()", "serve"]


def start_server(state_dir: str, args) -> tuple[subprocess.Popen, str]:
    cmd = SERVE + (["--simulate"] if args.simulate else []) + ["--port", "0", "--state-dir", state_dir, "--speed", str(args.speed),
                   "--policy", args.policy, "--max-queue", str(args.max_queue), "--journal-sync", args.journal_sync,
                   "--log-level", "warning", "--min-plan-gap", str(args.min_plan_gap),
                   "--plan-window", str(args.plan_window), "--max-workers", str(max(16, 4 * args.clients * args.threads))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.split("listening on ")[1].split(";")[0].split(" ")[0]


def client_main(idx: int, address: str, duration: float, batch: int, threads: int, start_at: float, out) -> None:
    import threading

    from ditplan.planner.service.admission import RequestSpec
    from ditplan.planner.service.client import PlannerClient, PlannerError

    results = []  # per thread: (latencies, acked ids, refusals)
    while time.time() < start_at - 0.5:  # imports done; CPU counted from here
        time.sleep(0.01)
    cpu0 = time.process_time()

    def worker(t: int) -> None:
        lat, acked, refused = [], [], Counter()
        with PlannerClient(address, timeout=10) as c:
            c.wait_ready(10)
            while time.time() < start_at:
                time.sleep(0.001)
            n = 0
            end = start_at + duration
            while time.time() < end:
                ids = [f"c{idx}t{t}n{n + i}" for i in range(batch)]
                n += batch
                specs = [RequestSpec(rid, "sd3-medium", 512, 512, 1, 20, slo_scale=4.0) for rid in ids]
                t0 = time.perf_counter()
                try:
                    c.submit(specs)
                    acked.extend(ids)
                except PlannerError as exc:
                    refused[exc.code.name] += 1
                lat.append(time.perf_counter() - t0)
        results.append((lat, acked, refused))

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    lat = [x for r in results for x in r[0]]
    acked = [x for r in results for x in r[1]]
    refused = sum((r[2] for r in results), Counter())
    out.put((lat, acked, dict(refused), time.process_time() - cpu0))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children, e.g. the planner process (Linux /proc)."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent pid
            total += (int(fields[11]) + int(fields[12])) / tck
    return total


def retrievable(address: str) -> set[str]:
    from ditplan.planner.service.client import PlannerClient

    with PlannerClient(address, timeout=60) as c:
        return {v.id for v in c.list(page_size=10_000)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--threads", type=int, default=1, help="threads per client process")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of load")
    ap.add_argument("--batch", type=int, default=1, help="requests per Submit call")
    ap.add_argument("--speed", type=float, default=1.0, help="simulated clock speed")
    ap.add_argument("--policy", default="tetriserve-dp")
    ap.add_argument("--min-plan-gap", type=float, default=0.005, help="the server's --min-plan-gap")
    ap.add_argument("--plan-window", type=int, default=512, help="the server's --plan-window")
    ap.add_argument("--max-queue", type=int, default=200_000)
    ap.add_argument("--journal-sync", default="full", choices=["full", "normal"])
    ap.add_argument("--no-simulate", dest="simulate", action="store_false",
                    help="no executor (nothing is planned): the admission path alone")
    ap.add_argument("--crash", action="store_true", help="kill -9 the server afterwards and check the journal")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    state = tempfile.mkdtemp(prefix="ditplan-load-")
    proc, address = start_server(state, args)
    try:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        start_at = time.time() + 1.5 + 0.2 * args.clients  # clients import and connect first
        procs = [ctx.Process(target=client_main, args=(i, address, args.duration, args.batch, args.threads,
                                                       start_at, out)) for i in range(args.clients)]
        for p in procs:
            p.start()
        while time.time() < start_at:
            time.sleep(0.005)
        cpu0 = cpu_seconds(proc.pid)
        got = [out.get(timeout=args.duration + 120) for _ in procs]
        server_cpu = cpu_seconds(proc.pid) - cpu0
        for p in procs:
            p.join(timeout=30)
        lat = np.array([x for g in got for x in g[0]]) * 1e3
        acked = [x for g in got for x in g[1]]
        refused = sum((Counter(g[2]) for g in got), Counter())
        from ditplan.planner.service.client import PlannerClient
        with PlannerClient(address, timeout=30) as c:
            info = c.info()
        lost = len(set(acked) - retrievable(address))
        res = {
            "clients": args.clients, "threads": args.threads, "batch": args.batch, "duration_s": args.duration,
            "journal_sync": args.journal_sync, "policy": args.policy, "cpus": os.cpu_count(),
            "submits_per_s": round(len(acked) / args.duration, 1),
            "calls_per_s": round(len(lat) / args.duration, 1),
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
                           "p99": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
                           "max": round(float(lat.max()), 3) if len(lat) else None},
            "server_cpu_ms_per_call": round(server_cpu * 1e3 / max(1, len(lat)), 3),
            "client_cpu_ms_per_call": round(sum(g[3] for g in got) * 1e3 / max(1, len(lat)), 3),
            "acknowledged": len(acked), "lost": lost, "refused": dict(refused),
            "server_requests_by_state": dict(info.requests_by_state), "plan_epoch_low": info.plan_epoch & 0xFFFFFFFF,
        }
        if args.crash:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc, address = start_server(state, args)
            res["lost_after_kill9"] = len(set(acked) - retrievable(address))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
