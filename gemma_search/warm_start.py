"""Warm start: known-good configurations run first, before the sampler proposes its own.

A new study enqueues, in this order, the spec's `warm_start.presets`, its `warm_start.configs`
and the best trials of `warm_start.from_study` (an earlier study on the same model and task).
Enqueued trials are WAITING trials of the study: workers pop them before asking the sampler
(`worker._claim_trial`), and Optuna hands each waiting trial to exactly one worker. They count
against `budget.max_trials` like any other trial, and carry the user attribute `warm_start`
saying where they came from.
"""

from __future__ import annotations

from typing import Any

from gemma_search.errors import SpecError, StorageError
from gemma_search.spec import PRESETS, StudySpec, fit_to_search, spec_from_text
from gemma_search.storage import redact

__all__ = ["WARM_START_ATTR", "enqueue_warm_start", "warm_start_configs"]

#: User attribute of an enqueued warm-start trial: "preset gemma2-lora", "config 0", ...
WARM_START_ATTR = "warm_start"


def warm_start_configs(spec: StudySpec, url: str) -> tuple[list[tuple[str, dict[str, Any]]],
                                                            list[str]]:
    """(label, params) of every warm-start configuration, duplicates dropped, and notes on
    the settings left out of them (each says what the trial does instead)."""
    found: list[tuple[str, dict[str, Any]]] = []
    notes: list[str] = []
    for name in spec.warm_start.presets:
        params, dropped = fit_to_search(spec, PRESETS[name])
        found.append((f"preset {name}", params))
        notes += [f"preset {name}: {note}" for note in dropped]
    for i, config in enumerate(spec.warm_start.configs):
        params, _ = fit_to_search(spec, config, where=f"warm_start.configs[{i}]")
        found.append((f"config {i}", params))
    if spec.warm_start.from_study is not None:
        earlier = _best_of_earlier_study(spec, url)
        for number, settings in earlier:
            params, dropped = fit_to_search(spec, settings)
            label = f"study {spec.warm_start.from_study} trial {number}"
            found.append((label, params))
            notes += [f"{label}: {note}" for note in dropped]
    unique: list[tuple[str, dict[str, Any]]] = []
    for label, params in found:
        if not params:
            notes.append(f"{label}: no setting of it is searched here; not enqueued")
        elif any(params == seen for _, seen in unique):
            notes.append(f"{label}: same settings as an earlier warm start; not enqueued")
        else:
            unique.append((label, params))
    if len(unique) > spec.budget.max_trials:
        raise SpecError(f"warm_start gives {len(unique)} configurations but budget.max_trials "
                        f"is {spec.budget.max_trials}; raise the budget or lower "
                        "warm_start.from_study_top")
    return unique, notes


def enqueue_warm_start(study: Any, configs: list[tuple[str, dict[str, Any]]],
                       notes: list[str]) -> list[str]:
    """Enqueue `warm_start_configs`' configurations on a new study; return lines to show."""
    for label, params in configs:
        study.enqueue_trial(params, user_attrs={WARM_START_ATTR: label}, skip_if_exists=False)
    lines = [f"warm start: {label} enqueued first" for label, _ in configs]
    return lines + [f"warm start: {note}" for note in notes]


def _best_of_earlier_study(spec: StudySpec, url: str) -> list[tuple[int, dict[str, Any]]]:
    """The `from_study_top` best search trials of the earlier study (`ranking`), as (number,
    params)."""
    import optuna

    from gemma_search import db
    from gemma_search.ranking import ranked_trials
    from gemma_search.storage import open_storage

    name = spec.warm_start.from_study
    assert name is not None
    stored = db.load_study_spec(db.make_engine(url), name)
    if stored is None:
        raise StorageError(f"warm_start.from_study is {name!r}, which is not a gemma-search "
                           f"study in {redact(url)}; name one that `gemma-search status` shows")
    earlier = spec_from_text(stored[0])
    if (earlier.model.name_or_path, earlier.task.type) != (spec.model.name_or_path,
                                                          spec.task.type):
        raise SpecError(f"warm_start.from_study {name!r} tuned {earlier.model.name_or_path} "
                        f"for {earlier.task.type}, but this study tunes "
                        f"{spec.model.name_or_path} for {spec.task.type}; name a study on the "
                        "same model and task")
    study = optuna.load_study(study_name=name, storage=open_storage(url, must_exist=True))
    done = ranked_trials(study, earlier)
    if not done:
        raise StorageError(f"warm_start.from_study {name!r} has no completed trial to start "
                           "from; run it first or remove warm_start.from_study")
    return [(t.number, dict(t.params)) for t in done[:spec.warm_start.from_study_top]]
