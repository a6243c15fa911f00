"""Asynchronous successive halving that pauses trials at rungs and promotes them later.

With `pruner: {type: asha, pause: true}` no trial is killed for looking weak. A trial that
reaches a rung (evaluation min_resource x reduction_factor^k, before its last) stops there,
checkpointed, as *paused*; the worker then claims what runs next, under the study lock:

1. a trial waiting in the queue (a warm start, a retry of a crashed trial);
2. else the best paused trial of the highest rung with room: a trial is promotable from
   rung k when its value there is among the top floor(n_k / reduction_factor) of the n_k
   trials that reported at rung k so far (Li et al., "A System for Massively Parallel
   Hyperparameter Tuning", 2020);
3. else a new trial, while the budget has room.

A trial at a rung that would be the one claimed next goes on without stopping: the same
decision, without writing and reading back its checkpoint. A paused trial that a promotion
resumes continues from its checkpoint (the exact-resume path of retries), keeps its number,
its reported values and its LR schedule (the schedule always spans the trial's full length).

How a paused trial is stored, in Optuna's own terms, so that every tool reads it:
- state WAITING (Optuna's "not running"): heartbeats and stale-trial retries leave it
  alone, and optuna-dashboard lists it as waiting with its intermediate values;
- system attribute `paused`: a dict while it waits (the rung's evaluation, its value there,
  the best value so far, tokens trained, seconds trained), None once resumed;
- system attribute `segment` of a running trial: the token count it may reach before it must
  stop (its reservation of `budget.max_tokens`) and the seconds of its earlier segments.

Budget: `budget.max_tokens` counts tokens trained, each trial once at its cumulative count,
so a paused-then-resumed trial costs what it trained. A claim reserves the tokens to the
next rung (an estimate from the evaluation interval, with a margin) and the engine stops
the run at that reservation; the reservations and what was trained never exceed the
budget. Once it is spent, paused trials stay paused and rank by their best value so far.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from typing import Any

from gemma_search.spec import StudySpec

__all__ = ["PAUSED", "SEGMENT", "claim", "collect_checkpoints", "decide_at_rung", "is_paused",
           "is_rung", "next_rung", "pausing", "pick", "tokens_exhausted", "tokens_room",
           "tokens_spent", "trial_tokens"]

log = logging.getLogger("gemma_search.promotion")

PAUSED = "paused"
SEGMENT = "segment"
#: Reserved tokens per segment over the estimate: an evaluation interval in steps lands a
#: little off its token target, and a run that meets its reservation before the rung
#: pauses short of it (and is resumed first).
MARGIN = 1.25


def pausing(spec: StudySpec) -> bool:
    """Whether trials of this study pause at rungs instead of being pruned."""
    return spec.pruner.type == "asha" and spec.pruner.pause


def is_rung(spec: StudySpec, evaluation: int) -> bool:
    """Whether evaluation number `evaluation` (1-based) is a rung."""
    return evaluation == _rung_at_or_after(spec, evaluation)


def next_rung(spec: StudySpec, evaluation: int) -> int:
    """The first rung after evaluation `evaluation` (0: the first rung)."""
    return _rung_at_or_after(spec, evaluation + 1)


def _rung_at_or_after(spec: StudySpec, evaluation: int) -> int:
    rung = spec.pruner.min_resource
    while rung < evaluation:
        rung *= spec.pruner.reduction_factor
    return rung


def is_paused(trial: Any) -> bool:
    """Whether `trial` (frozen) is paused at a rung."""
    from optuna.trial import TrialState

    return trial.state == TrialState.WAITING and bool(trial.system_attrs.get(PAUSED))


def _counted(trials: Sequence[Any]) -> list[Any]:
    """The trials that hold results and spend budget (`study.budget_trials`)."""
    from gemma_search.study import budget_trials

    return budget_trials(list(trials))


def trial_tokens(trial: Any) -> int:
    """Tokens the trial trained (cumulative over its segments); a running one counts the
    whole of its reservation."""
    from optuna.trial import TrialState

    if trial.state == TrialState.RUNNING:
        segment = trial.system_attrs.get(SEGMENT) or {}
        if segment.get("cap") is not None:
            return int(segment["cap"])
        return int(segment.get("start_tokens", 0))
    paused = trial.system_attrs.get(PAUSED)
    if trial.state == TrialState.WAITING:
        if paused:
            return int(paused["tokens"])
        return 0  # queued: what a retry resumes from is counted by the trial it retries
    return int(trial.user_attrs.get("tokens_trained") or 0)


def tokens_spent(trials: Sequence[Any]) -> int:
    """Tokens of `budget.max_tokens` spent or reserved by the study's trials."""
    return sum(trial_tokens(t) for t in _counted(trials))


def tokens_room(trials: Sequence[Any], spec: StudySpec) -> float:
    """Tokens of `budget.max_tokens` left (inf without that budget)."""
    if spec.budget.max_tokens is None:
        return math.inf
    return max(0, spec.budget.max_tokens - tokens_spent(trials))


def pick(trials: Sequence[Any], spec: StudySpec, *,
         deciding: tuple[int, int] | None = None) -> int | None:
    """The number of the paused trial to resume next, or None.

    `deciding`: (number, evaluation) of a running trial that has just reported at a rung,
    counted as paused there. A trial that paused short of its rung for want of budget was
    promoted already: it goes first. Then, from the highest rung down, the best trial among
    the top floor(n / reduction_factor) of that rung's n results that waits there.
    """
    counted = _counted(trials)
    waiting = {t.number: t for t in counted if is_paused(t)
               and not t.system_attrs[PAUSED].get("checkpoint_removed")}
    short = sorted(n for n, t in waiting.items() if not t.system_attrs[PAUSED]["at_rung"])
    if short:
        return short[0]
    at: dict[int, int] = {n: int(t.system_attrs[PAUSED]["eval"]) for n, t in waiting.items()}
    if deciding is not None:
        at[deciding[0]] = deciding[1]
    sign = -1.0 if spec.direction == "maximize" else 1.0
    for rung in sorted(set(at.values()), reverse=True):
        results = sorted((sign * t.intermediate_values[rung], t.number) for t in counted
                         if rung in t.intermediate_values
                         and math.isfinite(t.intermediate_values[rung]))
        top = results[:len(results) // spec.pruner.reduction_factor]
        for _, number in top:
            if at.get(number) == rung:
                return number
    return None


def _tokens_per_eval(trials: Sequence[Any], spec: StudySpec) -> float | None:
    """Tokens between evaluations: the spec's interval, else what trials so far show."""
    if spec.budget.eval_every_tokens is not None:
        return float(spec.budget.eval_every_tokens)
    seen = [trial_tokens(t) / len(t.intermediate_values) for t in trials
            if is_paused(t) and t.intermediate_values]
    return max(seen) if seen else None


def _cap(trials: Sequence[Any], spec: StudySpec, number: int | None, start: int,
         evaluations: int) -> int | None:
    """The cumulative token count a run of trial `number` from `start` tokens may reach:
    what `evaluations` more evaluations take, with the margin, within what the other
    trials leave of the budget. None: the study has no token budget. `start` when what is
    left does not reach the next rung at the estimate (a run cut short of its rung adds no
    result)."""
    if spec.budget.max_tokens is None:
        return None
    others = sum(trial_tokens(t) for t in _counted(trials) if t.number != number)
    room = spec.budget.max_tokens - others - start
    if room <= 0:
        return start
    per_eval = _tokens_per_eval(trials, spec)
    if per_eval is None:
        return start + room
    need = per_eval * evaluations
    if spec.budget.max_tokens_per_trial is not None:  # the trial ends there, rung or not
        need = min(need, max(1.0, spec.budget.max_tokens_per_trial - start))
    if room < need:
        return start  # not enough left to reach the next rung: a run would tell nothing
    return start + int(min(room, math.ceil(MARGIN * need)))


def decide_at_rung(study: Any, spec: StudySpec, number: int, evaluation: int,
                   tokens: int) -> tuple[bool, int | None]:
    """Under the study lock, for running trial `number` that has just reported at rung
    `evaluation` with `tokens` trained: (go on?, its new token cap). It goes on when it is
    the trial the next claim would resume and the budget leaves it room."""
    from optuna.trial import TrialState

    from gemma_search.reads import read_trials

    trials = read_trials(study)
    if any(t.state == TrialState.WAITING and not is_paused(t) for t in trials):
        return False, None  # the queue goes first
    if pick(trials, spec, deciding=(number, evaluation)) != number:
        return False, None
    cap = _cap(trials, spec, number, tokens, next_rung(spec, evaluation) - evaluation)
    if cap is not None and cap <= tokens:
        return False, None  # the budget is spent: it waits here, paused
    me = next(t for t in trials if t.number == number)
    segment = dict(me.system_attrs.get(SEGMENT) or {})
    segment["cap"] = cap
    study._storage.set_trial_system_attr(me._trial_id, SEGMENT, segment)
    return True, cap


def claim(study: Any, spec: StudySpec, trials: list[Any], *, may_add: bool,
          checkpoint_tokens: Callable[[list[int]], int]) -> tuple[str, int | None]:
    """Under the study lock: ("run", the id of a trial set RUNNING for this worker), or
    ("wait" | "done", None).

    `trials`: the study's, read under the lock. `may_add`: whether the study may add a
    trial (max_trials, GPU-hours). `checkpoint_tokens(numbers)`: tokens of the latest
    checkpoint among those trials (0 when none): where a retry resumes from.
    """
    from optuna.trial import TrialState

    storage = study._storage
    room = tokens_room(trials, spec)
    running = any(t.state == TrialState.RUNNING for t in trials)

    def start(trial_id: int, segment: dict[str, Any]) -> tuple[str, int]:
        storage.set_trial_system_attr(trial_id, SEGMENT, segment)
        return "run", trial_id

    if room <= 0:
        return ("wait" if running else "done"), None
    # 1. the queue: warm starts and retries, oldest first
    for t in trials:
        if t.state != TrialState.WAITING or is_paused(t):
            continue
        begin = checkpoint_tokens(list(t.system_attrs.get("retry_history", [])))
        done = len(t.intermediate_values)
        cap = _cap(trials, spec, t.number, begin, next_rung(spec, done) - done)
        if cap is not None and cap <= begin:
            continue
        if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
            continue
        return start(t._trial_id, {"start_tokens": begin, "seconds_before": 0.0,
                                   "cap": cap})
    # 2. a promotion
    number = pick(trials, spec)
    if number is not None:
        t = next(t for t in trials if t.number == number)
        paused = t.system_attrs[PAUSED]
        evaluation, tokens = int(paused["eval"]), int(paused["tokens"])
        fits, cap = _resume_cap(trials, spec, t)
        if fits:
            storage.set_trial_system_attr(t._trial_id, PAUSED, None)
            storage.set_trial_user_attr(t._trial_id, PAUSED, None)
            # Who resumed it from where: a trial is resumed from each evaluation once.
            resumes = [*t.system_attrs.get("resumes", []),
                       {"eval": evaluation, "pid": os.getpid(), "host": socket.gethostname()}]
            storage.set_trial_system_attr(t._trial_id, "resumes", resumes)
            storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING)
            # Its heartbeat row is from before the pause: renew it before the lock is let
            # go, or the next claim would fail it as stale.
            storage.record_heartbeat(t._trial_id)
            log.info("trial %s promoted from evaluation %s", number, evaluation)
            return start(t._trial_id, {"start_tokens": tokens, "resume": True,
                                       "seconds_before": float(paused["seconds"]),
                                       "cap": cap})
    # 3. a new trial
    cap = _cap(trials, spec, None, 0, next_rung(spec, 0))
    if may_add and (cap is None or cap > 0):
        trial_id = storage.create_new_trial(study._study_id)
        return start(trial_id, {"start_tokens": 0, "seconds_before": 0.0, "cap": cap})
    return ("wait" if running else "done"), None


def collect_checkpoints(study: Any, spec: StudySpec, *, paused: bool = False) -> \
        tuple[list[int], int]:
    """Delete the checkpoint folders nothing will resume from; return (trial numbers, bytes).

    Kept: running trials, queued ones and the trials they retry (a retry resumes from its
    predecessor's checkpoint), and paused trials, unless `paused` or the study is finished
    (no trial running or queued: what workers leave when the budget is spent). A paused
    trial whose checkpoint went is marked `checkpoint_removed`: it still ranks by its best
    value, and no promotion picks it.
    """
    from optuna.trial import TrialState

    from gemma_search.objective import checkpoint_dir
    from gemma_search.reads import read_trials

    trials = read_trials(study)
    live = [t for t in trials if t.state == TrialState.RUNNING
            or (t.state == TrialState.WAITING and not is_paused(t))]
    keep = {t.number for t in live} | {n for t in live
                                       for n in t.system_attrs.get("retry_history", [])}
    drop_paused = paused or not live
    removed, freed = [], 0
    for t in trials:
        if t.number in keep or (is_paused(t) and not drop_paused):
            continue
        folder = checkpoint_dir(spec, t.number)
        if not folder.exists():
            continue
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(t.number)
        if is_paused(t):
            mark = {**t.system_attrs[PAUSED], "checkpoint_removed": True}
            study._storage.set_trial_system_attr(t._trial_id, PAUSED, mark)
    return removed, freed


def tokens_exhausted(trials: Sequence[Any], spec: StudySpec) -> bool:
    """Whether `budget.max_tokens` leaves room for neither a new trial nor the promotion the
    next claim would make: what is left then stays unspent, and the study is done."""
    if spec.budget.max_tokens is None:
        return False
    if _cap(trials, spec, None, 0, next_rung(spec, 0)) != 0:
        return False
    number = pick(trials, spec)
    return number is None or not _resume_cap(
        trials, spec, next(t for t in trials if t.number == number))[0]


def _resume_cap(trials: Sequence[Any], spec: StudySpec, trial: Any) -> tuple[bool, int | None]:
    """Whether paused `trial` can be resumed now (the budget leaves room for the step it
    stopped before, or its next rung), and the token cap of that run."""
    paused = trial.system_attrs[PAUSED]
    evaluation, tokens = int(paused["eval"]), int(paused["tokens"])
    target = next_rung(spec, evaluation)  # short of a rung: the one it was running to
    cap = _cap(trials, spec, trial.number, tokens, max(1, target - evaluation))
    return cap is None or cap >= tokens + max(1, int(paused.get("needs", 0))), cap
