"""What a study has learnt so far: which settings matter, and where the good trials lie.

Pure functions over an Optuna study and its `StudySpec`; `report` and `status` call them.
Outputs are plain dicts, lists, strings and floats, so they go straight into JSON.

Only the trials `ranking` ranks count: COMPLETE search trials with a finite value. A pruned
trial stopped early on purpose: its last reported value is a partial-training value, not
comparable with finished trials, and Optuna's importance evaluators read completed trials
only. Pruned trials still show in the report's intermediate-values plot.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Literal

from gemma_search.errors import GemmaSearchError
from gemma_search.ranking import ranked_trials, search_trials
from gemma_search.spec import Choice, FloatRange, IntRange, SearchSpec, StudySpec

__all__ = [
    "MIN_COMPLETE_TRIALS",
    "Evaluator",
    "complete_trials",
    "importance_evaluator",
    "importance_note",
    "param_importances",
    "recommendation",
    "searched_params",
]

Evaluator = Literal["fanova", "ped-anova"]

#: Below this many complete trials an importance is noise: PED-ANOVA compares the top 10%
#: of trials (at least 2) with all of them.
MIN_COMPLETE_TRIALS = 4
#: fANOVA's forest is random; a fixed seed makes `status` and `report` agree run after run.
FANOVA_SEED = 0
#: Top trials used for a region: at least this many (when there are), whatever `top_fraction`.
MIN_TOP_TRIALS = 3
#: A region whose end lies within this share of the search range of a bound "touches" it.
_EDGE = 0.05


def complete_trials(study: Any) -> list[Any]:
    """The search trials that count: COMPLETE, a finite value (inf/NaN would poison ranges and
    importances), not a verification re-run (`ranking.search_trials`)."""
    return search_trials(study)


def searched_params(spec: StudySpec) -> dict[str, FloatRange | IntRange | Choice]:
    """The spec's searched settings (ranges and choices) by name; fixed values are left out."""
    import dataclasses

    out: dict[str, FloatRange | IntRange | Choice] = {}
    for f in dataclasses.fields(SearchSpec):
        value = getattr(spec.search, f.name)
        if isinstance(value, FloatRange | IntRange | Choice):
            out[f.name] = value
    return out


def importance_note(study: Any) -> str | None:
    """Why `param_importances` would return {} for `study`; None when it can compute them."""
    trials = complete_trials(study)
    if len(trials) < MIN_COMPLETE_TRIALS:
        return (f"{len(trials)} complete trial(s); parameter importances need at least "
                f"{MIN_COMPLETE_TRIALS}")
    varying = _varying_params(trials)
    if len(varying) < 2:
        which = f" ({varying[0]})" if varying else ""
        return (f"{len(varying)} searched parameter(s) vary across the complete trials{which}; "
                "importances compare at least 2")
    if len({t.value for t in trials}) == 1:
        return "every complete trial has the same value; nothing to attribute"
    return None


def param_importances(study: Any, *, evaluator: Evaluator = "ped-anova") -> dict[str, float]:
    """Normalised importance of each searched parameter (sums to 1), most important first.

    `ped-anova` (the default, as in Optuna): PED-ANOVA (Watanabe et al., IJCAI 2023), which
    is deterministic, needs no extra package and keeps conditional parameters. `fanova`:
    fANOVA (Hutter et al., ICML 2014) on a seeded random forest; Optuna builds it with
    scikit-learn, which gemma-search does not install; only parameters present in every
    complete trial. {} when `importance_note` gives a reason.
    """
    import warnings

    import optuna

    if importance_note(study) is not None:
        return {}
    with warnings.catch_warnings():
        # Some evaluators and `normalize` are marked experimental; we pin Optuna's major.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # PED-ANOVA warns when a conditional param (momentum) has few trials in a regime;
        # the importance is still what there is to say, and the note would bury the table.
        warnings.filterwarnings("ignore", message="Some regimes for parameter",
                                category=UserWarning)
        raw = optuna.importance.get_param_importances(study, evaluator=importance_evaluator(
            evaluator))
    return {name: float(value) for name, value in
            sorted(raw.items(), key=lambda kv: kv[1], reverse=True)}


def importance_evaluator(evaluator: Evaluator = "ped-anova") -> Any:
    """The Optuna evaluator behind `param_importances` (the report's plot uses the same)."""
    import importlib.util

    import optuna

    if evaluator == "ped-anova":
        return optuna.importance.PedAnovaImportanceEvaluator()
    if evaluator == "fanova":
        if importlib.util.find_spec("sklearn") is None:
            raise GemmaSearchError("importance evaluator fanova needs scikit-learn, which is "
                                   "not installed; `pip install scikit-learn` or use ped-anova")
        return optuna.importance.FanovaImportanceEvaluator(seed=FANOVA_SEED)
    raise GemmaSearchError(f"importance evaluator {evaluator!r} is unknown; use ped-anova or "
                           "fanova")


def recommendation(study: Any, spec: StudySpec, top_fraction: float = 0.2, *,
                   importances: dict[str, float] | None = None,
                   evaluator: Evaluator = "ped-anova",
                   trials: list[Any] | None = None) -> dict[str, Any]:
    """Where the best `top_fraction` of complete trials lie, per searched parameter.

    Returns a JSON-ready dict::

        {"metric", "direction", "n_complete", "n_top", "top_trials": [numbers],
         "evaluator", "importances": {param: float}, "importance_note": str | None,
         "params": [{"name", "kind": "float"|"int"|"categorical", "importance": float|None,
                     "n": top trials that used it,
                     # numeric: "log", "low", "high", "median", "range": [lo, hi],
                     #          "edge": "low"|"high"|None (region touches a search bound)
                     # categorical: "choices": {str(choice): count among top trials}
                     }, ...],                       # most important first
         "lines": ["learning_rate: good trials lie in 3.1e-4 .. 1.2e-3 (log), ...", ...]}

    `importances`: reuse ones already computed (else `param_importances(study, evaluator)`).
    `trials`: the study's trials when the caller has read them already
    (`reads.read_trials`). Either way the study's trials are read once at most: the
    ranking, the note and the importance evaluator all work on that one list.
    """
    from gemma_search.reads import frozen_study, read_trials

    if not 0 < top_fraction <= 1:
        raise GemmaSearchError(f"top_fraction is {top_fraction} but must be in (0, 1]")
    # Optuna's evaluator takes a study: one that answers from the list, not the storage.
    study = frozen_study(study, read_trials(study) if trials is None else trials)
    trials = ranked_trials(study, spec)
    # A region needs a few points to mean anything: at least MIN_TOP_TRIALS when there are.
    n_top = min(len(trials), max(MIN_TOP_TRIALS, math.ceil(top_fraction * len(trials))))
    top = trials[:n_top]
    note = importance_note(study)
    if importances is None:
        importances = param_importances(study, evaluator=evaluator) if note is None else {}
    params = [_param_region(name, dist, top, importances.get(name))
              for name, dist in searched_params(spec).items()]
    # Most important first; parameters without an importance keep the spec's order after.
    params.sort(key=lambda p: -p["importance"] if p["importance"] is not None else math.inf)
    return {
        "metric": spec.objective.metric,
        "direction": spec.direction,
        "n_complete": len(trials),
        "n_top": n_top,
        "top_trials": [t.number for t in top],
        "evaluator": evaluator,
        "importances": importances,
        "importance_note": note,
        "params": params,
        "lines": [_line(p, n_top) for p in params],
    }


def _varying_params(trials: list[Any]) -> list[str]:
    """Params present in every trial that take more than one value (what fANOVA can use)."""
    common = set(trials[0].params) if trials else set()
    for t in trials[1:]:
        common &= set(t.params)
    return sorted(n for n in common if len({repr(t.params[n]) for t in trials}) > 1)


def _param_region(name: str, dist: FloatRange | IntRange | Choice, top: list[Any],
                  importance: float | None) -> dict[str, Any]:
    # Conditional params (momentum, adam_beta2) are absent from trials that did not use them.
    values = [t.params[name] for t in top if name in t.params]
    out: dict[str, Any] = {"name": name, "importance": importance, "n": len(values)}
    if isinstance(dist, Choice):
        counts: dict[str, int] = {}
        for v in values:
            counts[str(v)] = counts.get(str(v), 0) + 1
        out["kind"] = "categorical"
        out["choices"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        return out
    out["kind"] = "float" if isinstance(dist, FloatRange) else "int"
    out["log"] = dist.log
    out["range"] = [dist.low, dist.high]
    if not values:
        out.update(low=None, high=None, median=None, edge=None)
        return out
    # On a log scale the middle of two values is their geometric mean.
    scale = math.log if dist.log else float
    unscale = math.exp if dist.log else float
    lo, hi = min(values), max(values)
    out["low"], out["high"] = lo, hi
    out["median"] = unscale(statistics.median(scale(v) for v in values))
    span = scale(dist.high) - scale(dist.low)
    at_low = scale(lo) - scale(dist.low) <= _EDGE * span
    at_high = scale(dist.high) - scale(hi) <= _EDGE * span
    # Only one bound touched means the good region may continue past it.
    out["edge"] = "low" if at_low and not at_high else "high" if at_high and not at_low else None
    return out


def _line(p: dict[str, Any], n_top: int) -> str:
    imp = "" if p["importance"] is None else f"; importance {p['importance']:.2f}"
    if p["n"] == 0:
        return f"{p['name']}: not used by the top trials{imp}"
    used = "" if p["n"] == n_top else f" ({p['n']} of {n_top} top trials use it)"
    if p["kind"] == "categorical":
        picks = ", ".join(f"{c} ({k} of {p['n']})" for c, k in p["choices"].items())
        return f"{p['name']}: good trials chose {picks}{used}{imp}"
    log = " (log)" if p["log"] else ""
    text = (f"{p['name']}: good trials lie in {_num(p['low'])} .. {_num(p['high'])}{log}, "
            f"median {_num(p['median'])}{used}{imp}")
    if p["edge"] is not None:
        bound = p["range"][0] if p["edge"] == "low" else p["range"][1]
        text += (f"; at the {p['edge']} end of the search range ({_num(bound)}): consider "
                 "widening it")
    return text


def _num(value: float | int) -> str:
    """Compact: 3.1e-4, 0.05, 16, 1.2e+4."""
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e4:
        return str(int(value))
    if 1e-2 <= abs(value) < 1e4:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"
