"""Reading a study's trials: once per command, only that study's, in a fixed number of
statements.

`status`, `status --json` and `export` read the trials of their study once, with
`read_trials`, and hand that list to everything that needs it (ranking, budget, hours,
verification, the recommendation); `frozen_study` lets Optuna's own functions (importance
evaluators) work on that list too instead of reading the storage again.

On a relational storage `read_trials` reads Optuna's tables directly: one statement for the
study's rows of `trials` and one for each table of trial rows (values, params, evaluations,
user and system attributes), each filtered by the study's id, in one transaction; the
frozen trials are then built by Optuna's own code (`RDBStorage`'s builder), so they are the
trials `study.get_trials()` returns (tests/test_query_shape.py compares them). Optuna's
reader loads the same rows as ORM objects in chunks of 500 trials: 2-3 times the time, and
one more statement per table for every further 500 trials.

Reading the same study object again (`status --watch`, a worker's every claim) reads only
what can have changed, as Optuna's own cache does: the trials that were unfinished and the
ones added since (a finished trial is never written again), and a count of the others,
which has everything read again if a trial appeared among them late. `live_study` gives a
worker's sampler and pruner that same incremental read.

`count_states` is the one place trials are counted by state.
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Iterable
from typing import Any

__all__ = ["count_states", "frozen_study", "live_study", "read_trials", "trial_rows"]

#: Per study object read before: (the highest trial id read, every trial read by id).
_SEEN: weakref.WeakKeyDictionary[Any, tuple[int, dict[int, Any]]] = \
    weakref.WeakKeyDictionary()


def read_trials(study: Any) -> list[Any]:
    """Every trial of `study` (frozen, not copied; do not change them), in trial-number
    order: one read.

    Python's collector is paused meanwhile: the read builds hundreds of thousands of
    objects that all stay alive, and each collection it would trigger walks all of them
    again for nothing (50-70% of a 10,000-trial read). Its previous state is restored.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        storage = _relational(study)
        if storage is None:  # in memory, a journal, or a `frozen_study`: its own reader
            return list(study.get_trials(deepcopy=False))
        top, known = _SEEN.get(study, (-1, {}))
        unfinished = [i for i, t in known.items() if not t.state.is_finished()]
        counted, fresh = _read_tables(storage, study._study_id, top + 1, also=unfinished)
        if counted != len(known):  # a trial at or below `top` committed late: read them all
            known = {}
            counted, fresh = _read_tables(storage, study._study_id, 0)
        by_id = {**known, **{t._trial_id: t for t in fresh}}
        _SEEN[study] = (max(by_id, default=top), by_id)
        return sorted(by_id.values(), key=lambda t: t.number)
    finally:
        if enabled:
            gc.enable()


def frozen_study(study: Any, trials: list[Any]) -> Any:
    """`study` whose `get_trials` (and `trials`) answer from `trials` instead of the storage.

    Still an `optuna.Study` (Optuna's importance evaluators and plots take it); its other
    reads (directions, attributes) go to the storage as before. Read-only use only: it does
    not see trials added after `trials` was read.
    """
    snapshot = copy.copy(study)
    frozen = list(trials)

    def get_trials(deepcopy: bool = True, states: Any = None) -> list[Any]:
        chosen = frozen if states is None else [t for t in frozen if t.state in states]
        return copy.deepcopy(chosen) if deepcopy else list(chosen)

    snapshot.get_trials = get_trials
    snapshot._get_trials = lambda deepcopy=True, states=None, use_cache=False: get_trials(
        deepcopy, states)
    return snapshot


def live_study(study: Any) -> Any:
    """`study` whose trial reads (`get_trials`, `trials`, `_get_trials`) answer from
    `read_trials(study)`: each one reads only what changed since the last (see the module
    docstring), and the reads a sampler makes with Optuna's `use_cache` share one. A worker
    hands it to each trial it runs, so that the sampler's history and the pruner's
    comparisons do not read the whole study through Optuna (2 s at 10,000 trials, and again
    for each process). Everything else reaches the storage as before."""
    view = copy.copy(study)
    cached: list[list[Any]] = []  # Optuna's `use_cache`: one read for the trial's sampling

    def _get_trials(deepcopy: bool = True, states: Any = None,
                    use_cache: bool = False) -> list[Any]:
        if use_cache and cached:
            trials = cached[0]
        else:
            trials = read_trials(study)
            if use_cache:
                cached.append(trials)
        chosen = trials if states is None else [t for t in trials if t.state in states]
        return copy.deepcopy(chosen) if deepcopy else chosen

    view.get_trials = lambda deepcopy=True, states=None: _get_trials(deepcopy, states)
    view._get_trials = _get_trials
    return view


def count_states(trials: Iterable[Any]) -> dict[str, int]:
    """Trials by state: every Optuna state by its lower-case name ("complete", "pruned",
    "running", "waiting", "fail"), and "paused": waiting trials that stopped at a rung
    (`promotion.is_paused`), counted there and not as waiting; 0 where there is none."""
    from optuna.trial import TrialState

    from gemma_search.promotion import is_paused

    counts = {s.name.lower(): 0 for s in TrialState} | {"paused": 0}
    for t in trials:
        counts["paused" if is_paused(t) else t.state.name.lower()] += 1
    return counts


def _relational(study: Any) -> Any:
    """The `RDBStorage` under `study`, or None when its trials come from elsewhere."""
    import optuna

    if not isinstance(study, optuna.Study) or {"get_trials", "_get_trials"} & vars(study).keys():
        return None
    storage = study._storage
    storage = getattr(storage, "_backend", storage)  # Optuna caches an RDBStorage's trials
    return storage if isinstance(storage, optuna.storages.RDBStorage) else None


def trial_rows(storage: Any, study_id: int, since: int, also: Iterable[int] = (),
               states: Iterable[Any] | None = None) -> list[Any]:
    """What `RDBStorage._get_trials` returns (gemma-search's storage reads through this):
    the study's trials of id `since` or more, and those of id in `also`, in `states` when
    given, in trial-id order; six statements, the collector paused (see `read_trials`)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        fresh = _read_tables(storage, study_id, since, count=False, also=also,
                             states=states)[1]
        if not fresh:
            _check_study(storage, study_id)
        return sorted(fresh, key=lambda t: t._trial_id)
    finally:
        if enabled:
            gc.enable()


def _check_study(storage: Any, study_id: int) -> None:
    """Optuna's KeyError for a study id that does not exist, as its reader raises."""
    from optuna.storages._rdb import models
    from sqlalchemy import select

    table = models.StudyModel.__table__
    with storage.engine.connect() as conn:
        if conn.execute(select(table.c.study_id).where(table.c.study_id == study_id)
                        ).first() is None:
            raise KeyError(f"No study with study_id {study_id} exists.")


def _read_tables(storage: Any, study_id: int, since: int, *, count: bool = True,
                 also: Iterable[int] = (), states: Iterable[Any] | None = None
                 ) -> tuple[int, list[Any]]:
    """The study's trials of id `since` or more (or in `also`; in `states` if given) from
    Optuna's tables, and how many it has below `since` (0 without counting, when `since` is
    0 or `count` is False): at most seven statements, one transaction."""
    from optuna.storages._rdb import models
    from sqlalchemy import func, inspect, select

    from gemma_search.storage import storage_errors

    trials = models.TrialModel.__table__
    columns = [trials.c.trial_id, trials.c.number, trials.c.state, trials.c.datetime_start,
               trials.c.datetime_complete]
    # Each column under the name Optuna's model keeps it (Optuna 5: `_datetime_start_utc`,
    # shown in local time by the model's `datetime_start` property, which rows share).
    mapper = inspect(models.TrialModel)
    names = [mapper.get_property_by_column(c).key for c in columns]
    shown = {name: attr for name in ("datetime_start", "datetime_complete")
             if isinstance(attr := vars(models.TrialModel).get(name), property)}
    row_type = type("TrialRow", (), shown)
    children: dict[str, Any] = {
        "values": models.TrialValueModel.__table__,
        "params": models.TrialParamModel.__table__,
        "user_attributes": models.TrialUserAttributeModel.__table__,
        "system_attributes": models.TrialSystemAttributeModel.__table__,
        "intermediate_values": models.TrialIntermediateValueModel.__table__}
    wanted = trials.c.trial_id >= since
    also = sorted(set(also))
    if len(also) > _BY_ID:  # too many to name: from the oldest of them on, the rest dropped
        keep = {*also}
        wanted = trials.c.trial_id >= min(since, also[0])
    elif also:
        keep = None
        wanted = wanted | trials.c.trial_id.in_(also)
    else:
        keep = None
    ours = (trials.c.study_id == study_id) & wanted
    if states is not None:
        ours = ours & trials.c.state.in_(list(states))
    engine = storage.engine
    rows: dict[int, Any] = {}
    counted = 0
    with storage_errors(engine.url.render_as_string(hide_password=False)), \
            engine.connect() as conn:
        if engine.dialect.name in ("postgresql", "mysql"):  # one snapshot for every read
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        if since > 0 and count:
            counted = conn.execute(select(func.count()).select_from(trials).where(
                (trials.c.study_id == study_id) & (trials.c.trial_id < since))).scalar_one()
        for values in conn.execute(select(*columns).where(ours)
                                   .order_by(trials.c.number, trials.c.trial_id)).all():
            if keep is not None and values[0] < since and values[0] not in keep:
                continue
            row = row_type()
            row.__dict__.update(zip(names, values, strict=True))
            row.__dict__.update((attr, []) for attr in children)
            rows[values[0]] = row
        # A read again (`since` > 0) takes a few trials: their rows by trial id, which each
        # table's index on trial_id finds. Joined on the study instead, PostgreSQL scans
        # every row of the table (20 ms a table at 10,000 trials, for each read again).
        ids = list(rows) if since > 0 and len(rows) <= _BY_ID else None
        for attr, table in children.items() if rows else ():
            key = next(iter(table.primary_key.columns))
            # In id order, as Optuna's reader has them (it sorts params by param_id).
            query = (select(table).where(table.c.trial_id.in_(ids)) if ids is not None else
                     select(table).join(trials, table.c.trial_id == trials.c.trial_id)
                     .where(ours)).order_by(key)
            for r in conn.execute(query).all():
                trial = rows.get(r.trial_id)
                if trial is not None:  # not a trial created after the first statement
                    getattr(trial, attr).append(r)
    return counted, [_build(storage, row) for row in rows.values()]


#: At most this many trial ids in one `IN (...)` (SQLite's oldest limit is 999 variables).
_BY_ID = 500


def _build(storage: Any, row: Any) -> Any:
    """Optuna's frozen trial for `row` (`RDBStorage`'s own builder), its params' distributions
    parsed once per distinct JSON text instead of twice per param: every trial of a study
    stores the same few texts, and parsing them was a third of a 10,000-trial read."""
    from optuna.distributions import json_to_distribution

    params, row.params = row.params, []
    trial = storage._build_frozen_trial_from_trial_model(row)
    row.params = params
    if params:
        parse = _PARSED.get
        dists = {}
        for p in params:
            dist = parse(p.distribution_json)
            if dist is None:
                if len(_PARSED) > 10_000:  # a long-lived reader of many studies
                    _PARSED.clear()
                dist = _PARSED.setdefault(p.distribution_json,
                                          json_to_distribution(p.distribution_json))
            dists[p.param_name] = dist
        trial.params = {p.param_name: dists[p.param_name].to_external_repr(p.param_value)
                        for p in params}
        trial.distributions = dists
    return trial


#: Distribution JSON text -> the distribution, shared by the trials read (Optuna's
#: distributions are never changed once made).
_PARSED: dict[str, Any] = {}
