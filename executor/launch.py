"""Start a world of worker processes (torch.distributed: gloo on CPU, NCCL with CUDA) and collect results.

``spawn_world(fn, world, *args, timeout=60)`` runs ``fn(rank, world, *args)`` in ``world`` spawned
processes after ``init_process_group``; returns the per-rank return values (via ``torch.save`` files).
A world that does not finish within ``timeout`` seconds is killed and ``TimeoutError`` raised; a rank
that fails raises ``RuntimeError`` with its traceback; one that dies without a Python error (``kill -9``,
a segfault, the OOM killer) raises ``RankDied`` naming the rank and how, once the others are stopped
(``join`` gives them ``GRACE_S`` to exit, then kills them). On Linux every rank dies with the process
that spawned it (``PR_SET_PDEATHSIG``), even one blocked in a collective when its parent is killed with -9,
so no worker outlives its executor holding device memory.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

GRACE_S = 1.0  # after a rank fails, the others get this long to exit before SIGTERM, then SIGKILL


class RankDied(RuntimeError):
    """A rank exited while its world ran, with no Python error: killed by a signal or a bare exit code."""

    def __init__(self, rank: int, pid: int, how: str) -> None:
        super().__init__(f"worker rank {rank} (pid {pid}) died: {how}")
        self.rank, self.pid, self.how = rank, pid, how


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _entry(rank, fn, world, init_file, outdir, args, threads, parent):
    die_with_parent(parent)
    torch.set_num_threads(threads)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        # A collective that waits longer than this fails instead of hanging for ever (torch's default
        # is 30 min); long enough for the slowest legitimate wait, a rank loading a checkpoint.
        timeout = timedelta(seconds=float(os.environ.get("DITPLAN_COLLECTIVE_TIMEOUT_S", "600")))
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timeout)
        result = fn(rank, world, *args)
        torch.save({"ok": result}, Path(outdir) / f"{rank}.pt")
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        torch.save({"error": traceback.format_exc()}, Path(outdir) / f"{rank}.pt")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_world(fn, world: int, *args, timeout: float = 60.0, threads: int = 1) -> list:
    with tempfile.TemporaryDirectory(prefix="ditplan-world-") as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(_entry, args=(fn, world, init_file, tmp, args, threads, os.getpid()),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=min(5.0, max(0.1, deadline - time.monotonic())), grace_period=GRACE_S):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"world of {world} did not finish within {timeout:g} s")
        except ProcessException as exc:
            errors = [torch.load(p, weights_only=False).get("error") for p in sorted(Path(tmp).glob("*.pt"))]
            if isinstance(exc, ProcessExitedException) and not any(errors):
                how = f"killed by {exc.signal_name}" if exc.signal_name else f"exit code {exc.exit_code}"
                raise RankDied(exc.error_index, exc.error_pid, how) from None
            raise RuntimeError("\n".join(e for e in errors if e) or str(exc)) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False)["ok"] for r in range(world)]
