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

Integrity. A fresh start is a state directory with no journal file at all: the
journal is then built under a temporary name and renamed into place once its
tables are committed, so a journal file that exists was complete once. Every
open checks what it finds (``PRAGMA integrity_check`` and the tables and
columns this ditplan reads) before it writes anything; a damaged journal (0
bytes, truncated, a garbled page, its tables gone, not a SQLite file) raises
:class:`JournalDamaged`, naming the file, and is left as it was.

Writes. One failed operation (a Submit's rows, say, that break the unique-id
constraint) fails only its own future: each operation of a group commit runs
in its own SAVEPOINT, and if the transaction as a whole fails each operation
is retried alone. Whether the journal can write is tracked
(:attr:`Journal.writable`, :meth:`Journal.subscribe`): a transaction that
cannot commit (a full or read-only disk, an I/O error) makes it unwritable; the
next successful commit, or the probe the writer thread runs every
``PROBE_S`` seconds while idle and unwritable, makes it writable again.
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

from ditplan.planner.request import Request, RequestFields

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
PROBE_S = 1.0  # while unwritable: seconds between probe writes (when idle)
_SQLITE_MAGIC = b"SQLite format 3\x00"
_FLUSH = "SELECT 1"
# the columns recovery reads (``reason`` may be missing: a journal written before rejections gains it)
_COLUMNS = {"meta": {"key", "value"},
            "requests": {"seq", "id", "model", "height", "width", "frames", "steps", "arrival", "deadline",
                         "encoded", "steps_done", "outcome", "finish", "preemptions", "sp_changes", "migrations"}}

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


class JournalDamaged(JournalError):
    """The journal file is damaged (``path``, ``reason``): the server must not start on it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"journal {str(path)!r} is damaged ({reason}); restore it from a backup, "
                         "or start with another --state-dir")


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
class JournalRow(RequestFields):
    """One request as recovered from the journal."""

    seq: int
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

    def to_request(self) -> Request:
        return Request(self.id, self.model, self.shape, self.steps, self.arrival, self.deadline)


def request_row(r: Request) -> tuple:
    """A newly admitted request as ``append_requests`` takes it."""
    return r.id, r.model, r.shape.height, r.shape.width, r.shape.frames, r.steps, r.arrival, r.deadline


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
        self._writable = True
        self._watchers: list[Callable[[bool], None]] = []
        self._watch_lock = threading.RLock()  # orders notifications with subscribe's first call
        self._last_probe = 0.0
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
            path = state_dir / DB_NAME
            if path.exists():
                _check(path)  # damage raises before anything is written
            else:
                _create(path)
            try:
                j = cls(path, sync, meta_source, lock)
            except sqlite3.Error as exc:
                raise _open_error(path, exc) from None
            try:
                try:
                    rec = j._recover()
                except sqlite3.Error as exc:
                    raise _open_error(path, exc) from None
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
        fut = self._put(_FLUSH, [()], wait=True)
        fut.result(timeout)

    # --- can it write? ------------------------------------------------------
    @property
    def writable(self) -> bool:
        """False since a transaction failed to commit, until one commits (or a probe write does)."""
        return self._writable

    def subscribe(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``callback(writable)`` now and on every change (from the writer thread); returns an unsubscribe."""
        with self._watch_lock:
            self._watchers.append(callback)
            self._notify_one(callback, self._writable)

        def unsubscribe() -> None:
            with self._watch_lock:
                if callback in self._watchers:
                    self._watchers.remove(callback)
        return unsubscribe

    def _set_writable(self, ok: bool, why: str = "") -> None:
        with self._watch_lock:
            if ok == self._writable:
                return
            self._writable = ok
            if ok:
                log.warning("journal %s is writable again", self.path)
            else:
                log.error("journal %s cannot be written: %s", self.path, why)
            for cb in list(self._watchers):
                self._notify_one(cb, ok)

    @staticmethod
    def _notify_one(cb: Callable[[bool], None], ok: bool) -> None:
        try:
            cb(ok)
        except Exception:  # a watcher's bug must not stop the writer
            log.exception("journal writability callback failed")

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
                if not self._writable:
                    if time.monotonic() - self._last_probe >= PROBE_S:
                        self._probe()
                elif self._meta_source is not None:
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
        """Commit ``ops`` in one transaction, each in its own SAVEPOINT: an operation that fails
        fails only its own future. If the transaction itself fails, retry each operation alone."""
        failed: dict[int, Exception] = {}
        try:
            self._transaction(ops, failed)
        except sqlite3.Error as exc:
            self._rollback()
            if len(ops) <= 1:
                self._fail_txn(ops, exc)
                return
            log.warning("journal commit of %d operations failed (%s): retrying each alone", len(ops), exc)
            for op in ops:
                one: dict[int, Exception] = {}
                try:
                    self._transaction([op], one)
                except sqlite3.Error as exc1:
                    self._rollback()
                    self._fail_txn([op], exc1)
                    continue
                self._settle([op], one)
            return
        self._settle(ops, failed)

    def _transaction(self, ops: list[_Op], failed: dict[int, Exception]) -> None:
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        for i, op in enumerate(ops):
            if op.sql == _FLUSH:
                continue
            cur.execute("SAVEPOINT op")
            try:
                cur.executemany(op.sql, op.params)
            except sqlite3.IntegrityError as exc:  # this operation's own fault: undo it alone
                cur.execute("ROLLBACK TO op")
                failed[i] = exc
            cur.execute("RELEASE op")
        if self._meta_source is not None:
            cur.executemany(_META, list(self._meta_source().items()))
        cur.execute("COMMIT")
        self.commits += 1
        self._set_writable(True)

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _fail_txn(self, ops: list[_Op], exc: sqlite3.Error) -> None:
        log.error("journal commit of %d operations failed: %s", len(ops), exc)
        if not isinstance(exc, sqlite3.IntegrityError):  # a constraint is the data's fault, not the disk's
            self._set_writable(False, str(exc))
        err = JournalError(f"journal write failed: {exc}")
        for op in ops:
            if op.future is not None and not op.future.done():
                op.future.set_exception(err)

    @staticmethod
    def _settle(ops: list[_Op], failed: dict[int, Exception]) -> None:
        for i, op in enumerate(ops):
            exc = failed.get(i)
            if exc is not None:
                log.error("journal write refused: %s", exc)
            if op.future is None or op.future.done():
                continue
            if exc is not None:
                op.future.set_exception(JournalError(f"journal write failed: {exc}"))
            else:
                op.future.set_result(None)

    def _probe(self) -> None:
        """While unwritable: a write that needs new pages (and so disk space), undone in the same commit."""
        self._last_probe = time.monotonic()
        try:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            cur.execute(_META, ("write_probe", "x" * 8192))
            cur.execute("DELETE FROM meta WHERE key = 'write_probe'")
            if self._meta_source is not None:
                cur.executemany(_META, list(self._meta_source().items()))
            cur.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            log.debug("journal probe write failed: %s", exc)
            return
        self._set_writable(True)

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
    """Connect to a journal that :func:`_check` passed or :func:`_create` built."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(f"{path}: cannot switch to WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous={sync.upper()}")
        if "reason" not in {r[1] for r in conn.execute("PRAGMA table_info(requests)")}:
            conn.execute("ALTER TABLE requests ADD COLUMN reason TEXT")  # a journal written before rejections
    except BaseException:
        conn.close()
        raise
    return conn


def _create(path: Path) -> None:
    """A fresh journal: built as ``NAME.new`` (WAL mode, tables, schema version) and renamed into place,
    so that a journal file that exists always had its tables (a crash leaves only ``NAME.new``)."""
    tmp = path.with_name(path.name + ".new")
    for p in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        p.unlink(missing_ok=True)  # a crashed earlier attempt
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise JournalDamaged(path, f"the file is missing but its write-ahead log {str(wal)!r} is there")
    try:
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript("BEGIN IMMEDIATE;\n" + _SCHEMA.replace("CREATE TABLE IF NOT EXISTS", "CREATE TABLE")
                               + f"\nINSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');"
                               "\nCOMMIT;")
        finally:
            conn.close()  # checkpoints the log into the file and removes it
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for p in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            p.unlink(missing_ok=True)  # empty leftovers: not this file's
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except (OSError, sqlite3.Error) as exc:
        raise JournalError(f"cannot create journal {str(path)!r}: {exc}") from None


def _check(path: Path) -> None:
    """:class:`JournalDamaged` unless ``path`` is a whole journal; reads only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise JournalError(f"cannot read journal {str(path)!r}: {exc}") from None
    if size == 0:
        raise JournalDamaged(path, "the file is empty (0 bytes); a fresh start has no journal file")
    if head != _SQLITE_MAGIC:
        raise JournalDamaged(path, f"not a SQLite database ({size} bytes)")
    try:  # read-only: neither the check nor closing (no checkpoint) changes the file
        conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, isolation_level=None, timeout=30)
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from None
    try:
        problems = [r[0] for r in conn.execute("PRAGMA integrity_check(20)")]
        if problems != ["ok"]:
            lines = [ln.strip() for p in problems for ln in str(p).splitlines()
                     if ln.strip() and not ln.startswith("***")]
            first = lines[0] if lines else "integrity check failed"
            more = f" and {len(lines) - 1} more problems" if len(lines) > 1 else ""
            raise JournalDamaged(path, f"integrity check: {first}{more}")
        for table, need in _COLUMNS.items():
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            if not have:
                raise JournalDamaged(path, f"table {table!r} is missing")
            if need - have:
                raise JournalDamaged(path, f"table {table!r} lacks columns {', '.join(sorted(need - have))}")
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from None
    finally:
        conn.close()


def _open_error(path: Path, exc: sqlite3.Error) -> JournalError:
    """SQLite's corrupt / not-a-database errors are damage; others (locked, I/O, permissions) are not."""
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return JournalDamaged(path, str(exc))
    return JournalError(f"cannot open journal {str(path)!r}: {exc}")
