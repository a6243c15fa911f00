"""Re-check the top configurations on new seeds: `gemma-search verify STUDY --top K --seeds S`.

The best single trial of a search is partly luck: among many configurations, the one with the
best value is also the one whose seed happened to help most (the winner's curse). `verify`
re-runs the K best configurations with S new training seeds, as tagged trials of the same
study, and ranks them by the mean over those new seeds, which the selection did not see.
`export` then picks the best by that mean and says so in provenance.json.

Verification trials:
- carry user attributes `verify_of` (the trial they re-run) and `verify_seed`;
- use the original's params with `seed` replaced (`Objective` reads `verify_seed`);
- are never pruned (a pruned re-run measures nothing) and do not count against
  `budget.max_trials`: they are an explicit extra request.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from gemma_search.errors import GemmaSearchError
from gemma_search.spec import StudySpec

__all__ = ["VERIFY_OF", "VERIFY_SEED", "best_by_mean", "enqueue_verification", "ranked_originals",
           "is_verification", "verification_summary"]

VERIFY_OF = "verify_of"
VERIFY_SEED = "verify_seed"


def is_verification(trial: Any) -> bool:
    """Whether `trial` (frozen or live) re-runs another trial on a new seed."""
    return VERIFY_OF in trial.user_attrs


def _seed_of(trial: Any, spec: StudySpec) -> int:
    """The training seed a trial ran with: its own `verify_seed`, a searched `seed` param,
    or the spec's fixed seed."""
    if VERIFY_SEED in trial.user_attrs:
        return int(trial.user_attrs[VERIFY_SEED])
    if "seed" in trial.params:
        return int(trial.params["seed"])
    return int(spec.search.seed) if isinstance(spec.search.seed, int) else 0


def ranked_originals(study: Any, spec: StudySpec) -> list[Any]:
    """Completed search trials (not re-runs), best first."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not is_verification(t) and t.value is not None and math.isfinite(t.value)]
    done.sort(key=lambda t: float(t.value), reverse=spec.direction == "maximize")
    return done


def enqueue_verification(study: Any, spec: StudySpec, *, top: int, seeds: int
                         ) -> list[tuple[int, int]]:
    """Enqueue `seeds` new-seed re-runs of each of the `top` best trials; return the
    (trial, seed) pairs enqueued now. Pairs already enqueued or run are not repeated, so
    running `verify` again continues an interrupted verification."""
    originals = ranked_originals(study, spec)[:top]
    if not originals:
        raise GemmaSearchError(f"study {spec.name!r} has no completed trial to verify yet; "
                               "run the search first (`gemma-search launch`)")
    existing = {(t.user_attrs[VERIFY_OF], t.user_attrs[VERIFY_SEED])
                for t in study.get_trials(deepcopy=False) if is_verification(t)}
    added = []
    for original in originals:
        base = _seed_of(original, spec)
        # New seeds: the next S after the one the trial ran with (never the same one).
        for seed in range(base + 1, base + 1 + seeds):
            if (original.number, seed) in existing:
                continue
            study.enqueue_trial(dict(original.params), skip_if_exists=False,
                                user_attrs={VERIFY_OF: original.number, VERIFY_SEED: seed})
            added.append((original.number, seed))
    return added


def verification_summary(study: Any, spec: StudySpec) -> list[dict[str, Any]]:
    """Per verified trial: its own value, the new seeds' values, their mean and spread;
    best mean first. Only completed re-runs count."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    runs: dict[int, list[Any]] = {}
    pending: dict[int, int] = {}
    for t in trials:
        if not is_verification(t):
            continue
        original = int(t.user_attrs[VERIFY_OF])
        if t.state == TrialState.COMPLETE and t.value is not None:
            runs.setdefault(original, []).append(t)
        elif not t.state.is_finished():
            pending[original] = pending.get(original, 0) + 1
    rows = []
    for number in sorted(set(runs) | set(pending)):
        done = sorted(runs.get(number, []), key=lambda t: t.user_attrs[VERIFY_SEED])
        values = [float(t.value) for t in done]
        original = by_number[number]
        rows.append({
            "trial": number,
            "original_value": original.value,
            "original_seed": _seed_of(original, spec),
            "seeds": [int(t.user_attrs[VERIFY_SEED]) for t in done],
            "values": values,
            "verify_trials": [t.number for t in done],
            "n": len(values),
            "pending": pending.get(number, 0),
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "params": dict(original.params),
        })
    maximize = spec.direction == "maximize"
    rows.sort(key=lambda r: (r["mean"] is None,
                             0.0 if r["mean"] is None else (-r["mean"] if maximize
                                                            else r["mean"])))
    return rows


def best_by_mean(study: Any, spec: StudySpec) -> dict[str, Any] | None:
    """The verified trial with the best mean over its new seeds, or None if none is
    verified yet."""
    rows = [r for r in verification_summary(study, spec) if r["n"] > 0]
    return rows[0] if rows else None
