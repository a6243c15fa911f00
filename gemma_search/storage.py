"""One way to reach the database, and passwords kept out of every message.

SQLite (`sqlite:///gemma_search.db`) is the default for one machine; PostgreSQL
(`postgresql+psycopg2://USER:PASSWORD@HOST/DB`) for many. The URL comes from `--storage`, the
environment variable `GEMMA_SEARCH_STORAGE`, a file named by `GEMMA_SEARCH_STORAGE_FILE`, or
the spec, in that order.

Every connection gemma-search makes is built here (design decision 1): `make_engine` for a
SQLAlchemy engine (our tables, migrations, the study lock), `open_storage` for Optuna's
`RDBStorage`, both from the same engine options (no pool on PostgreSQL; SQLite's lock timeout
and `BEGIN IMMEDIATE`; connection retries for `storage.reconnect_seconds`). A driver error
met there becomes one `StorageError` in one place (`storage_errors`, after Optuna's
`_create_scoped_session`), and every secret is masked by one scrubber (`redact`,
`redact_text`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, quote_plus, unquote

from gemma_search.errors import StorageError, first_line

if TYPE_CHECKING:  # sqlalchemy is imported when a database is used, not by `--help`
    from sqlalchemy import Engine
    from sqlalchemy.engine import URL

__all__ = [
    "DEFAULT_STORAGE",
    "STORAGE_ENV",
    "STORAGE_FILE_ENV",
    "MASK",
    "SECRET_PARAMS",
    "StudyLock",
    "backoff",
    "begin_immediate",
    "has_password",
    "cause_line",
    "is_transient",
    "make_engine",
    "open_storage",
    "redact",
    "redact_text",
    "resolve_storage_url",
    "retry_connects",
    "retry_transient",
    "storage_errors",
    "without_password",
]

log = logging.getLogger("gemma_search.storage")

T = TypeVar("T")

DEFAULT_STORAGE = "sqlite:///gemma_search.db"
STORAGE_ENV = "GEMMA_SEARCH_STORAGE"
STORAGE_FILE_ENV = "GEMMA_SEARCH_STORAGE_FILE"


def resolve_storage_url(flag: str | None, spec_url: str | None = None) -> str:
    """`--storage`, then `$GEMMA_SEARCH_STORAGE`, then the file `$GEMMA_SEARCH_STORAGE_FILE`
    names (a mounted secret), then the spec, then the default.

    A URL with a password belongs in the variable or the file: a `--storage` flag shows in
    process listings.
    """
    if flag:
        return flag
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV]
    path = os.environ.get(STORAGE_FILE_ENV)
    if path:
        try:
            url = Path(path).read_text().strip()
        except OSError as exc:
            raise StorageError(f"{STORAGE_FILE_ENV} names {path}, which cannot be read "
                               f"({exc.strerror}); point it at a file holding the storage "
                               "URL") from None
        if not url:
            raise StorageError(f"{STORAGE_FILE_ENV} names {path}, which is empty; write the "
                               "storage URL into it")
        return url
    return spec_url or DEFAULT_STORAGE


#: Query parameters libpq reads as a secret, or as where one is kept: psycopg2 hands the
#: query of a URL to libpq, so `?password=...` logs in exactly as `user:PASSWORD@` does.
SECRET_PARAMS = ("password", "sslpassword", "passfile")
MASK = "***"


def redact(url: str) -> str:
    """The URL with every secret replaced by ***: the only form that may be printed.

    Secrets are the user-info password (`user:PASSWORD@host`) and the query parameters in
    `SECRET_PARAMS`. A URL that does not parse (`host:notaport`) is masked whole after its
    scheme: which of its parts is the password cannot be told.
    """
    parsed = _parse(url)
    if parsed is None:
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://{MASK}" if sep and _SCHEME.fullmatch(scheme) else MASK
    query = {key: MASK if key.lower() in SECRET_PARAMS else value
             for key, value in parsed.query.items()}
    shown = parsed.set(query=query).render_as_string(hide_password=True)
    return shown.replace(quote(MASK, safe=""), MASK)  # the query's *** comes back escaped


def redact_text(text: str, url: str) -> str:
    """`text` (a driver's message, say) with every secret of `url` replaced by ***."""
    return _scrub(text, *_secrets(url))


def has_password(url: str) -> bool:
    """Whether `url` holds a password, in its user-info or its query."""
    parsed = _parse(url)
    if parsed is None:
        return any(pattern.search(url) for pattern in _LOOSE_SECRETS)
    return bool(parsed.password) or any(key.lower() in _PASSWORDS for key in parsed.query)


def without_password(url: str) -> str:
    """`url` with its passwords left out, not masked: what may be stored or exported.

    libpq then looks for the password where it looks for one of a URL that has none
    (`PGPASSWORD`, `~/.pgpass`, a `passfile` the query names, which is kept), so the URL
    still connects where those are set. An unparsable URL has no part that is safe to
    keep: `redact`'s mask stands in for it.
    """
    parsed = _parse(url)
    if parsed is None:
        return redact(url)
    query = {key: value for key, value in parsed.query.items()
             if key.lower() not in _PASSWORDS}
    # `URL.set` skips None ("leave as is"): replace the field itself.
    return parsed._replace(password=None).set(query=query).render_as_string(
        hide_password=False)


#: A URL scheme (`postgresql+psycopg2`): kept when the rest of an unparsable URL is masked.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,40}")
#: Where an unparsable URL's secrets may sit: `scheme://user:SECRET@`, `password=SECRET`.
_LOOSE_SECRETS = (re.compile(r"://[^/@:]*:(.+)@"),
                  re.compile(rf"(?i)\b(?:{'|'.join(SECRET_PARAMS)})=([^&#\s]+)"))
#: The query parameters that hold a password itself (`passfile` names a file).
_PASSWORDS = ("password", "sslpassword")


def _parse(url: str) -> Any:
    """`make_url(url)`, or None where it does not parse (a bad port raises ValueError).

    A host with an `@` in it is a password with an unescaped `@` (`user:pa@ss@host`): the
    parser cut the password short, so the URL counts as unparsable and is masked whole.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return None
    return None if "@" in (parsed.host or "") else parsed


def _secrets(url: str) -> list[str]:
    """Every secret `url` holds, as written and as decoded; the whole URL if it does not
    parse, and whatever looks like a password in it."""
    parsed = _parse(url)
    if parsed is None:
        found = [url, url.partition("://")[2]]
        for pattern in _LOOSE_SECRETS:
            for match in pattern.findall(url):
                # `user:pa@ss@host`: the driver takes `pa` as the password, `ss@host` as
                # the host, and may quote either.
                found += [match, *match.split("@")]
    else:
        found = [parsed.password] if parsed.password else []
        for key, value in parsed.query.items():
            if key.lower() in SECRET_PARAMS:
                found += [value] if isinstance(value, str) else list(value)
    # A driver may quote the URL as written (percent-escaped) or the value it decoded.
    return [form for secret in found if secret
            for form in {str(secret), quote(str(secret), safe=""), quote_plus(str(secret)),
                         unquote(str(secret))}]


# --- the one factory: every engine and storage -------------------------------------------------

_URL_HINT = "use sqlite:///FILE or postgresql+psycopg2://USER@HOST/DB"
_UPGRADE_HINT = "run `gemma-search db upgrade`"
#: Seconds a SQLite connection waits for another process's write lock before "database is
#: locked": many worker processes write one file.
_SQLITE_TIMEOUT = 60


def make_engine(url: str, *, connect_patience: float = 0.0) -> Engine:
    """A SQLAlchemy engine on `url`, built as every engine of gemma-search is (design
    decision 1): for our tables (`db`), their migrations and the study lock.

    `connect_patience`: seconds to keep retrying a refused connection (workers); 0 for
    commands a person runs, which fail at once. Nothing connects until the engine is used.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.exc import NoSuchModuleError

    parsed = _parse_or_fail(url)
    try:
        engine = create_engine(url, **_engine_options(parsed))
    except (NoSuchModuleError, ImportError) as exc:  # a driver that is not installed
        raise _storage_error(exc, url) from None
    _prepare(engine, connect_patience)
    return engine


def open_storage(url: str, *, must_exist: bool = False,
                 heartbeat: tuple[int, int, int] | None = None,
                 connect_patience: float = 0.0, check_schema: bool = True) -> Any:
    """An `optuna.storages.RDBStorage` on `url`, connected and checked, its engine built
    with `make_engine`'s options and hooks.

    `must_exist`: for commands that read a study (status, export, worker), a SQLite file that
    is not there is an error instead of a new empty database.
    `heartbeat`: (interval, grace period, max retries) for workers, which heartbeat their
    running trial so that a dead worker's trial is failed and re-queued, with its reported
    values. The worker records the heartbeats itself (`gemma_search.worker`).
    `connect_patience`: seconds a worker keeps retrying a connection the server refuses
    (restarting, "too many clients"); commands run by a person fail at once.
    `check_schema`: False for `db upgrade`, which opens an older Optuna schema to upgrade it.
    """
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    parsed = _parse_or_fail(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if must_exist and database not in ("", ":memory:") and not Path(database).exists():
            raise StorageError(f"storage {redact(url)} does not exist (no file {database}); "
                               "create a study first with `gemma-search create SPEC` or pass "
                               "--storage")
    kwargs: dict[str, Any] = {"skip_compatibility_check": not check_schema}
    if heartbeat is not None:
        interval, grace, retries = heartbeat
        kwargs |= {
            "heartbeat_interval": interval,
            "grace_period": grace,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=retries, inherit_intermediate_values=True),
        }
    # Optuna builds the engine itself from these options, and connects while it is built
    # (tables, version check): that first connection is retried here, the later ones by the
    # hooks `_prepare` adds.
    deadline = time.monotonic() + connect_patience
    for attempt in itertools.count():
        try:
            storage = _tables_storage()(url, engine_kwargs=_engine_options(parsed), **kwargs)
            break
        except Exception as exc:
            # Optuna wraps a refused connection in StorageInternalError: read the chain.
            if is_transient(exc) and time.monotonic() < deadline:
                time.sleep(backoff(attempt))
                continue
            known = (SQLAlchemyError, ImportError, ValueError, RuntimeError,
                     optuna.exceptions.OptunaError)
            if not isinstance(exc, known):
                raise
            raise _storage_error(exc, url, connecting=True) from None
    _prepare(storage.engine, connect_patience)
    if parsed.get_backend_name() == "sqlite":
        storage.engine.dispose()  # connections opened before the hooks are dropped
    return storage


@functools.cache
def _tables_storage() -> type:
    """`RDBStorage` whose trial reads (every `get_all_trials`, its own and those of the
    cache Optuna puts in front of it, `_CachedStorage`) go through `reads.trial_rows`: one
    statement per table with the collector paused, not ORM objects in chunks of 500. The
    first read of a 10,000-trial study is what a worker's sampler, the median pruner and
    optuna-dashboard wait for; everything else is Optuna's own."""
    import optuna

    class TablesStorage(optuna.storages.RDBStorage):
        def _get_trials(self, study_id: int, states: Any, included_trial_ids: set[int],
                        trial_id_greater_than: int) -> list[Any]:
            from gemma_search.reads import trial_rows

            if trial_id_greater_than < 0:  # Optuna's reader: everything, `included` or not
                return trial_rows(self, study_id, 0, states=states)
            also = [i for i in included_trial_ids if i <= trial_id_greater_than]
            return trial_rows(self, study_id, trial_id_greater_than + 1, also, states)

        def get_study_id_from_name(self, study_name: str) -> int:
            # A study keeps its id for life, and Optuna asks for it often (each `Study`
            # object made, such as Hyperband's per bracket at every evaluation).
            ids = self.__dict__.setdefault("_gs_study_ids", {})
            if study_name not in ids:
                ids[study_name] = super().get_study_id_from_name(study_name)
            return int(ids[study_name])

        def delete_study(self, study_id: int) -> None:
            super().delete_study(study_id)
            self.__dict__.get("_gs_study_ids", {}).clear()

        def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
            """`set_trial_user_attr` for each item, in one transaction: one connection
            instead of one each (a trial's results are a dozen attributes)."""
            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session

            with _create_scoped_session(self.scoped_session, True) as session:
                for key, value in attrs.items():
                    self._set_trial_attr_without_commit(
                        session, models.TrialUserAttributeModel, trial_id, key, value)

    return TablesStorage


def set_user_attrs(trial: Any, attrs: dict[str, Any]) -> None:
    """`trial.set_user_attr(key, value)` for every item of `attrs` (an `optuna.Trial`), in
    one transaction where the storage is gemma-search's."""
    storage = trial.storage
    write = getattr(getattr(storage, "_backend", storage), "set_trial_user_attrs", None)
    if write is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    write(trial._trial_id, attrs)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # what `set_user_attr` keeps too


@contextmanager
def storage_errors(url: str, *, connecting: bool = False) -> Iterator[None]:
    """Database work inside raises a driver error as one `StorageError`: one line, the
    password masked, the likely cause and what to do (Optuna's `_create_scoped_session`).

    Translated: every error the driver raised (SQLAlchemy's `DBAPIError`: server,
    connection, schema) but an IntegrityError, which is the caller's to handle (a row another
    worker inserted first). Anything else is a bug and keeps its traceback. The
    `StorageError` keeps the driver's error as its context, so `is_transient` still tells an
    outage from a mistake.
    `connecting`: the block opens the database; a generic failure reads "cannot connect".
    """
    from sqlalchemy.exc import DBAPIError, IntegrityError

    try:
        yield
    except IntegrityError:
        raise
    except DBAPIError as exc:
        raise _storage_error(exc, url, connecting=connecting) from None


def _parse_or_fail(url: str) -> URL:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise StorageError(f"storage URL {redact(url)} is not a SQLAlchemy URL; "
                           f"{_URL_HINT}") from None


def _engine_options(parsed: URL) -> dict[str, Any]:
    """`create_engine`'s arguments for every engine, ours and Optuna's alike."""
    # A pooled connection idle through an hours-long trial may be dead: ping it first
    # (optuna#5600). A new connection is never pinged, so with no pool this costs nothing.
    options: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        # Several worker processes write one SQLite file: wait for its lock, do not fail.
        options["connect_args"] = {"timeout": _SQLITE_TIMEOUT}
    else:
        from sqlalchemy.pool import NullPool

        # No pool: a connection lives for one operation. Plain Optuna holds about two per
        # worker for the worker's life (measured: 32 workers held 66), so a default server
        # (max_connections=100) refuses workers from about 50 on; and idle connections die
        # during hours-long trials anyway (optuna#5600). Opening one costs milliseconds per
        # operation; a trial makes a few operations a minute.
        options["poolclass"] = NullPool
    return options


def _prepare(engine: Engine, connect_patience: float) -> None:
    """The hooks every engine gets: SQLite's BEGIN IMMEDIATE, connection retries."""
    if engine.dialect.name == "sqlite":
        begin_immediate(engine)
    if connect_patience > 0:
        retry_connects(engine, connect_patience)


def _storage_error(exc: BaseException, url: str, *, connecting: bool = False) -> StorageError:
    """One line: what failed, where (password masked), the driver's words, what to do.

    Decided by error type, SQLSTATE and SQLite's result code, with one exception: SQLite
    reports a missing table or column as a plain SQLITE_ERROR, with only its words to tell.
    """
    import sqlite3

    from sqlalchemy.exc import NoSuchModuleError

    shown = redact(url)
    reason = redact_text(cause_line(exc), url)  # driver messages may quote the URL
    chain = list(_causes(exc))
    if any(isinstance(link, NoSuchModuleError | ImportError) for link in chain):
        return StorageError(f"storage URL {shown} names a database driver that is not "
                            f"installed ({reason}); {_URL_HINT}")
    pgcode = next((code for link in chain if (code := getattr(link, "pgcode", None))), None)
    sqlite_code = next(((getattr(link, "sqlite_errorcode", 0) or 0) & 0xFF for link in chain
                        if isinstance(link, sqlite3.Error)), None)
    low = reason.lower()
    if pgcode == "42P01" or (sqlite_code is not None and "no such table" in low):
        return StorageError(f"gemma-search tables are missing in {shown} ({reason}); "
                            f"{_UPGRADE_HINT}")
    if pgcode == "42703" or (sqlite_code is not None
                             and ("no such column" in low or "has no column" in low)):
        return StorageError(f"gemma-search tables in {shown} are older than this version "
                            f"({reason}); {_UPGRADE_HINT}")
    if sqlite_code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StorageError(f"SQLite database {shown} stayed locked for {_SQLITE_TIMEOUT} s "
                            f"({reason}); retry, or use PostgreSQL for many workers")
    if sqlite_code == _SQLITE_CANTOPEN:
        return StorageError(f"cannot open SQLite database {shown} ({reason}); check that "
                            "its directory exists and is writable")
    what = f"cannot connect to storage {shown}:" if connecting else f"storage {shown} failed:"
    return StorageError(f"{what} {reason}; check the URL, that the server is running and "
                        "the credentials")


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


def retry_connects(engine: Any, patience: float) -> None:
    """Retry a refused connection for up to `patience` seconds, with jittered backoff.

    A restarting PostgreSQL refuses connections for seconds ("the database system is
    starting up", "Connection refused"), and a busy one answers "too many clients already"
    (optuna#1347). A worker in the middle of a day-long study should wait, not die. Errors
    that waiting cannot fix (authentication, an unknown database) still raise at once.
    """
    from sqlalchemy import event

    url = engine.url.render_as_string(hide_password=False)

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        started = time.monotonic()
        said = ""
        for attempt in itertools.count():
            try:
                connection = dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                waited = time.monotonic() - started
                if not (is_transient(exc) and waited < patience):
                    raise
                why = redact_text(first_line(exc), url)
                if why != said:  # one line per reason met (refused, recovering), not per try
                    log.warning("storage unavailable (%s); retrying the connection for up to "
                                "%.0f s", why, patience)
                    said = why
                time.sleep(min(backoff(attempt), patience - waited))
                continue
            if attempt:
                log.warning("storage connection back after %.1f s", time.monotonic() - started)
            return connection
        raise AssertionError("unreachable")


#: SQLSTATEs (PostgreSQL, appendix A "Error Codes") that pass by themselves, beside class 08
#: (connection exception). Anything else needs a person.
_TRANSIENT_SQLSTATES = frozenset({
    "53300",  # too_many_connections
    "57P01",  # admin_shutdown: a fast stop, pg_terminate_backend
    "57P02",  # crash_shutdown: another backend crashed and the server restarts
    "57P03",  # cannot_connect_now: starting up, shutting down, in crash recovery
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
})

#: The server's words for the SQLSTATEs above, as libpq reports them when connecting. libpq
#: gives an error met while a connection starts up without its SQLSTATE (psycopg2 leaves
#: `pgcode` None), so there, and only there, the message decides. Any other refusal at that
#: point (authentication, an unknown database or role, pg_hba.conf) needs a person.
_REFUSALS_THAT_PASS = (
    "the database system is starting up",  # 57P03
    "the database system is shutting down",  # 57P03
    "the database system is in recovery mode",  # 57P03
    "the database system is not yet accepting connections",  # 57P03: crash recovery
    "the database system is not accepting connections",  # 57P03: "Hot standby mode is disabled"
    "too many clients already",  # 53300
    "remaining connection slots are reserved",  # 53300
    "terminating connection due to administrator command",  # 57P01
    "terminating connection because of crash of another server process",  # 57P02
)

#: SQLite's result codes for "another connection holds the lock" (sqlite3 reports them on
#: `sqlite_errorcode` since Python 3.11; the extended codes keep them in the low byte).
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
#: "unable to open database file": a folder that is not there or not writable.
_SQLITE_CANTOPEN = 14


def is_transient(exc: BaseException) -> bool:
    """True for a storage error that waiting can fix: a server restarting or in crash
    recovery, a connection refused or lost, a full server, a serialization failure or
    deadlock, a SQLite file locked by another process.

    Decided by the driver's error type and SQLSTATE, read along the chain of causes: Optuna
    wraps driver errors in StorageInternalError, SQLAlchemy in its DBAPIError (`.orig`), and
    `db.session_scope` in a StorageError.
    """
    for link in _causes(exc):
        verdict = _transient(link)
        if verdict is not None:
            return verdict
    return False


def cause_line(exc: BaseException) -> str:
    """The first line of the innermost error under Optuna's and SQLAlchemy's wrapping: the
    driver's own words ("Connection refused"), not Optuna's "An exception is raised during
    the commit". May quote the URL: pass it through `redact_text` before printing."""
    root = exc
    for _ in range(16):
        below = root.__cause__ or getattr(root, "orig", None)
        if not isinstance(below, BaseException) or below is root:
            break
        root = below
    return first_line(root)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < 16:
        seen.add(id(link))
        yield link
        link = link.__cause__ or getattr(link, "orig", None) or link.__context__


def _transient(exc: BaseException) -> bool | None:
    """True or False for a driver's error; None for anything else (read its cause)."""
    import sqlite3
    import sys

    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    # Only an error psycopg2 raised can be its: never import it here for the check.
    psycopg2 = sys.modules.get("psycopg2")
    if psycopg2 is None or not isinstance(exc, psycopg2.Error):
        return None
    code = getattr(exc, "pgcode", None)
    if code:
        return code.startswith("08") or code in _TRANSIENT_SQLSTATES
    if isinstance(exc, psycopg2.InterfaceError):
        return True  # "connection already closed": the next operation opens a new one
    if not isinstance(exc, psycopg2.OperationalError):
        return False
    text = str(exc)
    if "FATAL:" not in text:
        # libpq's own account of a connection it could not open or lost ("Connection
        # refused", "server closed the connection unexpectedly", "timeout expired"): the
        # server is away, not answering no.
        return True
    return any(phrase in text for phrase in _REFUSALS_THAT_PASS)


def backoff(attempt: int) -> float:
    """0.2 s, 0.4 s, ... capped at 5 s, with jitter so that 128 workers do not retry in step."""
    return min(5.0, 0.2 * 2 ** min(attempt, 8)) * random.uniform(0.5, 1.0)


def retry_transient(operation: Callable[[], T], *, patience: float, what: str) -> T:
    """`operation()`, called again after `backoff` while it fails with a transient storage
    error (`is_transient`), for up to `patience` seconds from the first failure.

    The one retry of every storage call a worker, `launch`, `status --watch` and `verify`
    make while they run; `patience` is the study's `storage.reconnect_seconds`, 0 to fail
    at once. `operation` must be safe to repeat: a failure may come after the server
    committed it (a connection lost on the commit's answer).
    """
    first_failure: float | None = None
    for attempt in itertools.count():
        started = time.monotonic()
        try:
            result = operation()
        except Exception as exc:
            # Counted from the start of the first failed call: a connection it waited for
            # (`retry_connects`) is part of the same outage, under the same limit.
            now = time.monotonic()
            first_failure = started if first_failure is None else first_failure
            if not is_transient(exc) or now - first_failure >= patience:
                raise
            if attempt == 0:
                log.warning("%s: storage unavailable (%s); retrying for up to %.0f s", what,
                            cause_line(exc), patience)
            time.sleep(min(backoff(attempt), max(0.0, first_failure + patience - now)))
            continue
        if first_failure is not None:
            log.warning("%s: storage back after %.1f s", what, time.monotonic() - first_failure)
        return result
    raise AssertionError("unreachable")


def _scrub(text: str, *secrets: Any) -> str:
    """Driver messages may quote the URL: never let a password through. Longest first, so
    that a secret containing another is masked whole."""
    for secret in sorted({str(s) for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


class StudyLock:
    """A lock shared by every worker of one study, on any machine that reaches its storage.

    PostgreSQL: a session advisory lock, on a connection opened for the hold and closed after.
    A server restart during the hold ends the session and the lock with it; whatever the
    holder does next under the lock meets the same outage, fails, and is retried from
    `acquire`. The hold is one transaction on that connection, from the try that gets the
    lock to the unlock (SQLAlchemy begins it, closing the connection ends it): a pgbouncer
    in transaction mode therefore keeps the lock's server connection for the whole hold, as
    session mode does (measured in docs/benchmarks.md). SQLite: an flock on a file beside
    the database (SQLite is one machine's storage anyway). `release` may be called more than
    once; only the first call releases.
    """

    def __init__(self, url: str, study_name: str, *, connect_patience: float = 0.0) -> None:
        from sqlalchemy.engine import make_url

        self._url = url
        self._patience = connect_patience
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
            from sqlalchemy import text

            engine = make_engine(self._url, connect_patience=self._patience)
            # Poll with pg_try_advisory_lock and hang up between tries: a worker blocked in
            # pg_advisory_lock would sit on a connection, and with many workers those
            # waiting connections fill the server until the holder cannot open the ones its
            # claim needs (seen with 128 workers: every worker stuck at "too many clients").
            try:
                for attempt in itertools.count():
                    conn = engine.connect()
                    try:
                        got = conn.execute(text("SELECT pg_try_advisory_lock("
                                                "hashtextextended(:k, 0))"),
                                           {"k": self._key}).scalar_one()
                    except BaseException:
                        conn.close()
                        raise
                    if got:
                        self._held = (engine, conn)
                        return
                    conn.close()
                    time.sleep(min(1.0, 0.02 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0))
            except BaseException:
                engine.dispose()  # an outage mid-try: nothing is held; the caller retries
                raise
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
        from sqlalchemy.exc import DBAPIError

        engine, conn = held
        try:
            conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"),
                         {"k": self._key})
        except DBAPIError as exc:
            # The server dropped the session (a restart): the lock went with it.
            log.warning("study lock: the session was already gone (%s)",
                        redact_text(cause_line(exc), self._url))
        finally:
            conn.close()
            engine.dispose()
