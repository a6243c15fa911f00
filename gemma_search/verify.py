"""Re-check the top configurations on new seeds: `gemma-search verify STUDY --top K --seeds S`.

The best single trial of a search is partly luck: among many configurations, the one with the
best value is also the one whose seed happened to help most (the winner's curse). `verify`
re-runs the K best configurations with S new training seeds and ranks them by the mean over
those new seeds, which the selection did not see. `export` then picks the best by that mean
and says so in provenance.json; `status` says so too.

The re-runs live in a companion study beside the search study, named `<study>.verify`, so
that the search study holds exactly its search trials: `optuna best-trial`, optuna-dashboard
and `status` agree on its best trial, and its trial count is its budget. The two are linked
both ways by study user attributes: the search study's `verify_study` names the companion,
the companion's `search_study` names the search study. The companion stores the search
study's spec under its own name (warm start dropped), so `gemma-search worker STUDY.verify`
and `launch` run it like any study, with checkpoints in their own folder
(`checkpoints.dir/STUDY.verify/`). Its workers only run the re-runs enqueued there; they never
sample trials of their own (`worker._claim_trial`).

A name ending in `.verify` is only taken as a companion when that study links back to the
search study (or stores exactly its renamed spec); a user's own study of that name makes
`verify` stop with an error instead of mixing the two.

Re-runs:
- carry user attributes `verify_of` (the search trial they re-run) and `verify_seed`;
- use the original's params with `seed` replaced (`Objective` reads `verify_seed`);
- are never pruned (a pruned re-run measures nothing).

Studies verified before the companion existed hold their re-runs inside the search study,
with the same tags: those still count here, and `ranking` leaves them out of the ranking.
"""

from __future__ import annotations

import statistics
from typing import Any

from gemma_search.errors import GemmaSearchError, StorageError
from gemma_search.ranking import VERIFY_OF, is_verification, ranked_trials
from gemma_search.spec import StudySpec

__all__ = ["COMPANION_SUFFIX", "SEARCH_STUDY", "VERIFY_OF", "VERIFY_SEED", "VERIFY_STUDY",
           "best_by_mean", "companion_name", "enqueue_verification", "export_pick",
           "is_verification", "load_companion", "rerun_progress", "search_study_of",
           "verification_summary"]

#: User attribute of a re-run: the training seed it runs with.
VERIFY_SEED = "verify_seed"
#: The companion of study S is named S + this suffix.
COMPANION_SUFFIX = ".verify"
#: Study user attribute of a search study: the name of its companion.
VERIFY_STUDY = "verify_study"
#: Study user attribute of a companion: the name of the search study it verifies.
SEARCH_STUDY = "search_study"


def companion_name(name: str) -> str:
    """The name of the study that holds the re-runs of study `name`."""
    return name + COMPANION_SUFFIX


def search_study_of(study: Any) -> str | None:
    """The search study that `study` verifies, or None when `study` is not a companion."""
    name = study.user_attrs.get(SEARCH_STUDY)
    return None if name is None else str(name)


def load_companion(study: Any, url: str) -> Any:
    """The companion of search study `study`, or None when it was never verified."""
    import optuna

    from gemma_search.storage import open_storage

    name = study.user_attrs.get(VERIFY_STUDY)
    if name is None:
        return None
    return optuna.load_study(study_name=name, storage=open_storage(url, must_exist=True))


def _open_companion(study: Any, spec: StudySpec, url: str) -> Any:
    """Create the companion of `study` (or load it), linked both ways."""
    import dataclasses

    import optuna

    from gemma_search import db
    from gemma_search.spec import WarmStartSpec, dump_spec, spec_hash
    from gemma_search.storage import open_storage, redact
    from gemma_search.study import create_study

    name = companion_name(spec.name)
    # Same settings, own name: checkpoints, evaluations and worker rows are kept by study
    # name, so the re-runs never mix with the search trials of the same number.
    companion_spec = dataclasses.replace(spec, name=name, warm_start=WarmStartSpec())
    text, digest = dump_spec(companion_spec), spec_hash(companion_spec)
    storage = open_storage(url, must_exist=True)
    engine = db.make_engine(url)
    try:
        stored = db.load_study_spec(engine, name)
        if name in optuna.get_all_study_names(storage):
            companion = optuna.load_study(study_name=name, storage=storage)
            ours = (search_study_of(companion) == spec.name
                    or stored is not None and stored[1] == digest)
        else:
            companion = None
            ours = stored is None or stored[1] == digest
        if not ours:
            raise StorageError(
                f"study {name!r} in {redact(url)} is not the verification study of "
                f"{spec.name!r}, but verify keeps the re-runs of {spec.name!r} under that "
                "name; create this study again under another name to verify it")
        if companion is None:
            companion = create_study(companion_spec, url)
        elif stored is None:  # linked, but its spec row is gone: workers need it
            db.save_study_spec(engine, name, text, digest)
    finally:
        engine.dispose()
    if search_study_of(companion) != spec.name:
        companion.set_user_attr(SEARCH_STUDY, spec.name)
    if study.user_attrs.get(VERIFY_STUDY) != name:
        study.set_user_attr(VERIFY_STUDY, name)
    return companion


def _seed_of(trial: Any, spec: StudySpec) -> int:
    """The training seed a trial ran with: its own `verify_seed`, a searched `seed` param,
    or the spec's fixed seed."""
    if VERIFY_SEED in trial.user_attrs:
        return int(trial.user_attrs[VERIFY_SEED])
    if "seed" in trial.params:
        return int(trial.params["seed"])
    return int(spec.search.seed) if isinstance(spec.search.seed, int) else 0


def _reruns(study: Any, companion: Any, *, trials: list[Any] | None = None,
            companion_trials: list[Any] | None = None) -> list[Any]:
    """Every re-run of `study`: the companion's trials, and tagged trials that an earlier
    version of gemma-search kept inside the search study. `trials`, `companion_trials`: the
    two studies' trials when already read (`reads.read_trials`); read here otherwise."""
    from gemma_search.reads import read_trials

    own = read_trials(study) if trials is None else trials
    theirs = ([] if companion is None else
              read_trials(companion) if companion_trials is None else companion_trials)
    return [t for t in [*own, *theirs] if is_verification(t)]


def enqueue_verification(study: Any, spec: StudySpec, url: str, *, top: int, seeds: int
                         ) -> tuple[Any, list[tuple[int, int]]]:
    """Enqueue `seeds` new-seed re-runs of each of the `top` best trials in the companion
    study (created on first use); return the companion and the (trial, seed) pairs
    enqueued now. Pairs already enqueued or run are not repeated, so running `verify`
    again continues an interrupted verification."""
    if search_study_of(study) is not None:
        raise GemmaSearchError(f"study {spec.name!r} holds the verification re-runs of "
                               f"{search_study_of(study)!r}; verify that study instead")
    originals = ranked_trials(study, spec)[:top]
    if not originals:
        raise GemmaSearchError(f"study {spec.name!r} has no completed trial to verify yet; "
                               "run the search first (`gemma-search launch`)")
    companion = _open_companion(study, spec, url)
    existing = {(t.user_attrs[VERIFY_OF], t.user_attrs[VERIFY_SEED])
                for t in _reruns(study, companion)}
    added = []
    for original in originals:
        base = _seed_of(original, spec)
        # New seeds: the next S after the one the trial ran with (never the same one).
        for seed in range(base + 1, base + 1 + seeds):
            if (original.number, seed) in existing:
                continue
            companion.enqueue_trial(dict(original.params), skip_if_exists=False,
                                    user_attrs={VERIFY_OF: original.number,
                                                VERIFY_SEED: seed})
            added.append((original.number, seed))
    return companion, added


def rerun_progress(trials: list[Any]) -> tuple[int, int]:
    """(finished, enqueued) re-runs among a companion's `trials`. A failed re-run that was
    re-queued counts once, finished when its retry is."""
    runs: dict[tuple[Any, Any], bool] = {}
    for t in trials:
        if is_verification(t):
            key = (t.user_attrs[VERIFY_OF], t.user_attrs[VERIFY_SEED])
            runs[key] = runs.get(key, True) and t.state.is_finished()
    return sum(runs.values()), len(runs)


def verification_summary(study: Any, spec: StudySpec, companion: Any, *,
                         trials: list[Any] | None = None,
                         companion_trials: list[Any] | None = None) -> list[dict[str, Any]]:
    """Per verified trial: its own value, the new seeds' values, their mean and spread;
    best mean first. Only completed re-runs count. `companion`: `load_companion(study)`.

    `trials`, `companion_trials`: the trials of `study` and `companion` when the caller has
    read them already (`reads.read_trials`); each study is read once here otherwise.
    """
    from optuna.trial import TrialState

    from gemma_search.reads import read_trials

    if trials is None:
        trials = read_trials(study)
    by_number = {t.number: t for t in trials}
    runs: dict[int, list[Any]] = {}
    pending: dict[int, int] = {}
    for t in _reruns(study, companion, trials=trials, companion_trials=companion_trials):
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
    # Best mean first, unverified ones last; equal means go to the earlier trial, as in
    # `ranking`.
    sign = -1.0 if spec.direction == "maximize" else 1.0
    rows.sort(key=lambda r: (r["mean"] is None, 0.0 if r["mean"] is None else sign * r["mean"],
                             r["trial"]))
    return rows


def best_by_mean(study: Any, spec: StudySpec, companion: Any, *,
                 trials: list[Any] | None = None,
                 companion_trials: list[Any] | None = None) -> dict[str, Any] | None:
    """The verified trial with the best mean over its new seeds, or None if none is
    verified yet. `trials`, `companion_trials`: as in `verification_summary`."""
    rows = [r for r in verification_summary(study, spec, companion, trials=trials,
                                            companion_trials=companion_trials) if r["n"] > 0]
    return rows[0] if rows else None


def export_pick(study: Any, spec: StudySpec, companion: Any, *,
                trials: list[Any] | None = None,
                companion_trials: list[Any] | None = None) -> dict[str, Any] | None:
    """The trial `export` picks, and why; None while no search trial has completed.

    `by` is "mean" once re-runs have completed (the best mean over new seeds, with `mean`,
    `std`, `n`, `seeds`, `values`, `verify_trials` and `verify_study`), else "single" (the
    best single trial). `value` is the picked trial's own value; `best_single_trial` and
    `best_single_value` name the best single trial either way.

    `trials`, `companion_trials`: the trials of `study` and `companion` when the caller has
    read them already (`reads.read_trials`); each study is read once here otherwise.
    """
    from gemma_search.reads import read_trials

    if trials is None:
        trials = read_trials(study)
    ranked = ranked_trials(trials, spec)
    if not ranked:
        return None
    single = ranked[0]
    pick: dict[str, Any] = {"trial": single.number, "by": "single", "value": single.value,
                            "best_single_trial": single.number,
                            "best_single_value": single.value}
    if companion is not None and companion_trials is None:
        companion_trials = read_trials(companion)
    best = best_by_mean(study, spec, companion, trials=trials,
                        companion_trials=companion_trials)
    if best is not None:
        pick.update({"trial": best["trial"], "by": "mean", "value": best["original_value"],
                     "verify_study": None if companion is None else companion.study_name,
                     **{k: best[k] for k in ("mean", "std", "n", "seeds", "values",
                                             "verify_trials")}})
    return pick
