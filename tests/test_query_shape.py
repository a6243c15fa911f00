"""The statements `status` and `export` send to the database: as many for 180 trials as for
60, and none that reads another study's trials.

A study of N synthetic trials (complete, pruned with evaluations, failed, running, waiting;
params in the spec's space) sits beside another study in the same database. A SQLAlchemy
listener on every engine records each statement `study_status`, `status --json` and `export`
issue. A statement that touches Optuna's trial tables must name this study: `trials` by this
study's id (or trial ids of it), the tables of trial rows (params, values, evaluations,
attributes) by trial ids of this study or joined to `trials` by this study's id. A statement
over all trials, such as the one behind `optuna.get_all_study_summaries`, fails the test.

`reads.read_trials` reads a study in six statements whatever its size (Optuna's own reader
adds one per table for every 500 trials), and returns exactly the trials Optuna reads.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from sqlalchemy import event
from sqlalchemy.engine import Engine

from gemma_search import reads
from gemma_search.reads import read_trials
from gemma_search.spec import spec_from_text
from gemma_search.status import study_status
from gemma_search.storage import open_storage
from gemma_search.study import create_study, load_study
from gemma_search.verify import enqueue_verification, load_companion

from .conftest import demo_spec_text
from .test_cli import run

DISTRIBUTIONS = {"learning_rate": FloatDistribution(1e-4, 3e-2, log=True),
                 "optimizer": CategoricalDistribution(["adamw", "sgd"]),
                 "lora_r": CategoricalDistribution([4, 8])}
TRIAL_ROWS = ("trial_params", "trial_values", "trial_intermediate_values",
              "trial_user_attributes", "trial_system_attributes", "trial_heartbeats")
_TABLE = re.compile(r"\b(?:from|join|update|into)\s+(\w+)", re.IGNORECASE)


def synthetic_trials(n: int, seed: int) -> list[Any]:
    """`n` trials as workers leave them: 60% complete, 30% pruned, a few failed, two
    running and one waiting at the end; evaluations on all that started."""
    rng = random.Random(seed)
    start = datetime.now() - timedelta(days=2)
    out = []
    for i in range(n):
        state = (TrialState.WAITING if i == n - 1 else TrialState.RUNNING if i >= n - 3
                 else TrialState.COMPLETE if i % 10 < 6 else TrialState.PRUNED if i % 10 < 9
                 else TrialState.FAIL)
        waiting = state == TrialState.WAITING
        evals = {s: 0.7 - 0.05 * s + rng.random() / 10
                 for s in range(1, (4 if state == TrialState.COMPLETE else 2) + 1)}
        params = {"learning_rate": 10 ** rng.uniform(-4, -1.6),
                  "optimizer": rng.choice(["adamw", "sgd"]), "lora_r": rng.choice([4, 8])}
        trial = create_trial(
            state=state, value=min(evals.values()) if state == TrialState.COMPLETE else None,
            params=None if waiting else params, distributions=None if waiting else DISTRIBUTIONS,
            user_attrs={} if waiting else {"gpus": 1, "accuracy": rng.random(),
                                           "tokens_trained": 1000 * len(evals)},
            system_attrs={"fixed_params": params} if waiting else {},
            intermediate_values=None if waiting else evals)
        trial.datetime_start = None if waiting else start + timedelta(minutes=4 * i)
        trial.datetime_complete = (start + timedelta(minutes=4 * i + 3)
                                   if state.is_finished() else None)
        out.append(trial)
    return out


def make_study(url: str, name: str, n: int, data: tuple[Path, Path], tmp_path: Path) -> Any:
    spec = spec_from_text(demo_spec_text(name, tmp_path / "model", *data, max_trials=2 * n))
    study = create_study(spec, url)
    study.add_trials(synthetic_trials(n, seed=n))
    return study


@contextmanager
def recorded() -> Iterator[list[tuple[str, Any]]]:
    """Every statement any engine sends while inside, with its parameters."""
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def bound(statement: str, parameters: Any, column: str) -> list[Any] | None:
    """The values bound to `column = ...` or `column IN (...)` in `statement`, for qmark
    (SQLite) and pyformat (psycopg2) parameters; None when `column` is not compared so."""
    where = re.search(r"\bWHERE\b", statement, re.IGNORECASE)
    one = r"(?:\?|%\(\w+\)s)"  # a qmark or pyformat placeholder
    pattern = re.compile(rf"{re.escape(column)}\s*(=|IN)\s*(\(((?:[^()]|{one})*)\)|{one})",
                         re.IGNORECASE)
    match = None if where is None else pattern.search(statement, where.end())
    if match is None and where is not None:  # an ORM lazy load writes `? = column`
        flipped = re.search(rf"(\?|%\((\w+)\)s)\s*=\s*{re.escape(column)}\b",
                            statement[where.end():])
        if flipped is not None:
            if isinstance(parameters, dict):
                return [parameters[flipped.group(2)]]
            return [parameters[statement[:where.end() + flipped.start()].count("?")]]
    if match is None:
        return None
    placeholders = match.group(3) if match.group(3) is not None else match.group(2)
    if isinstance(parameters, dict):
        return [parameters[name] for name in re.findall(r"%\((\w+)\)s", placeholders)]
    before = statement[:match.start(2)].count("?")
    return list(parameters[before:before + placeholders.count("?")])


def assert_reads_only(statements: list[tuple[str, Any]], study_ids: set[int],
                      trial_ids: set[int]) -> None:
    """Each statement on Optuna's trial tables is filtered to `study_ids` / `trial_ids`."""
    for statement, parameters in statements:
        tables = {t.lower() for t in _TABLE.findall(statement)}
        if "trials" in tables:
            by_study = bound(statement, parameters, "trials.study_id")
            by_trial = bound(statement, parameters, "trials.trial_id")
            assert by_study or by_trial, f"reads trials of every study: {statement}"
            assert set(by_study or []) <= study_ids, f"another study's trials: {statement}"
            assert set(by_trial or []) <= trial_ids, f"another study's trials: {statement}"
        for table in tables & set(TRIAL_ROWS):
            ids = bound(statement, parameters, f"{table}.trial_id")
            by_study = bound(statement, parameters, "trials.study_id") if "trials" in tables \
                else None  # joined to its trials, by study
            assert ids or by_study, f"reads {table} of every trial: {statement}"
            assert set(ids or []) <= trial_ids, f"{table} of another study's trials: {statement}"
        assert not re.match(r"\s*(insert|update|delete)\b", statement, re.IGNORECASE) or \
            not tables & {"trials", *TRIAL_ROWS}, f"writes trials: {statement}"


def trial_ids(*studies: Any) -> set[int]:
    return {t._trial_id for s in studies for t in s.get_trials(deepcopy=False)}


@pytest.mark.parametrize("verified", [False, True], ids=["single", "verified"])
def test_status_and_export_statements_do_not_grow_with_the_study(
        storage_url: str, demo_data: tuple[Path, Path], tmp_path: Path,
        verified: bool) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tag = uuid.uuid4().hex[:6]  # the PostgreSQL database is shared by the session's tests
    other = make_study(storage_url, f"other-{tag}", 40, demo_data, tmp_path)
    counts = {}
    for n in (60, 180):
        name = f"shape-{n}-{tag}"
        study = make_study(storage_url, name, n, demo_data, tmp_path)
        mine = [study]
        if verified:  # re-runs of the top 2 in the companion, one of them run
            spec = spec_from_text(demo_spec_text(name, tmp_path / "model", *demo_data,
                                                 max_trials=2 * n))
            companion, _ = enqueue_verification(study, spec, storage_url, top=2, seeds=2)
            companion.tell(companion.ask(), 0.1)
            mine.append(companion)
        study_ids = {s._study_id for s in mine}
        ids = trial_ids(*mine)
        assert not ids & trial_ids(other)
        shapes = {}

        loaded, spec = load_study(name, storage_url)
        companion = load_companion(loaded, storage_url)
        with recorded() as statements:
            summary = study_status(loaded, spec, companion=companion)
        assert sum(summary["trials"].values()) == n
        assert summary["export_pick"]["by"] == ("mean" if verified else "single")
        shapes["study_status"] = statements

        with recorded() as statements:
            code, out = run("status", name, "--storage", storage_url, "--json")
        assert code == 0, out
        assert json.loads(out)["trials"] == summary["trials"]
        shapes["status --json"] = statements

        with recorded() as statements:
            code, out = run("export", name, "--out", str(tmp_path / name),
                            "--storage", storage_url)
        assert code == 0, out
        shapes["export"] = statements

        for what, statements in shapes.items():
            assert_reads_only(statements, study_ids, ids)
            # One read of the study: the trials table is read once per study read.
            reads = [s for s, _ in statements if re.search(r"\bfrom trials\b", s, re.I)
                     and "trials.study_id" in s]
            assert len(reads) == len(mine), (what, reads)
        counts[n] = {what: len(statements) for what, statements in shapes.items()}
    assert counts[60] == counts[180], counts
    assert max(counts[180].values()) <= 100, counts  # the storages opened, one read each


def test_read_trials_is_what_optuna_reads(storage_url: str) -> None:
    """Every field of every trial as `study.get_trials()` has it: infinite values and
    evaluations, NaN evaluations, conditional params, nested and null attributes, waiting
    trials without params; six statements, none on the study beside it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tag = uuid.uuid4().hex[:6]
    storage = open_storage(storage_url)
    beside = optuna.create_study(study_name=f"beside-{tag}", storage=storage)
    beside.add_trials(synthetic_trials(20, seed=2))
    study = optuna.create_study(study_name=f"same-{tag}", storage=storage)
    study.add_trials(synthetic_trials(30, seed=1))
    momentum = {**DISTRIBUTIONS, "momentum": FloatDistribution(0.0, 0.99)}
    for i, value in enumerate((float("inf"), float("-inf"), 0.25)):
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, value=value,
            params={"learning_rate": 1e-3, "optimizer": "sgd", "lora_r": 8, "momentum": 0.9},
            distributions=momentum,
            user_attrs={"schedule": {"max_steps": 80, "device": "cuda"}, "note": None,
                        "unicode": "é ✓"},
            system_attrs={"retry_history": [i]},
            intermediate_values={1: float("nan"), 2: float("inf"), 3: -float("inf"),
                                 4: 0.5}))
    # Optuna's own reader, on a storage of its own: gemma-search's storage reads through
    # `reads` too (test_the_storage_reads_trials_as_optuna_does).
    plain = optuna.load_study(study_name=study.study_name,
                              storage=optuna.storages.RDBStorage(storage_url))
    with recorded() as statements:
        trials = read_trials(study)
    expected = plain.get_trials(deepcopy=False)
    assert len(trials) == 33 and [t.number for t in trials] == list(range(33))
    assert_same(trials, expected)
    queries = [s for s, _ in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(queries) == 6, queries
    assert_reads_only(statements, {study._study_id}, {t._trial_id for t in expected})

    # Read again (`status --watch`): a running trial finished, one was added; only the
    # trials that were unfinished and the new one are read again, and a count of the rest.
    study.tell(27, 0.125)
    study.add_trial(synthetic_trials(1, seed=3)[0])
    with recorded() as statements:
        again = read_trials(study)
    assert_same(again, plain.get_trials(deepcopy=False))
    assert again[27].state == TrialState.COMPLETE and len(again) == 34
    rows = [s for s, _ in statements if re.search(r"\bfrom trials\b", s, re.I)
            and "count(" not in s.lower()]
    assert len(rows) == 1 and "trials.trial_id >=" in rows[0], statements
    # Read again: the trials unfinished at the first read (27-29) and those added after.
    placeholder = r"(?:\?|%\(\w+\)s)"
    assert re.search(rf"trials\.trial_id IN \({placeholder}(?:, {placeholder}){{2}}\)",
                     rows[0]), rows[0]
    top, known = reads._SEEN[study]
    assert top == max(t._trial_id for t in again) and len(known) == 34
    # A trial below that point that the first read missed (committed late) has
    # everything read again.
    since, known = reads._SEEN[study]
    reads._SEEN[study] = (since, dict(list(known.items())[1:]))
    assert_same(read_trials(study), plain.get_trials(deepcopy=False))


def test_the_storage_reads_trials_as_optuna_does(storage_url: str) -> None:
    """gemma-search's storage answers every trial read (the sampler's, the pruner's,
    optuna-dashboard's, through Optuna's cache or not) with the trials Optuna's reader
    builds, in six statements on this study's rows whatever the read asks for."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tag = uuid.uuid4().hex[:6]
    storage = open_storage(storage_url)
    plain = optuna.storages.RDBStorage(storage_url)
    optuna.create_study(study_name=f"next-{tag}", storage=storage).add_trials(
        synthetic_trials(12, seed=4))
    study = optuna.create_study(study_name=f"read-{tag}", storage=storage)
    study.add_trials(synthetic_trials(30, seed=5))
    sid = study._study_id
    ids = [t._trial_id for t in plain.get_all_trials(sid)]
    # Whole reads and the incremental ones of Optuna's cache (trials after the last
    # finished one, plus the unfinished ones before it), with and without a state filter.
    for states, included, after in ((None, set(), -1),
                                    ((TrialState.COMPLETE, TrialState.PRUNED), set(), -1),
                                    (None, {ids[3], ids[28], ids[29]}, ids[10]),
                                    ((TrialState.RUNNING,), {ids[27]}, ids[20]),
                                    (None, set(), ids[-1])):
        with recorded() as statements:
            got = storage._get_trials(sid, states, included, after)
        assert_same(got, plain._get_trials(sid, states, included, after))
        selects = [s for s, _ in statements if s.lstrip().upper().startswith("SELECT")]
        # The trials, then each table of trial rows; with none, the study's existence.
        assert len(selects) == (6 if got else 2), selects
        assert_reads_only(statements, {sid}, set(ids))
        if after >= 0:  # a read again: the rows of the trials found, by id (the index)
            assert not [q for q in selects if re.search(r"\bjoin\b", q, re.I)], selects
    # More unfinished trials than one IN (...) names: read from the oldest of them on.
    reads._BY_ID, limit = 2, reads._BY_ID
    try:
        included, after = {ids[3], ids[5], ids[28]}, ids[20]
        assert_same(storage._get_trials(sid, None, included, after),
                    plain._get_trials(sid, None, included, after))
    finally:
        reads._BY_ID = limit
    # What a sampler reads: through Optuna's cache in front of the storage, then again
    # after a trial finished (only what changed).
    loaded = optuna.load_study(study_name=study.study_name, storage=storage)
    assert_same(loaded.get_trials(deepcopy=False), plain.get_all_trials(sid))
    study.tell(28, 0.3)
    assert_same(loaded.get_trials(deepcopy=False), plain.get_all_trials(sid))
    with pytest.raises(KeyError, match="No study with study_id"):
        storage.get_all_trials(sid + 10_000)


def assert_same(trials: list[Any], expected: list[Any]) -> None:
    assert len(trials) == len(expected)
    for got, want in zip(trials, expected, strict=True):
        # NaN != NaN: compare evaluations by their text, everything else as it is.
        assert repr(got.intermediate_values) == repr(want.intermediate_values)
        assert {**got.__dict__, "intermediate_values": None} == \
            {**want.__dict__, "intermediate_values": None}


def test_a_workers_claim_does_not_grow_with_the_study(
        storage_url: str, demo_data: tuple[Path, Path], tmp_path: Path) -> None:
    """What a worker sends under the study lock to claim a trial: as much for 180 trials as
    for 60, and nothing that reads another study's trials. (Sampling the claimed trial's
    parameters happens after the lock is released.)"""
    from gemma_search import db
    from gemma_search.storage import StudyLock
    from gemma_search.worker import _claim

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tag = uuid.uuid4().hex[:6]
    other = make_study(storage_url, f"other-{tag}", 40, demo_data, tmp_path)
    counts = {}
    for n in (60, 180):
        name = f"claim-{n}-{tag}"
        make_study(storage_url, name, n, demo_data, tmp_path)
        study, spec = load_study(name, storage_url, heartbeat=True)
        lock, engine = StudyLock(storage_url, name), db.make_engine(storage_url)
        held: list[list[tuple[str, Any]]] = []
        with recorded() as statements:
            def release(real: Any = lock.release, seen: list[Any] = statements,
                        out: list[Any] = held) -> None:
                out.append(list(seen))  # what ran while the lock was held
                real()

            lock.release = release  # type: ignore[method-assign]
            action, trial = _claim(study, spec, lock, engine)
        assert action == "run" and trial is not None
        ids = trial_ids(study)
        reads = [(s, p) for s, p in held[0]
                 if not re.match(r"\s*(insert|update|delete)\b", s, re.IGNORECASE)]
        assert_reads_only(reads, {study._study_id}, ids)
        assert not ids & trial_ids(other)
        counts[n] = len(held[0])
    assert counts[60] == counts[180], counts
