"""gemma-search's own tables beside Optuna's: study specs, workers, checkpoints, eval metrics.

They live in the study's storage database, with their own SQLAlchemy metadata and their own
Alembic history, shipped in the package as `gemma_search/migrations/` (design decision 5).
Optuna stamps the default `alembic_version` table in the same database, so ours is
`gemma_search_alembic_version`, and migrations only ever see tables named `gs_*`
(`include_object`). `gemma-search db upgrade` runs `upgrade_all`: Optuna's schema first,
then ours.

Every read and write is one `session_scope`: it commits, rolls back, and turns a driver error
into a one-line `StorageError` that names the likely cause (`storage.storage_errors`). Engines
come from the one factory, `storage.make_engine` (re-exported here as `make_engine`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from gemma_search.errors import StorageError, first_line
from gemma_search.storage import make_engine, open_storage, redact, storage_errors

__all__ = [
    "MIGRATIONS",
    "TABLE_PREFIX",
    "VERSION_TABLE",
    "WORKER_STATES",
    "Base",
    "CheckpointInfo",
    "EvalRecord",
    "GsCheckpoint",
    "GsEvalMetric",
    "GsStudy",
    "GsWorker",
    "WorkerInfo",
    "current",
    "delete_study_records",
    "delete_study_spec",
    "downgrade",
    "eval_history",
    "head_revision",
    "include_object",
    "latest_checkpoint",
    "list_workers",
    "load_study_spec",
    "make_engine",
    "record_checkpoint",
    "record_eval",
    "register_worker",
    "save_study_spec",
    "session_scope",
    "upgrade",
    "upgrade_all",
    "worker_exit",
    "worker_heartbeat",
]

#: Every table of ours starts with this; migrations ignore every other table (Optuna's).
TABLE_PREFIX = "gs_"
#: Our Alembic version table: Optuna's is the default `alembic_version` in the same database.
VERSION_TABLE = "gemma_search_alembic_version"
#: The Alembic script directory: `env.py`, `script.py.mako`, `versions/`. Package data, as
#: Optuna ships its own (optuna/storages/_rdb/alembic): an installed wheel migrates a database
#: from any folder, with no source checkout.
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: A worker row's `state`; only "running" workers can be alive.
WORKER_STATES = ("running", "exited", "failed")
#: Optuna's `studies.study_name` length: our study names are Optuna's.
_NAME_LENGTH = 512


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps the zone (TIMESTAMP WITH TIME ZONE); SQLite stores none and gives back
    naive values, which are UTC here because every value is converted to UTC before it is
    written. Naive values are refused: their zone is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"datetime {value.isoformat()} has no timezone; pass an aware "
                             "datetime, e.g. datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Our tables only: Optuna's models have their own metadata."""

    metadata = MetaData()


class GsStudy(Base):
    """The spec a study was created from, so every worker runs the very same spec."""

    __tablename__ = "gs_studies"
    __table_args__ = (UniqueConstraint("study_name", name="uq_gs_studies_study_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_name: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    spec_text: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class GsWorker(Base):
    """One worker process on one GPU: where it runs, what it does, when it was last heard."""

    __tablename__ = "gs_workers"
    __table_args__ = (
        CheckConstraint("state IN ('running', 'exited', 'failed')", name="ck_gs_workers_state"),
        Index("ix_gs_workers_study_name", "study_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_name: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    host: Mapped[str] = mapped_column(String(255))
    gpu_name: Mapped[str | None] = mapped_column(String(255))
    gpu_index: Mapped[int | None] = mapped_column(Integer)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    current_trial: Mapped[int | None] = mapped_column(Integer)
    current_step: Mapped[int | None] = mapped_column(Integer)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))


class GsCheckpoint(Base):
    """An adapter checkpoint on disk; a retried trial resumes from its predecessor's newest."""

    __tablename__ = "gs_checkpoints"
    __table_args__ = (Index("ix_gs_checkpoints_study_trial", "study_name", "trial_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_name: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    trial_number: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    # BigInteger: a long trial on a 9B model passes 2**31 tokens.
    tokens: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class GsEvalMetric(Base):
    """Every metric of one evaluation; Optuna keeps only the one value that prunes."""

    __tablename__ = "gs_eval_metrics"
    __table_args__ = (
        UniqueConstraint("study_name", "trial_number", "eval_index",
                         name="uq_gs_eval_metrics_study_trial_eval"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_name: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    trial_number: Mapped[int] = mapped_column(Integer)
    eval_index: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[str] = mapped_column(Text)  # JSON object
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WorkerInfo(TypedDict):
    """A `gs_workers` row as `list_workers` returns it."""

    id: int
    study_name: str
    host: str
    gpu_name: str | None
    gpu_index: int | None
    pid: int
    started_at: datetime
    last_seen: datetime
    current_trial: int | None
    current_step: int | None
    tokens_per_second: float | None
    state: str
    alive: bool


class CheckpointInfo(TypedDict):
    """A `gs_checkpoints` row as `latest_checkpoint` returns it."""

    study_name: str
    trial_number: int
    step: int
    tokens: int
    path: str
    created_at: datetime


class EvalRecord(TypedDict):
    """A `gs_eval_metrics` row as `eval_history` returns it, metrics decoded."""

    eval_index: int
    step: int
    tokens: int
    metrics: dict[str, Any]
    created_at: datetime


# --- engine and session -----------------------------------------------------------------------


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success, rolls back on error, and names a driver error
    (`storage.storage_errors`), as Optuna's `_create_scoped_session` does for its tables."""
    with storage_errors(_url(engine)):
        session = Session(engine, expire_on_commit=False)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()


def _url(engine: Engine) -> str:
    """The engine's URL as it connects, password included: for `redact` to mask."""
    return engine.url.render_as_string(hide_password=False)


def _now(session: Session) -> datetime:
    """The database server's clock for PostgreSQL, so that workers on machines whose clocks
    disagree still compare `last_seen` on one clock; SQLite is one machine's clock anyway."""
    if session.get_bind().dialect.name == "postgresql":
        value = session.scalar(select(func.now()))
        assert isinstance(value, datetime)
        return value.astimezone(UTC)
    return datetime.now(UTC)


# --- migrations -------------------------------------------------------------------------------


def include_object(obj: Any, name: str | None, type_: str, reflected: bool,
                   compare_to: Any) -> bool:
    """Alembic's filter: only `gs_*` tables and what belongs to them are ours to migrate."""
    if type_ == "table":
        return bool(name) and str(name).startswith(TABLE_PREFIX)
    table = getattr(obj, "table", None)
    return table is None or str(table.name).startswith(TABLE_PREFIX)


def _alembic_config() -> Any:
    """Alembic's Config, in code: the package's script folder, no alembic.ini."""
    from alembic.config import Config

    if not (MIGRATIONS / "env.py").is_file():
        raise StorageError(f"the migrations folder {MIGRATIONS} is missing (no env.py): this "
                           "gemma-search install is incomplete; reinstall it (pip install "
                           "--force-reinstall gemma-search)")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")  # Alembic >= 1.16 warns without it
    return config


def head_revision() -> str:
    """The newest revision of our tables that this version of gemma-search knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, f"{MIGRATIONS / 'versions'} has no revision"
    return head


def upgrade(url: str, revision: str = "head") -> None:
    """Create or migrate our tables in `url` up to `revision`; Optuna's are not touched."""
    _migrate(url, revision, upward=True)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate our tables in `url` down to `revision`; "base" drops them all."""
    _migrate(url, revision, upward=False)


def _migrate(url: str, revision: str, *, upward: bool) -> None:
    from alembic import command
    from alembic.util import CommandError
    from sqlalchemy import text

    config = _alembic_config()
    engine = make_engine(url)
    try:
        # One transaction for the whole migration, handed to env.py (Alembic's cookbook
        # recipe "sharing a connection"): a failed step leaves the schema as it was.
        with storage_errors(url), engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Two `db upgrade`s at once would both create the tables; the second waits
                # here, then finds the version table at head. Released at commit.
                connection.execute(text("SELECT pg_advisory_xact_lock("
                                        "hashtextextended('gemma_search:migrate', 0))"))
            config.attributes["connection"] = connection
            if upward:
                command.upgrade(config, revision)
            else:
                command.downgrade(config, revision)
    except CommandError as exc:
        raise StorageError(f"cannot migrate gemma-search tables in {redact(url)} to "
                           f"{revision!r}: {first_line(exc)}; known revisions end at "
                           f"{head_revision()!r}") from None
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    """Our tables' revision in `url`, or None where they were never created."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    database = engine.url.database or ""
    if (engine.url.get_backend_name() == "sqlite" and database not in ("", ":memory:")
            and not Path(database).exists()):
        return None  # connecting would create an empty file
    try:
        with storage_errors(url), engine.connect() as connection:
            context = MigrationContext.configure(connection,
                                                 opts={"version_table": VERSION_TABLE})
            revision = context.get_current_revision()
    finally:
        engine.dispose()
    return revision


def upgrade_all(url: str) -> tuple[str, str]:
    """Upgrade Optuna's schema, then ours; return both revisions (Optuna's, ours)."""
    # check_schema=False: an old Optuna schema is what we are here to upgrade. Opening the
    # storage creates Optuna's tables where there are none.
    storage = open_storage(url, check_schema=False)
    # Optuna's env.py calls logging.config.fileConfig(its alembic.ini) when the root logger
    # has no handler: that turns on INFO output and disables every logger made so far. A
    # NullHandler for the length of the call keeps the caller's logging as it was.
    root, quiet = logging.getLogger(), logging.NullHandler()
    root.addHandler(quiet)
    try:
        # Optuna's migration builds an engine of its own from the URL (its alembic env.py),
        # outside the factory; it holds one connection for the length of the upgrade.
        with storage_errors(url):
            storage.upgrade()
            optuna_revision = storage.get_current_version()
    finally:
        root.removeHandler(quiet)
        storage.engine.dispose()
    upgrade(url)
    ours = current(url)
    assert ours is not None
    return optuna_revision, ours


# --- study specs ------------------------------------------------------------------------------


def save_study_spec(engine: Engine, study_name: str, spec_text: str, spec_hash: str) -> None:
    """Store a study's spec; the same spec again is a no-op, a different one an error."""
    try:
        _insert_spec(engine, study_name, spec_text, spec_hash)
    except IntegrityError:
        # Another `create` inserted this name between our read and our insert (PostgreSQL;
        # SQLite's BEGIN IMMEDIATE serialises the two). Its row is there now: compare again.
        _insert_spec(engine, study_name, spec_text, spec_hash)


def _insert_spec(engine: Engine, study_name: str, spec_text: str, spec_hash: str) -> None:
    with session_scope(engine) as session:
        row = session.scalar(select(GsStudy).where(GsStudy.study_name == study_name))
        if row is None:
            session.add(GsStudy(study_name=study_name, spec_text=spec_text,
                                spec_hash=spec_hash, created_at=_now(session)))
        elif row.spec_hash != spec_hash:
            shown = redact(_url(engine))
            raise StorageError(f"study {study_name!r} already exists in {shown} with a "
                               "different spec; change `name` in the spec (or --set name=NEW)")


def load_study_spec(engine: Engine, study_name: str) -> tuple[str, str] | None:
    """A study's (spec_text, spec_hash), or None where no spec was saved under that name."""
    with session_scope(engine) as session:
        row = session.scalar(select(GsStudy).where(GsStudy.study_name == study_name))
        return None if row is None else (row.spec_text, row.spec_hash)


def delete_study_spec(engine: Engine, study_name: str) -> bool:
    """Delete a study's spec row only; True if there was one."""
    with session_scope(engine) as session:
        result = session.execute(delete(GsStudy).where(GsStudy.study_name == study_name))
        return bool(getattr(result, "rowcount", 0))


def delete_study_records(engine: Engine, study_name: str) -> None:
    """Delete every row of ours for a study: its spec, workers, checkpoints and evals.

    For when the Optuna study is deleted: a new study of the same name numbers its trials
    from 0 again and must not find the old one's checkpoints under those numbers.
    """
    with session_scope(engine) as session:
        for model in (GsStudy, GsWorker, GsCheckpoint, GsEvalMetric):
            session.execute(delete(model).where(model.study_name == study_name))


# --- workers ----------------------------------------------------------------------------------


def register_worker(engine: Engine, study_name: str, host: str, pid: int,
                    gpu_name: str | None = None, gpu_index: int | None = None) -> int:
    """Record a starting worker as "running"; return its id for heartbeats and exit."""
    with session_scope(engine) as session:
        now = _now(session)
        worker = GsWorker(study_name=study_name, host=host, pid=pid, gpu_name=gpu_name,
                          gpu_index=gpu_index, started_at=now, last_seen=now, state="running")
        session.add(worker)
        session.flush()
        return worker.id


def worker_heartbeat(engine: Engine, worker_id: int, *, current_trial: int | None = None,
                     current_step: int | None = None,
                     tokens_per_second: float | None = None) -> bool:
    """Mark a worker seen now, with what it is doing; False if its row is gone."""
    # One UPDATE, no read first: on SQLite it takes the write lock at once, and there is no
    # read-then-write for two sessions to interleave.
    with session_scope(engine) as session:
        result = session.execute(
            update(GsWorker).where(GsWorker.id == worker_id)
            .values(last_seen=_now(session), current_trial=current_trial,
                    current_step=current_step, tokens_per_second=tokens_per_second))
        return bool(getattr(result, "rowcount", 0))


def worker_exit(engine: Engine, worker_id: int, state: str) -> bool:
    """Mark a worker "exited" or "failed" (its last trial and step stay); False if gone."""
    if state not in WORKER_STATES or state == "running":
        raise ValueError(f"worker state {state!r} is not an exit state; use 'exited' or "
                         "'failed'")
    with session_scope(engine) as session:
        result = session.execute(
            update(GsWorker).where(GsWorker.id == worker_id)
            .values(state=state, last_seen=_now(session)))
        return bool(getattr(result, "rowcount", 0))


def list_workers(engine: Engine, study_name: str, *, stale_after: float) -> list[WorkerInfo]:
    """A study's workers in start order; `alive`: running and seen within `stale_after` s."""
    with session_scope(engine) as session:
        now = _now(session)
        rows = session.scalars(select(GsWorker).where(GsWorker.study_name == study_name)
                               .order_by(GsWorker.id)).all()
        return [WorkerInfo(id=w.id, study_name=w.study_name, host=w.host, gpu_name=w.gpu_name,
                           gpu_index=w.gpu_index, pid=w.pid, started_at=w.started_at,
                           last_seen=w.last_seen, current_trial=w.current_trial,
                           current_step=w.current_step, tokens_per_second=w.tokens_per_second,
                           state=w.state,
                           alive=(w.state == "running"
                                  and (now - w.last_seen).total_seconds() <= stale_after))
                for w in rows]


# --- checkpoints ------------------------------------------------------------------------------


def record_checkpoint(engine: Engine, study_name: str, trial_number: int, step: int,
                      tokens: int, path: str) -> None:
    """Record an adapter checkpoint written to `path` at `step` of a trial."""
    with session_scope(engine) as session:
        session.add(GsCheckpoint(study_name=study_name, trial_number=trial_number, step=step,
                                 tokens=tokens, path=path, created_at=_now(session)))


def latest_checkpoint(engine: Engine, study_name: str,
                      trial_numbers: list[int]) -> CheckpointInfo | None:
    """The checkpoint with the highest step among `trial_numbers` (a retry's predecessors)."""
    if not trial_numbers:
        return None
    with session_scope(engine) as session:
        # Ties on step: the later record wins (a retry that re-saved the same step).
        row = session.scalar(
            select(GsCheckpoint)
            .where(GsCheckpoint.study_name == study_name,
                   GsCheckpoint.trial_number.in_(trial_numbers))
            .order_by(GsCheckpoint.step.desc(), GsCheckpoint.id.desc())
            .limit(1))
        if row is None:
            return None
        return CheckpointInfo(study_name=row.study_name, trial_number=row.trial_number,
                              step=row.step, tokens=row.tokens, path=row.path,
                              created_at=row.created_at)


# --- evaluation metrics -----------------------------------------------------------------------


def record_eval(engine: Engine, study_name: str, trial_number: int, eval_index: int, step: int,
                tokens: int, metrics: dict[str, Any]) -> None:
    """Record one evaluation's metrics; the same eval index again replaces the earlier row.

    Replacing (not refusing) makes the write idempotent: a worker that retries it after a
    dropped connection, not knowing whether the first commit landed, must not fail its trial.
    """
    # default=float: numpy and torch scalars reach here from the evaluator. NaN is kept
    # (json writes it as NaN): a diverged run's loss is worth seeing.
    text = json.dumps(metrics, sort_keys=True, default=float)
    with session_scope(engine) as session:
        # Select-then-write without a lock: only the worker that runs a trial writes its
        # evaluations, so no two sessions race on one key (the unique constraint would catch
        # it as a bug).
        row = session.scalar(select(GsEvalMetric).where(
            GsEvalMetric.study_name == study_name, GsEvalMetric.trial_number == trial_number,
            GsEvalMetric.eval_index == eval_index))
        now = _now(session)
        if row is None:
            session.add(GsEvalMetric(study_name=study_name, trial_number=trial_number,
                                     eval_index=eval_index, step=step, tokens=tokens,
                                     metrics=text, created_at=now))
        else:
            row.step, row.tokens, row.metrics, row.created_at = step, tokens, text, now


def eval_history(engine: Engine, study_name: str, trial_number: int) -> list[EvalRecord]:
    """A trial's evaluations in order of their index, metrics decoded."""
    with session_scope(engine) as session:
        rows = session.scalars(select(GsEvalMetric).where(
            GsEvalMetric.study_name == study_name, GsEvalMetric.trial_number == trial_number)
            .order_by(GsEvalMetric.eval_index)).all()
        return [EvalRecord(eval_index=r.eval_index, step=r.step, tokens=r.tokens,
                           metrics=json.loads(r.metrics), created_at=r.created_at)
                for r in rows]
