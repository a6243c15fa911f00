"""Open Optuna's RDBStorage the way a fleet needs it, and keep passwords out of every message.

SQLite (`sqlite:///gemma_search.db`) is the default for one machine; PostgreSQL
(`postgresql+psycopg2://USER:PASSWORD@HOST/DB`) for many. The URL comes from `--storage`, the
environment variable `GEMMA_SEARCH_STORAGE`, or the spec, in that order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gemma_search.errors import StorageError, first_line

__all__ = [
    "DEFAULT_STORAGE",
    "STORAGE_ENV",
    "StudyLock",
    "begin_immediate",
    "open_storage",
    "redact",
    "resolve_storage_url",
]

DEFAULT_STORAGE = "sqlite:///gemma_search.db"
STORAGE_ENV = "GEMMA_SEARCH_STORAGE"


def resolve_storage_url(flag: str | None, spec_url: str | None = None) -> str:
    """`--storage` beats `$GEMMA_SEARCH_STORAGE` beats the spec beats the default."""
    return flag or os.environ.get(STORAGE_ENV) or spec_url or DEFAULT_STORAGE


def redact(url: str) -> str:
    """The URL with its password replaced by ***: the only form that may be printed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable storage URL>"


def open_storage(url: str, *, must_exist: bool = False,
                 heartbeat: tuple[int, int, int] | None = None) -> Any:
    """An `optuna.storages.RDBStorage` on `url`, connected and checked.

    `must_exist`: for commands that read a study (status, export, worker), a SQLite file that
    is not there is an error instead of a new empty database.
    `heartbeat`: (interval, grace period, max retries) for workers, which heartbeat their
    running trial so that a dead worker's trial is failed and re-queued, with its reported
    values (DESIGN decision 2: only `Study.optimize` heartbeats).
    """
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    shown = redact(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"storage URL {shown} is not a SQLAlchemy URL; use "
                           "sqlite:///FILE or postgresql+psycopg2://USER@HOST/DB") from None
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if must_exist and database not in ("", ":memory:") and not Path(database).exists():
            raise StorageError(f"storage {shown} does not exist (no file {database}); create "
                               "a study first with `gemma-search create SPEC` or pass --storage")
        # Several worker processes write one SQLite file: wait for its lock, do not fail.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        # Idle connections die during hours-long trials (optuna#5600): pre-ping; and keep
        # each worker's pool small so that a default server serves many workers.
        engine_kwargs.update(pool_size=1, max_overflow=1, pool_recycle=300)
    kwargs: dict[str, Any] = {}
    if heartbeat is not None:
        interval, grace, retries = heartbeat
        kwargs = {
            "heartbeat_interval": interval,
            "grace_period": grace,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=retries, inherit_intermediate_values=True),
        }
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except (SQLAlchemyError, ImportError, ValueError, RuntimeError) as exc:
        reason = _scrub(first_line(exc), parsed.password)
        raise StorageError(f"cannot connect to storage {shown}: {reason}; check the URL, that "
                           "the server is running and the credentials") from None
    if parsed.get_backend_name() == "sqlite":
        begin_immediate(storage.engine)
        storage.engine.dispose()  # connections opened before the hooks are dropped
    return storage


def begin_immediate(engine: Any) -> None:
    """Make every SQLite transaction take the write lock when it begins.

    Optuna claims a waiting trial by reading it `with_for_update()` and then marking it
    RUNNING. SQLite ignores FOR UPDATE, and its default deferred transactions let two worker
    processes both read WAITING and both run the trial (seen here: "Cannot tell a COMPLETE
    trial"). BEGIN IMMEDIATE makes read-then-write atomic; SQLite serialises writers anyway.
    Our own tables (`db.py`) need it too: a deferred transaction that reads then writes gets
    "database is locked" at once, without waiting out the timeout, if another process wrote
    in between. This is SQLAlchemy's documented recipe for pysqlite transactions.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" hook below emit BEGIN

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _scrub(text: str, password: Any) -> str:
    """Driver messages may quote the URL: never let the password through."""
    secret = str(password) if password else ""
    return text.replace(secret, "***") if secret else text


class StudyLock:
    """A lock shared by every worker of one study, on any machine that reaches its storage.

    PostgreSQL: a session advisory lock, on a connection opened for the hold and closed after.
    SQLite: an flock on a file beside the database (SQLite is one machine's storage anyway).
    `release` may be called more than once; only the first call releases.
    """

    def __init__(self, url: str, study_name: str) -> None:
        from sqlalchemy.engine import make_url

        self._url = url
        self._key = f"gemma_search:{study_name}"
        parsed = make_url(url)
        self._backend = parsed.get_backend_name()
        self._path = f"{parsed.database}.lock" if self._backend == "sqlite" else None
        self._held: Any = None

    def acquire(self) -> None:
        if self._backend == "sqlite":
            import fcntl

            if self._path in (None, ".lock", ":memory:.lock"):
                self._held = True  # an in-memory database lives in one process
                return
            handle = open(self._path, "a")  # noqa: SIM115 - held until release()
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._held = handle
        elif self._backend == "postgresql":
            from sqlalchemy import create_engine, text
            from sqlalchemy.pool import NullPool

            engine = create_engine(self._url, poolclass=NullPool)
            conn = engine.connect()
            conn.execute(text("SELECT pg_advisory_lock(hashtextextended(:k, 0))"),
                         {"k": self._key})
            self._held = (engine, conn)
        else:
            self._held = True  # other databases: no cross-process lock (documented)

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None or held is True:
            return
        if self._backend == "sqlite":
            import fcntl

            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()
            return
        from sqlalchemy import text

        engine, conn = held
        try:
            conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"),
                         {"k": self._key})
        finally:
            conn.close()  # closing the session drops the lock even if unlock failed
            engine.dispose()
