"""Journal integrity (issue 12): damaged journals refuse to start, one bad write fails only itself,
and health follows whether the journal can write.

Real SQLite files under ``tmp_path``; real servers on loopback ports (port 0) where the service is
involved; a real ``ditplan serve`` subprocess for the CLI's exit status.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from ditplan.planner.service import journal as journal_mod
from ditplan.planner.service.admission import RequestSpec
from ditplan.planner.service.client import PlannerClient, PlannerError
from ditplan.planner.service.journal import DB_NAME, Journal, JournalDamaged, JournalError, StateLock
from ditplan.planner.service.server import SERVICE_NAME, PlannerServer, ServeConfig
from test_service import make_server, wait_for  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
DITPLAN = [sys.executable, "-c", "from ditplan.planner.cli import main; main()"]
POLICY = "tetriserve-dp"
ROWS = 3000


def spec(rid: str, steps: int = 28) -> RequestSpec:
    return RequestSpec(rid, "flux-dev", 1024, 1024, 1, steps, slo_scale=3.0)


def row(rid: str, t: float = 0.0) -> tuple:
    return (rid, "flux-dev", 1024, 1024, 1, 28, t, t + 9.0)


def _journal_with_rows(state_dir: Path, n: int = ROWS) -> Path:
    j, _ = Journal.open(state_dir)
    j.append_requests([row(f"r{i}", float(i)) for i in range(n)]).result(30)
    j.flush()
    j.close()
    return state_dir / DB_NAME


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _journal_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "ditplan-journal"]


# --- damaged journals refuse to start ----------------------------------------------------------
def _truncate(db: Path) -> None:
    os.truncate(db, db.stat().st_size // 2)


def _empty(db: Path) -> None:
    os.truncate(db, 0)


def _garble(db: Path) -> None:
    """Overwrite 200 bytes of the page in the middle of the file, from its header on (cell count and
    pointers): what lost 34 of 6,011 requests silently."""
    size = db.stat().st_size
    page = 4096
    mid = (size // page // 2) * page
    with open(db, "r+b") as f:
        f.seek(mid + 8)
        f.write(random.Random(12).randbytes(200))


def _drop_tables(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE requests")
    conn.execute("DROP TABLE meta")
    conn.commit()
    conn.close()


def _not_sqlite(db: Path) -> None:
    db.write_text("these are not the rows you are looking for\n" * 100)


DAMAGE = {"truncated": (_truncate, "malformed"), "empty": (_empty, "0 bytes"),
          "garbled": (_garble, "integrity check|malformed"), "tables dropped": (_drop_tables, "missing"),
          "not sqlite": (_not_sqlite, "not a SQLite database")}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_journal_refuses_to_start_naming_the_file(tmp_path, kind):
    damage, reason = DAMAGE[kind]
    state = tmp_path / "state"
    db = _journal_with_rows(state)
    damage(db)
    before = _digest(db)
    threads = _journal_threads()
    with pytest.raises(JournalDamaged) as info:
        PlannerServer(ServeConfig(port=0, policy=POLICY, state_dir=str(state))).start()
    msg = str(info.value)
    assert str(db) in msg and re.search(reason, msg) and "--state-dir" in msg and "\n" not in msg, msg
    assert info.value.path == db
    assert _digest(db) == before  # refused as it was: nothing written to it
    assert _journal_threads() == threads
    StateLock(state).release()  # the lock was dropped
    with pytest.raises(JournalDamaged):  # and it stays refused: no silent fresh start on a second try
        Journal.open(state)


def test_garbled_page_is_caught_even_where_reads_still_work(tmp_path):
    """The garbled page of the issue: every row still reads back (here the page is one of the unique-id
    index's), so only the integrity check tells; it is what refuses the start."""
    db = _journal_with_rows(tmp_path / "state", n=6011)
    _garble(db)
    conn = sqlite3.connect(db)
    assert len(conn.execute("SELECT id FROM requests ORDER BY seq").fetchall()) == 6011
    problems = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    conn.close()
    assert problems != ["ok"]
    with pytest.raises(JournalDamaged, match="integrity check"):
        Journal.open(tmp_path / "state")


def test_cli_serve_on_a_damaged_journal_exits_2_in_one_line(tmp_path):
    state = tmp_path / "state"
    db = _journal_with_rows(state)
    _garble(db)
    r = subprocess.run(DITPLAN + ["serve", "--policy", POLICY, "--port", "0", "--state-dir", str(state),
                                  "--no-planner-process"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 2, out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert str(db) in out and "damaged" in out and "--state-dir" in out, out


def test_a_fresh_start_is_no_journal_file_and_a_crashed_creation_is_redone(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / (DB_NAME + ".new")).write_bytes(b"half-built journal of a crashed first start")
    j, rec = Journal.open(state)
    assert rec.rows == [] and rec.generation == 1 and j.writable
    j.close()
    assert not (state / (DB_NAME + ".new")).exists()
    j, rec = Journal.open(state)
    assert rec.generation == 2
    j.close()


def test_a_wal_without_its_journal_is_damage(tmp_path):
    state = tmp_path / "state"
    _journal_with_rows(state, n=10)
    j, _ = Journal.open(state)
    j.append_requests([row("late")]).result(5)
    wal = state / (DB_NAME + "-wal")
    assert wal.stat().st_size > 0
    kept = wal.read_bytes()
    j.close()
    (state / DB_NAME).unlink()
    wal.write_bytes(kept)
    with pytest.raises(JournalDamaged, match="write-ahead log"):
        Journal.open(state)


def test_a_kill9_journal_with_its_wal_still_opens(tmp_path):
    """A journal left with its WAL (a killed server) is not damage: its rows all come back."""
    state = tmp_path / "state"
    code = ("import sys, os; from ditplan.planner.service.journal import Journal\n"
            "j, _ = Journal.open(sys.argv[1])\n"
            "j.append_requests([(f'k{i}', 'flux-dev', 512, 512, 1, 20, 0.0, 9.0) for i in range(500)]).result(10)\n"
            "os._exit(0)  # no close: the WAL is left behind\n")
    subprocess.run([sys.executable, "-c", code, str(state)], cwd=ROOT, check=True, timeout=60)
    assert (state / (DB_NAME + "-wal")).stat().st_size > 0
    j, rec = Journal.open(state)
    assert len(rec.rows) == 500
    j.close()


# --- one failed write fails only its own operation ----------------------------------------------
def _hold_write_lock(db: Path) -> sqlite3.Connection:
    """Another connection holding SQLite's write lock: the writer thread waits, the queue fills up."""
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_a_failing_member_of_a_group_commit_fails_alone(tmp_path):
    j, _ = Journal.open(tmp_path)
    try:
        j.append_requests([row("dup")]).result(5)
        other = _hold_write_lock(tmp_path / DB_NAME)
        commits = j.commits
        first = j._put(journal_mod._FLUSH, [()], wait=True)  # the writer takes it and waits
        time.sleep(0.3)
        good = [j.append_requests([row(f"g{i}a"), row(f"g{i}b")]) for i in range(20)]
        bad = j.append_requests([row("fresh-in-bad"), row("dup")])  # the second row breaks the unique id
        good += [j.append_requests([row(f"h{i}")]) for i in range(20)]
        other.execute("ROLLBACK")
        other.close()
        first.result(10)
        for fut in good:
            assert fut.result(10) is None
        with pytest.raises(JournalError, match="UNIQUE"):
            bad.result(10)
        assert j.commits - commits == 2  # the flush, then all 41 Submits in one transaction
        assert j.writable  # a constraint is not the disk
    finally:
        j.close()
    j, rec = Journal.open(tmp_path)
    ids = [r.id for r in rec.rows]
    j.close()
    assert len(ids) == 1 + 40 + 20 and "fresh-in-bad" not in ids  # the bad Submit is all-or-nothing itself
    assert ids.count("dup") == 1


def test_a_failed_transaction_is_retried_member_by_member(tmp_path, monkeypatch):
    """Where the whole transaction fails (not one statement), each member is retried alone."""
    j, _ = Journal.open(tmp_path)
    try:
        real = j._transaction
        calls = []

        def flaky(ops, failed):
            calls.append(len(ops))
            if len(ops) > 1:
                raise sqlite3.OperationalError("disk I/O error (simulated, on the group)")
            return real(ops, failed)

        monkeypatch.setattr(j, "_transaction", flaky)
        other = _hold_write_lock(tmp_path / DB_NAME)
        first = j._put(journal_mod._FLUSH, [()], wait=True)
        time.sleep(0.3)
        futs = [j.append_requests([row(f"m{i}")]) for i in range(5)]
        other.execute("ROLLBACK")
        other.close()
        first.result(10)
        for f in futs:
            assert f.result(10) is None
        assert 5 in calls and calls.count(1) >= 5
        assert j.writable  # the group failed, but every member then committed
    finally:
        j.close()


def test_concurrent_submits_survive_one_failing_write(make_server):
    """69 unrelated Submits were refused with UNAVAILABLE for one duplicate; now only the duplicate fails."""
    server = make_server()
    n = 40
    with PlannerClient(server.address, timeout=30) as c:
        c.submit([spec("first")])
        other = _hold_write_lock(server._journal.path)
        results: dict[str, object] = {}

        def one(i: int) -> None:
            try:
                results[f"c{i}"] = c.submit([spec(f"c{i}")])[0].accepted
            except PlannerError as exc:
                results[f"c{i}"] = exc.code

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        wait_for(lambda: getattr(server.core, "_pending_n", n) >= n, what="all Submits queued")
        dup = server._journal.append_requests([row("first")])  # bypasses the core's duplicate check
        other.execute("ROLLBACK")
        other.close()
        for t in threads:
            t.join(30)
        with pytest.raises(JournalError, match="UNIQUE"):
            dup.result(10)
        assert results == {f"c{i}": True for i in range(n)}
        assert {v.id for v in c.list()} == {"first"} | {f"c{i}" for i in range(n)}
        assert c.health() == "SERVING"


# --- health follows whether the journal can write ----------------------------------------------
def _fill_disk(j: Journal) -> None:
    """A full disk, as SQLite sees it: no page beyond those the file has (max_page_count)."""
    pages = j._conn.execute("PRAGMA page_count").fetchone()[0]
    j._conn.execute(f"PRAGMA max_page_count = {pages}")


def _free_disk(j: Journal) -> None:
    j._conn.execute("PRAGMA max_page_count = 1073741823")


def test_writable_tracks_failed_and_successful_commits(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_mod, "PROBE_S", 0.2)
    monkeypatch.setattr(journal_mod, "IDLE_TICK_S", 0.1)
    j, _ = Journal.open(tmp_path)
    seen: list[bool] = []
    unsubscribe = j.subscribe(seen.append)
    try:
        assert seen == [True] and j.writable
        _fill_disk(j)
        with pytest.raises(JournalError, match="full"):
            j.append_requests([row(f"x{i}") for i in range(300)]).result(10)
        assert not j.writable and seen == [True, False]
        time.sleep(0.6)  # probes keep failing while the disk is full
        assert not j.writable and seen == [True, False]
        _free_disk(j)
        wait_for(lambda: j.writable, what="the probe to find the journal writable")
        assert seen == [True, False, True]
        j.append_requests([row(f"y{i}") for i in range(300)]).result(10)
        unsubscribe()
        _fill_disk(j)
        with pytest.raises(JournalError):
            j.append_requests([row(f"z{i}") for i in range(300)]).result(10)
        assert seen == [True, False, True]  # unsubscribed: no more calls
    finally:
        _free_disk(j)
        j.close()


def test_health_is_not_serving_while_the_journal_cannot_write(make_server, monkeypatch):
    monkeypatch.setattr(journal_mod, "PROBE_S", 0.2)
    server = make_server()
    j = server._journal
    with PlannerClient(server.address, timeout=30) as c:
        assert c.health() == "SERVING" and c.health(SERVICE_NAME) == "SERVING"
        c.submit([spec("before")])
        _fill_disk(j)
        try:
            err = None
            try:
                c.submit([spec(f"full{i}") for i in range(300)])
            except PlannerError as exc:
                err = exc
            assert err is not None and err.code is grpc.StatusCode.UNAVAILABLE
            wait_for(lambda: c.health() == "NOT_SERVING" and c.health(SERVICE_NAME) == "NOT_SERVING",
                     what="health NOT_SERVING")
            time.sleep(1.5)  # the periodic probe fails too: still NOT_SERVING
            assert c.health() == "NOT_SERVING" and not j.writable
        finally:
            _free_disk(j)
        wait_for(lambda: c.health() == "SERVING" and c.health(SERVICE_NAME) == "SERVING", timeout=15,
                 what="health SERVING again after the probe")
        out = c.submit([spec(f"after{i}") for i in range(300)])
        assert all(o.accepted for o in out)
        assert {v.id for v in c.list()} == {"before"} | {f"after{i}" for i in range(300)}
