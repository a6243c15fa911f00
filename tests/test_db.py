"""gemma-search's own tables: migrations beside Optuna's, and each read/write round-trips.

Every test runs on SQLite and PostgreSQL. The PostgreSQL database is shared by the whole test
session (other files create Optuna studies in it), so study names come from `tmp_path.name`
and migration tests start from `downgrade(url, "base")` whatever an earlier test left.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect, text, update
from sqlalchemy.pool import NullPool

from gemma_search import db
from gemma_search.db import (
    VERSION_TABLE,
    current,
    delete_study_records,
    delete_study_spec,
    downgrade,
    eval_history,
    head_revision,
    include_object,
    latest_checkpoint,
    list_workers,
    load_study_spec,
    make_engine,
    record_checkpoint,
    record_eval,
    register_worker,
    save_study_spec,
    session_scope,
    upgrade,
    upgrade_all,
    worker_exit,
    worker_heartbeat,
)
from gemma_search.errors import StorageError

GS_TABLES = {"gs_studies", "gs_workers", "gs_checkpoints", "gs_eval_metrics"}


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _optuna_revision(url: str) -> str | None:
    """The row Optuna stamps in the default `alembic_version` table."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        engine.dispose()


@pytest.fixture
def name(tmp_path: Path) -> str:
    """A study name no other test of this session uses (the PostgreSQL database is shared)."""
    return tmp_path.name


@pytest.fixture
def engine(storage_url: str) -> Iterator[Engine]:
    upgrade(storage_url)
    engine = make_engine(storage_url)
    yield engine
    engine.dispose()


# --- migrations -------------------------------------------------------------------------------


def test_upgrade_creates_our_tables_and_downgrade_drops_exactly_them(storage_url: str) -> None:
    downgrade(storage_url, "base")
    before = _tables(storage_url)
    assert not before & GS_TABLES
    assert current(storage_url) is None

    upgrade(storage_url)
    upgraded = _tables(storage_url)
    assert upgraded - before <= GS_TABLES | {VERSION_TABLE}
    assert GS_TABLES | {VERSION_TABLE} <= upgraded
    assert current(storage_url) == head_revision() == "0001"
    upgrade(storage_url)  # at head already: nothing to do
    assert current(storage_url) == head_revision()

    downgrade(storage_url, "base")
    downgraded = _tables(storage_url)
    assert upgraded - downgraded == GS_TABLES
    assert downgraded <= upgraded
    assert current(storage_url) is None

    upgrade(storage_url)
    assert _tables(storage_url) >= GS_TABLES
    assert current(storage_url) == head_revision()


def test_optuna_and_ours_leave_each_other_alone(storage_url: str, name: str) -> None:
    import optuna

    study = optuna.create_study(study_name=name, storage=storage_url, direction="minimize")
    study.add_trial(optuna.trial.create_trial(
        params={"x": 1.0}, distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
        value=0.5))
    optuna_revision = _optuna_revision(storage_url)
    optuna_tables = {t for t in _tables(storage_url) if not t.startswith("gs_")} - {VERSION_TABLE}
    assert {"studies", "trials", "alembic_version"} <= optuna_tables

    downgrade(storage_url, "base")
    upgrade(storage_url)
    downgrade(storage_url, "base")
    upgrade(storage_url)

    assert _optuna_revision(storage_url) == optuna_revision
    assert optuna_tables <= _tables(storage_url)
    loaded = optuna.load_study(study_name=name, storage=storage_url)
    assert loaded.direction == optuna.study.StudyDirection.MINIMIZE
    assert [(t.params, t.value) for t in loaded.get_trials()] == [({"x": 1.0}, 0.5)]

    # And the reverse: Optuna's own upgrade leaves our version row and tables alone.
    ours = current(storage_url)
    storage = optuna.storages.RDBStorage(storage_url, skip_compatibility_check=True)
    storage.upgrade()
    storage.engine.dispose()
    assert current(storage_url) == ours == head_revision()
    assert _tables(storage_url) >= GS_TABLES
    assert upgrade_all(storage_url) == (optuna_revision, head_revision())


def test_models_match_the_migrations_and_optuna_tables_stay_out(storage_url: str,
                                                                name: str) -> None:
    """Autogenerate finds nothing to do: the models are what 0001 creates, and Optuna's tables
    (present here) are filtered out instead of being proposed for removal."""
    import optuna
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    optuna.create_study(study_name=name, storage=storage_url)
    upgrade(storage_url)
    engine = create_engine(storage_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            filtered = MigrationContext.configure(conn, opts={
                "include_object": include_object, "version_table": VERSION_TABLE})
            assert compare_metadata(filtered, db.Base.metadata) == []
            unfiltered = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            removed = {d[1].name for d in compare_metadata(unfiltered, db.Base.metadata)
                       if isinstance(d, tuple) and d[0] == "remove_table"}
            assert {"studies", "trials"} <= removed  # what include_object protects
    finally:
        engine.dispose()


def test_include_object_accepts_only_gs_tables() -> None:
    table = db.Base.metadata.tables["gs_workers"]
    assert include_object(table, "gs_workers", "table", False, None)
    assert not include_object(None, "trials", "table", True, None)
    assert not include_object(None, "alembic_version", "table", True, None)
    index = next(iter(table.indexes))
    assert include_object(index, index.name, "index", False, None)


def test_upgrade_all_creates_both_schemas_in_a_new_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    assert current(url) is None
    assert not (tmp_path / "new.db").exists()  # asking created nothing
    assert upgrade_all(url) == (_optuna_revision(url), head_revision())
    assert GS_TABLES | {"studies", "trials", "alembic_version", VERSION_TABLE} <= _tables(url)


def test_unknown_revision_and_missing_migrations_folder_are_one_line_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(StorageError, match="cannot migrate .* to 'nope'") as info:
        upgrade(url, "nope")
    assert "\n" not in str(info.value)
    monkeypatch.setattr(db, "MIGRATIONS", tmp_path / "no-migrations")
    with pytest.raises(StorageError, match="migrations folder .*no-migrations is missing"):
        upgrade(url)


# --- errors -----------------------------------------------------------------------------------


def test_using_the_tables_before_upgrade_says_run_db_upgrade(storage_url: str,
                                                             name: str) -> None:
    downgrade(storage_url, "base")
    engine = make_engine(storage_url)
    try:
        for call in (lambda: load_study_spec(engine, name),
                     lambda: register_worker(engine, name, "host", 1),
                     lambda: record_eval(engine, name, 0, 0, 1, 1, {"loss": 1.0})):
            with pytest.raises(StorageError) as info:
                call()
            message = str(info.value)
            assert "\n" not in message
            assert "gemma-search tables are missing" in message
            assert message.endswith("run `gemma-search db upgrade`")
    finally:
        engine.dispose()
        upgrade(storage_url)  # leave the shared database as the other tests expect it


def test_messages_never_show_the_password() -> None:
    url = "postgresql+psycopg2://gs:s3cret-pw@127.0.0.1:1/nowhere"  # port 1: refused at once
    engine = make_engine(url)
    with pytest.raises(StorageError) as info:
        list_workers(engine, "x", stale_after=60)
    for exc in (info.value, pytest.raises(StorageError, upgrade, url).value):
        message = str(exc)
        assert "s3cret-pw" not in message
        assert "gs:***@127.0.0.1:1/nowhere" in message
        assert "\n" not in message
    with pytest.raises(StorageError, match="not a SQLAlchemy URL"):
        make_engine("not a url")


def test_session_scope_rolls_back_on_error(engine: Engine, name: str) -> None:
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        session.add(db.GsStudy(study_name=name, spec_text="x", spec_hash="h",
                               created_at=datetime.now(UTC)))
        session.flush()
        raise RuntimeError("boom")
    assert load_study_spec(engine, name) is None


# --- study specs ------------------------------------------------------------------------------


def test_study_spec_round_trip_and_conflict(engine: Engine, name: str) -> None:
    assert load_study_spec(engine, name) is None
    save_study_spec(engine, name, "name: a\n", "a" * 64)
    save_study_spec(engine, name, "name: a\n", "a" * 64)  # the same spec again: no-op
    assert load_study_spec(engine, name) == ("name: a\n", "a" * 64)

    with pytest.raises(StorageError) as info:
        save_study_spec(engine, name, "name: b\n", "b" * 64)
    assert f"study {name!r} already exists" in str(info.value)
    assert "\n" not in str(info.value)
    assert load_study_spec(engine, name) == ("name: a\n", "a" * 64)

    assert delete_study_spec(engine, name)
    assert load_study_spec(engine, name) is None
    assert not delete_study_spec(engine, name)


def test_delete_study_records_removes_every_row_of_that_study_only(engine: Engine,
                                                                   name: str) -> None:
    other = f"{name}-other"
    for study in (name, other):
        save_study_spec(engine, study, "spec", "h")
        register_worker(engine, study, "host", 1)
        record_checkpoint(engine, study, 0, 10, 100, "/ckpt")
        record_eval(engine, study, 0, 0, 10, 100, {"loss": 1.0})
    delete_study_records(engine, name)
    assert load_study_spec(engine, name) is None
    assert list_workers(engine, name, stale_after=60) == []
    assert latest_checkpoint(engine, name, [0]) is None
    assert eval_history(engine, name, 0) == []
    assert load_study_spec(engine, other) == ("spec", "h")
    assert len(list_workers(engine, other, stale_after=60)) == 1


# --- workers ----------------------------------------------------------------------------------


def test_workers_register_heartbeat_exit_and_alive(engine: Engine, name: str) -> None:
    first = register_worker(engine, name, "node-a", 1234, "NVIDIA H100", 0)
    second = register_worker(engine, name, "node-b", 99)
    register_worker(engine, f"{name}-other", "node-c", 7)
    assert worker_heartbeat(engine, first, current_trial=3, current_step=40,
                            tokens_per_second=4303.5)
    assert worker_exit(engine, second, "exited")

    workers = list_workers(engine, name, stale_after=60)
    assert [w["id"] for w in workers] == [first, second]
    a, b = workers
    assert (a["host"], a["pid"], a["gpu_name"], a["gpu_index"]) == ("node-a", 1234,
                                                                    "NVIDIA H100", 0)
    assert (a["current_trial"], a["current_step"], a["tokens_per_second"]) == (3, 40, 4303.5)
    assert (a["state"], a["alive"]) == ("running", True)
    assert (b["state"], b["alive"], b["gpu_name"], b["gpu_index"]) == ("exited", False,
                                                                      None, None)
    assert a["last_seen"].tzinfo == UTC and a["started_at"] <= a["last_seen"]

    # A running worker silent for an hour is not alive.
    with session_scope(engine) as session:
        session.execute(update(db.GsWorker).where(db.GsWorker.id == first)
                        .values(last_seen=datetime.now(UTC) - timedelta(hours=1)))
    a = list_workers(engine, name, stale_after=60)[0]
    assert (a["state"], a["alive"]) == ("running", False)
    assert list_workers(engine, name, stale_after=7200)[0]["alive"]

    assert worker_exit(engine, first, "failed")
    assert list_workers(engine, name, stale_after=7200)[0]["state"] == "failed"
    assert not worker_heartbeat(engine, 10**9)
    assert not worker_exit(engine, 10**9, "exited")
    with pytest.raises(ValueError, match="'running' is not an exit state"):
        worker_exit(engine, first, "running")


# --- checkpoints ------------------------------------------------------------------------------


def test_latest_checkpoint_picks_the_highest_step_across_trials(engine: Engine,
                                                               name: str) -> None:
    assert latest_checkpoint(engine, name, []) is None
    assert latest_checkpoint(engine, name, [3]) is None
    record_checkpoint(engine, name, 3, 100, 10_000, "/ckpt/3/100")
    record_checkpoint(engine, name, 3, 200, 20_000, "/ckpt/3/200")
    record_checkpoint(engine, name, 5, 300, 3_000_000_000, "/ckpt/5/300")  # > 2**31 tokens
    record_checkpoint(engine, name, 7, 250, 25_000, "/ckpt/7/250")
    record_checkpoint(engine, name, 9, 900, 90_000, "/ckpt/9/900")  # not in the chain
    record_checkpoint(engine, f"{name}-other", 5, 999, 1, "/other")  # another study

    latest = latest_checkpoint(engine, name, [3, 5, 7])
    assert latest is not None
    assert (latest["trial_number"], latest["step"], latest["tokens"], latest["path"]) == (
        5, 300, 3_000_000_000, "/ckpt/5/300")
    assert latest["created_at"].tzinfo == UTC
    only_3 = latest_checkpoint(engine, name, [3])
    assert only_3 is not None and only_3["path"] == "/ckpt/3/200"


# --- evaluation metrics -----------------------------------------------------------------------


def test_eval_history_is_ordered_and_a_repeated_index_replaces(engine: Engine,
                                                               name: str) -> None:
    record_eval(engine, name, 4, 2, 30, 3000, {"val_loss": 0.5, "accuracy": 0.8})
    record_eval(engine, name, 4, 0, 10, 1000, {"val_loss": 0.9, "accuracy": 0.6})
    record_eval(engine, name, 4, 1, 20, 2000, {"val_loss": 0.7})
    record_eval(engine, name, 5, 0, 10, 1000, {"val_loss": 9.0})
    # The same index again (a write retried after a dropped connection) replaces the row.
    record_eval(engine, name, 4, 1, 20, 2000, {"val_loss": 0.6, "accuracy": 0.7})

    history = eval_history(engine, name, 4)
    assert [h["eval_index"] for h in history] == [0, 1, 2]
    assert [h["step"] for h in history] == [10, 20, 30]
    assert [h["tokens"] for h in history] == [1000, 2000, 3000]
    assert history[1]["metrics"] == {"val_loss": 0.6, "accuracy": 0.7}
    assert history[0]["created_at"].tzinfo == UTC
    assert [h["metrics"] for h in eval_history(engine, name, 5)] == [{"val_loss": 9.0}]
    assert eval_history(engine, name, 6) == []
