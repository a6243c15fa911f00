"""Turn a spec's search section into one trial's flat `TrialConfig`.

The same function serves the live trial (Optuna suggests) and the export (an
`optuna.trial.FixedTrial` replays the best trial's params), so the exported config is exactly
the one that was trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gemma_search.spec import (
    ADAM_OPTIMIZERS,
    MOMENTUM_OPTIMIZERS,
    Choice,
    FloatRange,
    IntRange,
    SearchSpec,
    StudySpec,
)
from gemma_search.train.config import TrialConfig

__all__ = ["fixed_search", "trial_config"]

#: Conditional parameters: suggested only when the chosen optimizer uses them.
_CONDITIONS = {
    "momentum": MOMENTUM_OPTIMIZERS,
    "adam_beta2": ADAM_OPTIMIZERS,
}


def trial_config(trial: Any, spec: StudySpec) -> TrialConfig:
    """Suggest every searched setting on `trial` (an Optuna trial or FixedTrial)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(SearchSpec):
        needs = _CONDITIONS.get(f.name)
        if needs is not None and values["optimizer"] not in needs:
            values[f.name] = None
            continue
        values[f.name] = _suggest(trial, f.name, getattr(spec.search, f.name))
    return TrialConfig(
        task=spec.task.type,
        lora_target_modules=spec.model.lora_target_modules[values["lora_targets"]],
        metric=spec.objective.metric,
        maximize=spec.direction == "maximize",
        max_tokens=spec.budget.max_tokens_per_trial,
        eval_every_tokens=spec.budget.eval_every_tokens,
        eval_every_steps=spec.budget.eval_every_steps,
        **values,
    )


def fixed_search(spec: StudySpec, config: TrialConfig) -> SearchSpec:
    """The search section with every setting fixed at `config`'s values.

    Conditional settings the trial did not use keep the spec's value when it was fixed, or
    the field's default when it was searched.
    """
    fixed: dict[str, Any] = {}
    for f in dataclasses.fields(SearchSpec):
        value = getattr(config, f.name)
        if value is None:
            current = getattr(spec.search, f.name)
            value = f.default if isinstance(current, Choice | FloatRange | IntRange) else current
        fixed[f.name] = value
    return SearchSpec(**fixed)


def _suggest(trial: Any, name: str, value: Any) -> Any:
    if isinstance(value, FloatRange):
        return trial.suggest_float(name, value.low, value.high, log=value.log, step=value.step)
    if isinstance(value, IntRange):
        return trial.suggest_int(name, value.low, value.high, log=value.log, step=value.step)
    if isinstance(value, Choice):
        return trial.suggest_categorical(name, list(value.choices))
    return value
