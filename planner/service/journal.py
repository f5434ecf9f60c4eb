"""Durable request journal: SQLite in WAL mode under the service's state directory.

What is written, and when:

* an accepted request, before the Submit reply (one transaction per Submit
  call: the whole batch commits or none of it);
* each executor-reported progress (steps done, encoded) and each outcome
  (done, cancelled, failed), in the order the service applied them.

A single writer thread owns the connection and commits whatever is queued
in one transaction (group commit), so concurrent Submits share one fsync.
Durability: ``synchronous=FULL`` by default, so an acknowledged request
survives a power loss or an OS crash, not only a killed process; WAL keeps
that to one fsync of the log per commit. ``NORMAL`` (``--journal-sync
normal``) skips that fsync: in WAL mode it still survives ``kill -9`` (the
log is in the OS page cache) but may lose the last commits on power loss.

After a restart :meth:`Journal.open` returns every row: unfinished requests
come back with their last reported progress, finished ones keep their outcome.

One process at a time: :meth:`Journal.open` takes an exclusive ``flock`` on
``STATE_DIR/lock`` (which records the holder's pid, host, start time and
address) and holds it until :meth:`Journal.close` or the process ends. A
second open, in this process or another, fails at once with
:class:`JournalLockedError` naming the holder. The OS drops the lock of a
process that dies (even by ``kill -9``), so a stale lock file never blocks a
restart.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

try:
    import fcntl
except ImportError:  # not POSIX: no lock (one server per state directory is then up to the operator)
    fcntl = None

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
DB_NAME = "journal.sqlite3"
LOCK_NAME = "lock"  # flock'ed while a journal is open; holds the holder's pid, host, start and address
SYNC_MODES = ("full", "normal")
MAX_GROUP = 512  # operations per transaction at most
IDLE_TICK_S = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY,            -- admission order
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    height INTEGER NOT NULL,
    width INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    arrival REAL NOT NULL,
    deadline REAL NOT NULL,
    encoded INTEGER NOT NULL DEFAULT 0, -- last reported progress
    steps_done INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,                       -- NULL while live; done | cancelled | rejected | failed
    finish REAL,
    preemptions INTEGER NOT NULL DEFAULT 0,
    sp_changes INTEGER NOT NULL DEFAULT 0,
    migrations INTEGER NOT NULL DEFAULT 0,
    reason TEXT                         -- why a request was rejected
);
"""

_INSERT = ("INSERT INTO requests (id, model, height, width, frames, steps, arrival, deadline) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_PROGRESS = "UPDATE requests SET steps_done = ?, encoded = ? WHERE id = ? AND outcome IS NULL"
_OUTCOME = ("UPDATE requests SET outcome = ?, finish = ?, steps_done = ?, encoded = ?, preemptions = ?, "
            "sp_changes = ?, migrations = ?, reason = ? WHERE id = ? AND outcome IS NULL")
_META = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"


class JournalError(RuntimeError):
    """The journal could not commit (or open)."""


class JournalLockedError(JournalError):
    """The state directory's journal is open in another server (``holder``: what its lock file says)."""

    def __init__(self, state_dir: Path, holder: dict) -> None:
        self.state_dir, self.holder = state_dir, holder
        who = ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "address", "since") if holder.get(k))
        super().__init__(f"state dir {str(state_dir)!r} is in use by another ditplan serve "
                         f"({who or 'holder unknown'}; lock {str(state_dir / LOCK_NAME)!r}); "
                         "stop it or pick another --state-dir")


class StateLock:
    """An exclusive ``flock`` on ``STATE_DIR/lock``, released on :meth:`release` or when the process dies."""

    def __init__(self, state_dir: Path, owner: dict | None = None) -> None:
        self.path = state_dir / LOCK_NAME
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(owner or {})}
        self._fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLockedError(state_dir, self._read_holder()) from None
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"cannot lock {str(self.path)!r}: {exc}") from None
        self._fd = fd
        try:
            self._write()
        except OSError as exc:  # e.g. a full disk: do not keep a lock nobody can read
            self.release()
            raise JournalError(f"cannot write {str(self.path)!r}: {exc}") from None

    def update(self, **fields) -> None:
        """Record more about the holder (the bound address, once known)."""
        self.info.update(fields)
        self._write()

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # nobody holds it now
        except OSError:
            pass
        os.close(fd)  # drops the flock

    def _write(self) -> None:
        if self._fd is None:
            return
        data = (json.dumps(self.info, sort_keys=True) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _read_holder(self) -> dict:
        for _ in range(20):  # the holder writes just after it locks: give it a moment
            try:
                text = self.path.read_text().strip()
            except OSError:
                text = ""
            if text:
                try:
                    doc = json.loads(text)
                    if isinstance(doc, dict):
                        return doc
                except ValueError:
                    pass
            time.sleep(0.01)
        return {}


@dataclass(frozen=True)
class JournalRow:
    """One request as recovered from the journal."""

    seq: int
    id: str
    model: str
    height: int
    width: int
    frames: int
    steps: int
    arrival: float
    deadline: float
    encoded: bool
    steps_done: int
    outcome: str | None
    finish: float | None
    preemptions: int
    sp_changes: int
    migrations: int
    reason: str | None = None


@dataclass(frozen=True)
class Recovered:
    rows: list[JournalRow]
    meta: dict[str, str]
    generation: int  # starts of this state directory, this one included


@dataclass
class _Op:
    sql: str
    params: Sequence[tuple]
    future: Future | None


class Journal:
    """Append-and-update journal with a group-committing writer thread."""

    def __init__(self, path: Path, sync: str, meta_source: Callable[[], dict[str, str]] | None,
                 lock: StateLock | None = None) -> None:
        self.path = path
        self.lock = lock
        self._meta_source = meta_source
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._conn = _connect(path, sync)
        self._closed = False
        self.commits = 0
        self._thread = threading.Thread(target=self._run, name="ditplan-journal", daemon=True)

    @classmethod
    def open(cls, state_dir: str | Path, sync: str = "full",
             meta_source: Callable[[], dict[str, str]] | None = None,
             owner: dict | None = None) -> tuple["Journal", Recovered]:
        """Open (or create) the journal in ``state_dir``; return it and what it holds.

        Locks the directory first (``owner``: more about the holder for the lock file, e.g. its
        address); :class:`JournalLockedError` when another journal holds it."""
        if sync not in SYNC_MODES:
            raise ValueError(f"journal sync {sync!r} is not one of {SYNC_MODES}")
        state_dir = Path(state_dir).absolute()
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = StateLock(state_dir, owner)
        try:
            j = cls(state_dir / DB_NAME, sync, meta_source, lock)
            try:
                rec = j._recover()
            except BaseException:
                j._conn.close()
                raise
        except BaseException:
            lock.release()
            raise
        j._thread.start()
        return j, rec

    # --- writes (called with the service lock held: order = apply order) ----
    def append_requests(self, rows: Iterable[tuple]) -> Future:
        """Queue admitted requests ``(id, model, height, width, frames, steps, arrival, deadline)``."""
        return self._put(_INSERT, list(rows), wait=True)

    def record_progress(self, rid: str, steps_done: int, encoded: bool, wait: bool = False) -> Future | None:
        return self._put(_PROGRESS, [(steps_done, int(encoded), rid)], wait)

    def record_outcome(self, rid: str, outcome: str, finish: float | None, steps_done: int, encoded: bool,
                       preemptions: int, sp_changes: int, migrations: int, wait: bool = False,
                       reason: str | None = None) -> Future | None:
        return self._put(_OUTCOME, [(outcome, finish, steps_done, int(encoded), preemptions, sp_changes,
                                     migrations, reason, rid)], wait)

    def set_meta(self, key: str, value: str, wait: bool = False) -> Future | None:
        return self._put(_META, [(key, value)], wait)

    def flush(self, timeout: float | None = 10.0) -> None:
        """Wait until everything queued so far is committed."""
        fut = self._put("SELECT 1", [()], wait=True)
        fut.result(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)
        if self.lock is not None:
            self.lock.release()

    def _put(self, sql: str, params: Sequence[tuple], wait: bool) -> Future | None:
        fut: Future | None = Future() if wait else None
        if self._closed:
            if fut is not None:
                fut.set_exception(JournalError("journal is closed"))
            return fut
        self._queue.put(_Op(sql, params, fut))
        return fut

    # --- the writer thread --------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=IDLE_TICK_S)
            except queue.Empty:
                if self._meta_source is not None:
                    self._commit([])  # keep the persisted clock fresh while idle
                continue
            ops: list[_Op] = []
            if first is None:
                stop = True
            else:
                ops.append(first)
            while len(ops) < MAX_GROUP:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                ops.append(op)
            self._commit(ops)
        self._conn.close()

    def _commit(self, ops: list[_Op]) -> None:
        try:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            for op in ops:
                if op.sql == "SELECT 1":
                    continue
                cur.executemany(op.sql, op.params)
            if self._meta_source is not None:
                cur.executemany(_META, list(self._meta_source().items()))
            cur.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            log.error("journal commit of %d operations failed: %s", len(ops), exc)
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            err = JournalError(f"journal write failed: {exc}")
            for op in ops:
                if op.future is not None:
                    op.future.set_exception(err)
            return
        for op in ops:
            if op.future is not None:
                op.future.set_result(None)

    # --- recovery -----------------------------------------------------------
    def _recover(self) -> Recovered:
        conn = self._conn
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        version = meta.get("schema_version")
        if version is not None and version != SCHEMA_VERSION:
            raise JournalError(f"{self.path}: schema version {version}, this ditplan reads {SCHEMA_VERSION}")
        generation = int(meta.get("generation", "0")) + 1
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_META, [("schema_version", SCHEMA_VERSION), ("generation", str(generation))])
        rows = [JournalRow(seq=r[0], id=r[1], model=r[2], height=r[3], width=r[4], frames=r[5], steps=r[6],
                           arrival=r[7], deadline=r[8], encoded=bool(r[9]), steps_done=r[10], outcome=r[11],
                           finish=r[12], preemptions=r[13], sp_changes=r[14], migrations=r[15], reason=r[16])
                for r in conn.execute("SELECT seq, id, model, height, width, frames, steps, arrival, deadline, "
                                      "encoded, steps_done, outcome, finish, preemptions, sp_changes, migrations, "
                                      "reason FROM requests ORDER BY seq")]
        meta["generation"] = str(generation)
        return Recovered(rows, meta, generation)


def _connect(path: Path, sync: str) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise JournalError(f"{path}: cannot switch to WAL mode (got {mode!r})")
    conn.execute(f"PRAGMA synchronous={sync.upper()}")
    conn.executescript(_SCHEMA)
    if "reason" not in {r[1] for r in conn.execute("PRAGMA table_info(requests)")}:
        conn.execute("ALTER TABLE requests ADD COLUMN reason TEXT")  # a journal written before rejections
    return conn
