"""The two baselines beside every result (`train.baselines` measures them): recorded once per
study by its first worker, shown by `status`, `report` and export's provenance.json, with a
flag when the study's best does not beat them.

A study whose best trial does no better than predicting the training mean, or than the model
it started from, has not learnt the task, however good its leaderboard looks.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from gemma_search.spec import StudySpec

__all__ = ["BASELINES_ATTR", "compare_to_baselines", "record_baselines"]

log = logging.getLogger("gemma_search.baselines")

#: Study user attribute holding the baselines: {"untrained": {metric: value},
#: "trivial": {metric: value}, "trivial_predictor": str}.
BASELINES_ATTR = "baselines"


def record_baselines(study: Any, spec: StudySpec, base: Any, data: Any) -> dict[str, Any]:
    """Measure and store the study's baselines unless a worker already did; return them.

    Two workers starting together may both measure them: the values are the same, and the
    last write wins.
    """
    from gemma_search.train.baselines import trivial_baseline, untrained_baseline

    stored = study.user_attrs.get(BASELINES_ATTR)
    if stored is not None:
        return dict(stored)
    labels = list(spec.task.labels) if spec.task.labels else None
    predictor, trivial = trivial_baseline(data, len(base.tokenizer), labels)
    baselines = {"untrained": untrained_baseline(base, data), "trivial": trivial,
                 "trivial_predictor": predictor}
    study.set_user_attr(BASELINES_ATTR, baselines)
    log.info("baselines of %s: untrained %s, %s %s", spec.name, baselines["untrained"],
             predictor, trivial)
    return baselines


def compare_to_baselines(spec: StudySpec, baselines: dict[str, Any] | None,
                         best: float | None) -> dict[str, Any] | None:
    """The objective metric's two baselines beside `best`, and whether it beats both.

    None before a worker recorded them. JSON-ready: {"metric", "untrained", "trivial",
    "trivial_predictor", "best", "beats_untrained", "beats_trivial", "line"}.
    """
    if not baselines:
        return None
    metric = spec.objective.metric
    untrained = baselines["untrained"].get(metric)
    trivial = baselines["trivial"].get(metric)
    maximize = spec.direction == "maximize"

    def beats(reference: float | None) -> bool | None:
        if best is None or reference is None or not math.isfinite(best):
            return None
        return best > reference if maximize else best < reference

    out = {"metric": metric, "untrained": untrained, "trivial": trivial,
           "trivial_predictor": baselines["trivial_predictor"], "best": best,
           "beats_untrained": beats(untrained), "beats_trivial": beats(trivial)}
    shown = (f"baselines ({metric}): untrained start {_fmt(untrained)}, trivial predictor "
             f"({baselines['trivial_predictor']}) {_fmt(trivial)}")
    missed = [name for name, key in (("the untrained start", "beats_untrained"),
                                     ("the trivial predictor", "beats_trivial"))
              if out[key] is False]
    if best is None:
        out["line"] = shown
    elif missed:
        out["line"] = (f"{shown}; WARNING: the best, {_fmt(best)}, does not beat "
                       f"{' nor '.join(missed)}: the search has not learnt the task (check the "
                       "data, the learning-rate range and the budget)")
    else:
        out["line"] = f"{shown}; the best, {_fmt(best)}, beats both"
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
