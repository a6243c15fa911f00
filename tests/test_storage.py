"""Storage URLs: where they come from, the one factory that connects to them, and that a
password never shows."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gemma_search.errors import StorageError, first_line
from gemma_search.storage import (
    cause_line,
    is_transient,
    make_engine,
    open_storage,
    redact,
    resolve_storage_url,
)

REPO = Path(__file__).resolve().parents[1]


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "url"
    secret.write_text("postgresql+psycopg2://u:pw@db/x\n")
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE", raising=False)
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE_FILE", raising=False)
    assert resolve_storage_url(None) == "sqlite:///gemma_search.db"
    assert resolve_storage_url(None, "sqlite:///spec.db") == "sqlite:///spec.db"
    monkeypatch.setenv("GEMMA_SEARCH_STORAGE_FILE", str(secret))
    assert resolve_storage_url(None, "sqlite:///spec.db") == "postgresql+psycopg2://u:pw@db/x"
    monkeypatch.setenv("GEMMA_SEARCH_STORAGE", "sqlite:///env.db")
    assert resolve_storage_url(None) == "sqlite:///env.db"
    assert resolve_storage_url("sqlite:///flag.db") == "sqlite:///flag.db"


def test_unreadable_url_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE", raising=False)
    monkeypatch.setenv("GEMMA_SEARCH_STORAGE_FILE", str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="cannot be read"):
        resolve_storage_url(None)
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("GEMMA_SEARCH_STORAGE_FILE", str(tmp_path / "empty"))
    with pytest.raises(StorageError, match="is empty"):
        resolve_storage_url(None)


def test_redact_hides_the_password() -> None:
    assert redact("postgresql+psycopg2://gemma:hunter2@db:5432/gs") == (
        "postgresql+psycopg2://gemma:***@db:5432/gs")
    assert redact("sqlite:///x.db") == "sqlite:///x.db"
    assert "hunter2" not in redact("not a url hunter2")


# --- one factory -----------------------------------------------------------------------------


def test_no_engine_is_built_outside_the_factory() -> None:
    """Every engine and Optuna storage of the package and the benchmarks comes from
    `storage.make_engine` / `open_storage`; the plain-Optuna baseline of
    bench/storage_load.py hands Optuna a URL on purpose."""
    files = [*(REPO / "gemma_search").rglob("*.py"), *(REPO / "bench").glob("*.py")]
    builders = [f"{path.relative_to(REPO)}: {line.strip()}" for path in files
                if path != REPO / "gemma_search" / "storage.py"
                for line in path.read_text().splitlines()
                if "create_engine(" in line or "RDBStorage(" in line]
    assert builders == []


def test_engines_hold_no_pool_on_postgresql_and_lock_sqlite_at_begin(storage_url: str) -> None:
    """make_engine and open_storage build the same engine: no pool on PostgreSQL (design
    decision 1); on SQLite a 60 s lock timeout and BEGIN IMMEDIATE, so a transaction holds
    the write lock from its first statement, a read included."""
    import sqlite3

    from sqlalchemy import event, text
    from sqlalchemy.pool import NullPool

    from gemma_search import db

    assert db.make_engine is make_engine
    storage = open_storage(storage_url)
    engines = [make_engine(storage_url), storage.engine]
    driver_args: list[dict[str, Any]] = []  # what each new connection was opened with
    try:
        for engine in engines:
            if engine.dialect.name == "postgresql":
                assert isinstance(engine.pool, NullPool)
                continue
            event.listen(engine, "do_connect", lambda *args: driver_args.append(args[3]))
            with engine.begin() as conn:
                conn.execute(text("SELECT 1"))
                assert driver_args.pop()["timeout"] == 60
                other = sqlite3.connect(engine.url.database or "", timeout=0,
                                        isolation_level=None)
                try:
                    with pytest.raises(sqlite3.OperationalError, match="locked"):
                        other.execute("BEGIN IMMEDIATE")
                finally:
                    other.close()
    finally:
        for engine in engines:
            engine.dispose()


def test_one_cause_one_message_on_every_path(tmp_path: Path) -> None:
    """The same failure reads the same whether opening Optuna's storage, upgrading, or using
    our tables met it (one translation: `storage.storage_errors`)."""
    from gemma_search import db

    def messages(url: str) -> set[str]:
        found = set()
        for call in (lambda: open_storage(url), lambda: db.upgrade_all(url),
                     lambda: db.load_study_spec(make_engine(url), "x")):
            error = _raised(call)
            assert isinstance(error, StorageError), error
            found.add(str(error).replace("storage postgresql", "to storage postgresql"))
        return found

    no_folder = messages(f"sqlite:///{tmp_path / 'no' / 'such' / 's.db'}")
    assert len(no_folder) == 1 and "check that its directory exists" in no_folder.pop()
    no_driver = messages("mysql://gs:S3cr3t@db/gs")
    assert len(no_driver) == 1
    assert no_driver.pop() == ("storage URL mysql://gs:***@db/gs names a database driver "
                               "that is not installed (No module named 'MySQLdb'); use "
                               "sqlite:///FILE or postgresql+psycopg2://USER@HOST/DB")
    refused = messages(f"postgresql+psycopg2://gs:S3cr3t@127.0.0.1:{_closed_port()}/gs")
    # Opening says "cannot connect to storage ...", a session "storage ... failed: ...";
    # the driver's own words either way, never the wrapper's "(psycopg2.OperationalError)".
    assert all("Connection refused" in m and "S3cr3t" not in m and "(psycopg2" not in m
               for m in refused), refused


def test_the_study_lock_is_held_in_one_transaction(postgres_url: str) -> None:
    """The advisory lock is a session lock, but its hold is one open transaction: what keeps
    it on one server connection behind a pgbouncer in transaction mode, and what lets a
    second worker in only after the unlock."""
    from sqlalchemy import text

    from gemma_search.storage import StudyLock

    def holders() -> list[tuple[str, bool]]:
        engine = make_engine(postgres_url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(text(
                    "SELECT a.state, l.granted FROM pg_locks l JOIN pg_stat_activity a "
                    "USING (pid) WHERE l.locktype = 'advisory' AND a.datname = "
                    "current_database()"))]
        finally:
            engine.dispose()

    first, second = StudyLock(postgres_url, "txn"), StudyLock(postgres_url, "txn")
    first.acquire()
    try:
        assert holders() == [("idle in transaction", True)]
        waiter = threading.Thread(target=second.acquire, daemon=True)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # still polling: the lock is taken
    finally:
        first.release()
    waiter.join(10)
    assert not waiter.is_alive()
    second.release()
    assert holders() == []


# --- is_transient, against the errors the drivers really raise -------------------------------


def _raised(operation: Callable[[], object]) -> BaseException:
    try:
        operation()
    except Exception as exc:
        return exc
    raise AssertionError("expected an error")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once the socket closes


def test_a_refused_connection_is_transient_however_it_is_wrapped() -> None:
    import optuna
    import psycopg2

    from gemma_search import db

    port = _closed_port()
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/x"
    refused = _raised(lambda: psycopg2.connect(host="127.0.0.1", port=port, user="postgres"))
    assert "Connection refused" in str(refused) and is_transient(refused)
    # Optuna wraps it (StorageInternalError or SQLAlchemy's OperationalError, with .orig)
    optuna_error = _raised(lambda: optuna.storages.RDBStorage(url))
    assert is_transient(optuna_error)
    assert "Connection refused" in cause_line(optuna_error)  # the driver's words, not Optuna's
    # and so does gemma-search's own session scope (a StorageError, `from None`)
    engine = db.make_engine(url)
    try:
        ours = _raised(lambda: db.load_study_spec(engine, "any"))
    finally:
        engine.dispose()
    assert isinstance(ours, StorageError) and is_transient(ours)


def test_sqlite_busy_is_transient_and_a_missing_folder_is_not(tmp_path: Path) -> None:
    import sqlite3

    holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(tmp_path / "s.db", timeout=0.05, isolation_level=None)
    busy = _raised(lambda: other.execute("BEGIN IMMEDIATE"))
    holder.close()
    other.close()
    assert "database is locked" in str(busy) and is_transient(busy)
    missing = _raised(lambda: sqlite3.connect(tmp_path / "no" / "such" / "s.db"))
    assert not is_transient(missing)


def test_a_terminated_session_is_transient(postgres_url: str) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    dsn = make_url(postgres_url)
    conn = psycopg2.connect(host=dsn.host, port=dsn.port, user=dsn.username,
                            dbname=dsn.database)
    conn.autocommit = True
    lost = _raised(lambda: conn.cursor().execute("SELECT pg_terminate_backend("
                                                 "pg_backend_pid())"))
    assert "server closed the connection" in str(lost) and is_transient(lost)
    closed = _raised(lambda: conn.cursor())  # the connection is gone for good
    assert isinstance(closed, psycopg2.InterfaceError) and is_transient(closed)


def test_serialization_failures_and_deadlocks_are_transient(postgres_url: str) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    dsn = make_url(postgres_url)
    a, b = (psycopg2.connect(host=dsn.host, port=dsn.port, user=dsn.username,
                             dbname=dsn.database) for _ in range(2))
    try:
        with a.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS gs_test_race (id int PRIMARY KEY, v int)")
            cur.execute("INSERT INTO gs_test_race VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING")
        a.commit()
        # 40001: two serializable transactions update the row both read
        for conn in (a, b):
            conn.set_session(isolation_level="SERIALIZABLE")
            conn.cursor().execute("SELECT v FROM gs_test_race WHERE id = 1")
        a.cursor().execute("UPDATE gs_test_race SET v = 1 WHERE id = 1")
        a.commit()
        conflict = _raised(lambda: b.cursor().execute("UPDATE gs_test_race SET v = 2 "
                                                      "WHERE id = 1"))
        b.rollback()
        assert getattr(conflict, "pgcode", None) == "40001" and is_transient(conflict)
        # 40P01: each holds the row the other one wants
        for conn in (a, b):
            conn.set_session(isolation_level="READ COMMITTED")
        a.cursor().execute("UPDATE gs_test_race SET v = 3 WHERE id = 1")
        b.cursor().execute("UPDATE gs_test_race SET v = 3 WHERE id = 2")
        seen: list[BaseException] = []
        waiter = threading.Thread(target=lambda: seen.append(_raised_or_none(
            lambda: a.cursor().execute("UPDATE gs_test_race SET v = 4 WHERE id = 2"))))
        waiter.start()
        time.sleep(0.3)  # a waits on b's row; now b asks for a's
        other = _raised_or_none(lambda: b.cursor().execute("UPDATE gs_test_race SET v = 4 "
                                                           "WHERE id = 1"))
        waiter.join(timeout=30)
        deadlocks = [e for e in (*seen, other) if e is not None]
        assert [getattr(e, "pgcode", None) for e in deadlocks] == ["40P01"]
        assert is_transient(deadlocks[0])
    finally:
        for conn in (a, b):
            conn.rollback()
        with a.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS gs_test_race")
        a.commit()
        a.close()
        b.close()


def _raised_or_none(operation: Callable[[], object]) -> BaseException | None:
    try:
        operation()
    except Exception as exc:
        return exc
    return None


def test_errors_a_person_must_fix_are_not_transient(postgres_url: str) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    dsn = make_url(postgres_url)

    def connect(**kwargs: object) -> Any:
        return psycopg2.connect(**{"host": dsn.host, "port": dsn.port, "user": dsn.username,
                                   "dbname": dsn.database, **kwargs})

    no_database = _raised(lambda: connect(dbname="gs_no_such_database"))
    assert "does not exist" in str(no_database) and not is_transient(no_database)
    no_role = _raised(lambda: connect(user="gs_no_such_role"))
    assert "does not exist" in str(no_role) and not is_transient(no_role)
    conn = connect()
    try:
        syntax = _raised(lambda: conn.cursor().execute("SELEC 1"))
        assert getattr(syntax, "pgcode", None) == "42601" and not is_transient(syntax)
    finally:
        conn.close()


@pytest.mark.slow
def test_a_server_that_is_starting_or_full_is_transient() -> None:
    """Real refusals from clusters of our own: in crash recovery ("starting up", "not yet
    accepting connections"), a standby without hot standby ("Hot standby mode is
    disabled"), a full server ("too many clients"); and a wrong password, which is not."""
    import psycopg2

    from tests.test_outages import ScratchCluster, need_server_binaries

    need_server_binaries()

    def connect(cluster: ScratchCluster, **kwargs: object) -> Any:
        return psycopg2.connect(**{"host": "127.0.0.1", "port": cluster.port,
                                   "user": "postgres", "dbname": "postgres",
                                   "connect_timeout": 5, **kwargs})

    crashed = ScratchCluster(max_connections=4, superuser_reserved_connections=0,
                             max_wal_senders=0, checkpoint_timeout="1h")
    try:
        crashed.start()
        # A full server: 53300
        held = [connect(crashed) for _ in range(4)]
        full = _raised(lambda: connect(crashed))
        assert "too many clients" in str(full) and is_transient(full)
        # WAL to replay after a crash, so that recovery lasts long enough to be met.
        held[0].autocommit = True
        held[0].cursor().execute("CREATE TABLE w AS SELECT g, md5(g::text) AS h "
                                 "FROM generate_series(1, 300000) AS g")
        for conn in held:
            conn.close()
        refusals: dict[str, BaseException] = {}
        for _ in range(3):  # recovery may be too quick to be met once; three crashes
            crashed.stop("immediate")
            crashed.start(wait=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    connect(crashed).close()
                    break
                except psycopg2.OperationalError as exc:
                    refusals.setdefault(first_line(exc).split("failed: ")[-1], exc)
                    time.sleep(0.002)
            if any("FATAL" in text for text in refusals):
                break
        assert refusals and all(is_transient(e) for e in refusals.values()), refusals
        assert any("FATAL" in text for text in refusals), refusals  # 57P03 met
    finally:
        crashed.destroy()

    standby = ScratchCluster(hot_standby="off")
    try:
        (standby.data / "standby.signal").touch()  # recovery for ever, no connections
        standby.start(wait=False)
        refused = wait_for_error(lambda: connect(standby))
        assert "Hot standby mode is disabled" in str(refused) and is_transient(refused)
    finally:
        standby.destroy()

    guarded = ScratchCluster(password="right")
    try:
        guarded.start()
        wrong = _raised(lambda: connect(guarded, password="wrong"))
        assert "password authentication failed" in str(wrong) and not is_transient(wrong)
    finally:
        guarded.destroy()


def wait_for_error(operation: Callable[[], object], timeout: float = 30) -> BaseException:
    """The first error `operation` raises other than "Connection refused" (a server that has
    not opened its port yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exc = _raised_or_none(operation)
        if exc is None:
            raise AssertionError("expected an error")
        if "Connection refused" not in str(exc):
            return exc
        time.sleep(0.05)
    raise AssertionError(f"still refused after {timeout} s")
