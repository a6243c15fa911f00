"""Create and load studies: an Optuna study plus the validated spec it was made from.

The spec text and its hash are stored in `gs_studies` beside the study, so every worker,
`status` and `export` use the very spec the study was created with, whatever file sits on
their disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gemma_search.errors import StorageError, StudyNotFoundError
from gemma_search.spec import StudySpec, dump_spec, spec_from_text, spec_hash, without_secrets
from gemma_search.storage import open_storage, redact
from gemma_search.warm_start import enqueue_warm_start, warm_start_configs

__all__ = [
    "budget_trials",
    "budget_used",
    "gpu_hours_used",
    "build_pruner",
    "build_sampler",
    "check_data",
    "create_study",
    "load_study",
    "split_args",
]

log = logging.getLogger("gemma_search.study")


def _quiet_optuna() -> None:
    """Heartbeats, retry callbacks and grouped TPE are 'experimental' in Optuna since 2.x;
    we use them on purpose (design decision 2), so their warnings are noise to a user."""
    import warnings

    import optuna

    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)


def create_study(spec: StudySpec, url: str,
                 say: Callable[[str], None] | None = None) -> Any:
    """Create the study for `spec` in `url`; an identical existing study is reused.

    Brings both schemas up to date first (Optuna's and ours), so `create` is all a new
    database needs. The spec is stored without the password of its storage URL
    (`spec.without_secrets`): a spec that differs only in that password is the same spec.
    """
    import optuna

    from gemma_search import db

    _quiet_optuna()
    storage = open_storage(url)  # a clear error if the server cannot be reached
    db.upgrade_all(url)
    engine = db.make_engine(url)
    spec = without_secrets(spec)
    text, digest = dump_spec(spec), spec_hash(spec)
    stored = db.load_study_spec(engine, spec.name)
    if stored is not None and stored[1] != digest:
        # An earlier version may have dumped the same spec differently (`epochs: 2.0`,
        # `packing: true` for classification, a storage URL with its password): what counts
        # is the spec the text loads to.
        if spec_hash(without_secrets(spec_from_text(stored[0]))) != digest:
            raise StorageError(f"study {spec.name!r} already exists in {redact(url)} with a "
                               "different spec; change `name` in the spec (or --set "
                               "name=NEW)")
        text, digest = stored
    # Names only: summaries would read every trial of every study in the database.
    names = set(optuna.get_all_study_names(storage))
    if spec.name in names:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        db.save_study_spec(engine, spec.name, text, digest)
        return study  # created before: its warm start was enqueued then
    # Checked before anything is written: a bad from_study leaves no half-made study.
    warm, notes = warm_start_configs(spec, url)
    study = optuna.create_study(study_name=spec.name, storage=storage,
                                direction=spec.direction)
    # optuna-dashboard labels its plots with this name instead of "Objective 0".
    study.set_metric_names([spec.objective.metric])
    db.save_study_spec(engine, spec.name, text, digest)
    for line in enqueue_warm_start(study, warm, notes):
        (say or log.info)(line)
    return study


def load_study(name: str, url: str, *, heartbeat: bool = False,
               worker_index: int = 0) -> tuple[Any, StudySpec]:
    """The named study with the sampler and pruner its stored spec asks for.

    `heartbeat`: open the storage as a worker, with the spec's heartbeat settings.
    `worker_index` names the worker that asks; sampling does not depend on it (each trial
    is seeded from its own number, see `build_sampler`).
    """
    import optuna

    from gemma_search import db

    _quiet_optuna()
    storage = open_storage(url, must_exist=True)
    # Names only: summaries would read every trial of every study in the database.
    names = sorted(optuna.get_all_study_names(storage))
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise StudyNotFoundError(f"study {name!r} does not exist in {redact(url)} (studies "
                                 f"there: {known}); create it with `gemma-search create SPEC`")
    stored = db.load_study_spec(db.make_engine(url), name)
    if stored is None:
        raise StorageError(f"study {name!r} in {redact(url)} was not created by gemma-search "
                           "(it has no stored spec); create one with `gemma-search create SPEC`")
    spec = spec_from_text(stored[0])
    if heartbeat:
        s = spec.storage
        storage = open_storage(url, heartbeat=(s.heartbeat_interval, s.grace_period,
                                               s.max_retries),
                               connect_patience=s.reconnect_seconds)
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=build_sampler(spec),
                              pruner=build_pruner(spec))
    return study, spec


def build_sampler(spec: StudySpec) -> Any:
    """The spec's sampler; with `sampler.seed`, each trial is sampled from (seed, trial number).

    Seeding per process, with the seed offset by the worker index, replayed the random
    start-up trials whenever a worker restarted (issue 12: a worker restarted 3 times with
    random sampling ran 12 trials on 3 configurations). Trial numbers are never reused in a
    study, so no trial, of any worker or any restart, draws what another drew. What trial N
    proposes depends on the seed, N and the trials the study holds when N starts, never on
    which worker or process asks. Without a seed, every process draws from the operating
    system's entropy.
    """
    import optuna

    from gemma_search.sampler import TrialSeededSampler

    s = spec.sampler

    def make(seed: int | None) -> Any:
        if s.type == "tpe":
            # constant_liar: running trials count as bad guesses, so parallel workers spread
            # out.
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials,
                                              multivariate=True, group=True,
                                              constant_liar=True)
        if s.type == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if s.type == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials)
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=s.n_startup_trials,
                                            warn_independent_sampling=False)

    return make(None) if s.seed is None else TrialSeededSampler(make, s.seed)


def build_pruner(spec: StudySpec) -> Any:
    """The spec's pruner; steps are evaluation numbers (1, 2, ...) at fixed token counts."""
    import optuna

    p, b = spec.pruner, spec.budget
    if p.type == "hyperband":
        max_resource: int | str = "auto"
        if b.max_tokens_per_trial is not None and b.eval_every_tokens is not None:
            max_resource = max(p.min_resource + 1, b.max_tokens_per_trial // b.eval_every_tokens)
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource,
                                              max_resource=max_resource,
                                              reduction_factor=p.reduction_factor)
    if p.type == "asha" and p.pause:
        # Trials pause at rungs instead; a worker decides what resumes (gemma_search.promotion).
        return optuna.pruners.NopPruner()
    if p.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource,
                                                      reduction_factor=p.reduction_factor)
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials,
                                           n_warmup_steps=p.n_warmup_steps)
    if p.type == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=p.p_threshold)
    return optuna.pruners.NopPruner()


def gpu_hours_used(trials: list[Any], now: Any = None) -> float:
    """Device-hours of the study: each trial's wall time x its GPUs, running trials to now.

    A worker drives one device (design decision 8), so a trial counts `gpus` = 1 unless it
    recorded otherwise; re-queued failures count too, since their time was spent.
    """
    from datetime import datetime

    from optuna.trial import TrialState

    total = 0.0
    for t in trials:
        gpus = float(t.user_attrs.get("gpus", 1))
        # A trial that paused at a rung (`gemma_search.promotion`) ran in segments: its
        # start is the last segment's, and the earlier ones are recorded beside it.
        paused = t.system_attrs.get("paused")
        if t.state == TrialState.WAITING:
            total += float(paused["seconds"]) * gpus if paused else 0.0
            continue
        if t.datetime_start is None:
            continue
        start = t.datetime_start
        # Optuna stores naive local times (datetime.now()): compare like with like.
        end = t.datetime_complete or now or datetime.now(start.tzinfo)
        before = float((t.system_attrs.get("segment") or {}).get("seconds_before", 0.0))
        total += (max(0.0, (end - start).total_seconds()) + before) * gpus
    return total / 3600.0


def budget_used(trials: list[Any]) -> int:
    """Trials that count against `budget.max_trials`: running and waiting ones included.

    A failed trial that was re-queued (its number is in a later trial's `retry_history`) is
    counted once, through its retry. Verification re-runs live in a study of their own
    (`gemma_search.verify`); a study verified by an earlier version of gemma-search still
    holds its re-runs, tagged `verify_of`, and those stay outside the count, as they were.
    """
    return len(budget_trials(trials))


def budget_trials(trials: list[Any]) -> list[Any]:
    """The trials `budget_used` counts: not a failed trial whose retry carries on (it
    carries its values, and its tokens: `promotion.tokens_spent`), not a verification
    re-run."""
    from optuna.trial import TrialState

    from gemma_search.ranking import is_verification

    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if not (t.state == TrialState.FAIL and t.number in retried)
            and not is_verification(t)]


def split_args(spec: StudySpec) -> dict[str, Any]:
    """The spec's data and task sections as `train.data.read_splits` arguments."""
    task, data = spec.task, spec.data
    return {
        "task": task.type,
        "train_path": data.train,
        "validation_path": data.validation,
        "validation_fraction": data.validation_fraction,
        "text_column": task.text_column,
        "prompt_template": task.prompt_template,
        "completion_column": task.completion_column,
        "label_column": task.label_column,
        "max_train_examples": data.max_train_examples,
        "max_validation_examples": data.max_validation_examples,
        "rename_columns": data.rename_columns,
        "seed": data.seed,
        "header": data.header,
        "columns": data.columns,
        "max_line_bytes": data.max_line_bytes,
    }


def check_data(spec: StudySpec) -> None:
    """Read the spec's data files and check every row: bad data fails before a write."""
    from gemma_search.train.data import read_splits

    read_splits(labels=spec.task.labels, **split_args(spec))
