"""Latent checkpoints on the host: a requeued request resumes from its last reported step, not from noise.

After every step the lead rank of a run writes each of its requests' latents, with the steps done, to
``DIR/<key>.<step>.pt`` (``key``: a hash of the request id), before the step is reported, so every step
the service counts has its latent on the host. The write is off the step path: the step hands a copy of
the latent to the rank's ``CheckpointWriter`` thread, which writes it and only then passes the step's
result on (every result of the rank goes through it, so they stay in order). A rank keeps the two newest files of each request (the
newest may be one step past the report when the process died between writing and reporting). When an
executor is given a request it does not hold (a restarted executor, or another one after a requeue) at
``start_step`` > 0, the controller looks for ``<key>.<start_step>.pt``; found, the request's group loads
that latent and goes on from there, else it starts from fresh noise at that step as before. The
directory is shared by every executor of a deployment; ``resumed.jsonl`` logs each resume. Writes go to
the page cache and are renamed into place (atomic), without fsync: they survive the process, not the host.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

import torch

log = logging.getLogger("ditplan.executor")
RESUME_LOG = "resumed.jsonl"
KEEP = 2  # files kept per request and writing rank
_STOP = object()


class CheckpointStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._written: dict[str, deque[Path]] = {}  # request -> files this process wrote, oldest first

    @staticmethod
    def key(rid: str) -> str:
        return hashlib.sha1(rid.encode()).hexdigest()[:20]

    def path(self, rid: str, step: int) -> Path:
        return self.root / f"{self.key(rid)}.{step}.pt"

    def save(self, rid: str, step: int, latent: torch.Tensor) -> Path:
        """Write ``rid``'s latent after ``step`` steps (atomically); drop this process's older files of it."""
        dest = self.path(rid, step)
        tmp = dest.with_suffix(f".tmp{os.getpid()}")
        torch.save({"rid": rid, "step": step, "latent": latent.detach().cpu()}, tmp)
        os.replace(tmp, dest)
        kept = self._written.setdefault(rid, deque())
        if not kept or kept[-1] != dest:
            kept.append(dest)
        while len(kept) > KEEP:
            kept.popleft().unlink(missing_ok=True)
        return dest

    def find(self, rid: str, step: int) -> Path | None:
        """The checkpoint of ``rid`` at exactly ``step`` steps, if one was written."""
        p = self.path(rid, step)
        return p if p.is_file() else None

    @staticmethod
    def load(path: str | Path, rid: str, step: int) -> torch.Tensor:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("rid") != rid or data.get("step") != step:
            raise ValueError(f"checkpoint {path} holds {data.get('rid')!r} at step {data.get('step')}, "
                             f"not {rid!r} at step {step}")
        return data["latent"]

    def drop(self, rid: str) -> None:
        """``rid`` is finished: remove its files."""
        self._written.pop(rid, None)
        for p in self.root.glob(f"{self.key(rid)}.*.pt"):
            p.unlink(missing_ok=True)

    def note_resume(self, rid: str, step: int, executor_id: str) -> None:
        line = json.dumps({"id": rid, "step": step, "executor": executor_id, "time": time.time()})
        with open(self.root / RESUME_LOG, "a") as f:
            f.write(line + "\n")



class CheckpointWriter:
    """A rank's results, in order, each after the checkpoints that go with it: ``put(item, latents)`` writes
    ``latents`` ((request, steps done, tensor) triples) to ``store``, then hands ``item`` to ``sink``, in a
    thread of its own, so the step that made them goes on at once. A write that fails is logged and the
    item still goes on (that request would resume from fresh noise)."""

    def __init__(self, store: CheckpointStore, sink: Callable[[object], None]) -> None:
        self.store, self.sink = store, sink
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def put(self, item, latents: Sequence[tuple[str, int, torch.Tensor]] = ()) -> None:
        self._queue.put((item, latents))

    def _run(self) -> None:
        while (job := self._queue.get()) is not _STOP:
            item, latents = job
            for rid, step, latent in latents:
                try:
                    self.store.save(rid, step, latent)
                except (OSError, RuntimeError) as exc:
                    log.error("checkpoint of %s at step %d failed: %s", rid, step, exc)
            self.sink(item)

    def close(self) -> None:
        """Write and pass on everything put so far, then stop."""
        self._queue.put(_STOP)
        self._thread.join()
