"""Workers pull trials from a study until its budget is spent; `launch` runs N of them.

A worker loads the base model and tokenizes the data once, then, one trial at a time: claims
a trial under the study lock (`study.ask` pops it), runs the objective while a thread of its
own heartbeats the trial, and tells Optuna how it ended. Checking the study-wide budget
between trials keeps `max_trials` a study budget, not a per-worker one (optuna#2907).

The worker drives `ask` and `tell` itself rather than `study.optimize`, so that every storage
call of a trial waits out a database outage (`storage.retry_transient`, up to
`storage.reconnect_seconds`). Inside `optimize` (optuna 5.0) the heartbeat thread dies on
the first refused connection, and a `tell` that fails raises `UnboundLocalError` from
`_run_trial` and leaves the trial RUNNING. `gemma_search.launcher` starts and supervises
several workers.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from gemma_search import promotion
from gemma_search.errors import GemmaSearchError, SpecError, first_line
from gemma_search.promotion import pausing
from gemma_search.reads import live_study, read_trials
from gemma_search.spec import StorageSpec, StudySpec
from gemma_search.storage import (
    StudyLock,
    backoff,
    cause_line,
    is_transient,
    retry_transient,
)
from gemma_search.study import budget_used, gpu_hours_used, load_study, split_args

__all__ = ["PatientTrial", "TrialHeartbeat", "load_resources", "remove_checkpoints",
           "run_worker"]

log = logging.getLogger("gemma_search.worker")

#: A worker that fails this many trials in a row stops: something is wrong beyond one trial.
MAX_CONSECUTIVE_FAILURES = 3


def load_resources(spec: StudySpec) -> tuple[Any, Any]:
    """Load the base model (resident for the worker's life) and the tokenized data."""
    import torch
    import transformers

    from gemma_search.train.data import load_task_data
    from gemma_search.train.model import load_base_model

    # peft calls a transformers API deprecated in v5: one warning per trial, nothing to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task, data = spec.task, spec.data
    num_labels = len(task.labels) if task.type == "classification" and task.labels else 1
    base = load_base_model(name_or_path=spec.model.name_or_path, revision=spec.model.revision,
                           task=task.type, num_labels=num_labels, dtype=spec.model.dtype,
                           attn_implementation=spec.model.attn_implementation, device=device,
                           quantization=spec.model.quantization)
    # The spec's bound (data.max_seq_len <= 2**20) cannot know the model: check it here,
    # before tokenizing, rather than fail in the first forward pass of every trial.
    context = getattr(base.model.config, "max_position_embeddings", None)
    if isinstance(context, int) and data.max_seq_len > context:
        raise SpecError(f"data.max_seq_len is {data.max_seq_len} but model "
                        f"{spec.model.name_or_path} reads at most {context} tokens "
                        "(max_position_embeddings); lower data.max_seq_len")
    task_data = load_task_data(tokenizer=base.tokenizer, max_seq_len=data.max_seq_len,
                               labels=task.labels, packing=data.packing, **split_args(spec))
    return base, task_data


class WorkerRow:
    """This worker's row in `gs_workers`: registered on entry, heartbeated from a thread
    every heartbeat interval (with the current trial, step and speed), closed on exit.
    Each write waits out an outage like the trial's own (`storage.retry_transient`)."""

    def __init__(self, url: str, study_name: str, storage: StorageSpec, device: Any) -> None:
        from gemma_search import db

        self.engine = db.make_engine(url, connect_patience=storage.reconnect_seconds)
        self._study_name = study_name
        self._interval = storage.heartbeat_interval
        self._patience = float(storage.reconnect_seconds)
        self._device = device
        self._state: dict[str, Any] = {"current_trial": None, "current_step": None,
                                       "tokens_per_second": None}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="gs-worker-heartbeat",
                                        daemon=True)
        self.worker_id = 0

    def __enter__(self) -> WorkerRow:
        import socket

        from gemma_search import db

        gpu_name, gpu_index = None, None
        if self._device.type == "cuda":
            import torch

            gpu_name = torch.cuda.get_device_name(self._device)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0]
            gpu_index = int(visible) if visible.isdigit() else self._device.index or 0
        self.worker_id = retry_transient(
            lambda: db.register_worker(self.engine, self._study_name, socket.gethostname(),
                                       os.getpid(), gpu_name, gpu_index),
            patience=self._patience, what="register the worker")
        self._thread.start()
        return self

    def update(self, *, trial: int | None, step: int | None,
               tokens_per_second: float | None) -> None:
        self._state = {"current_trial": trial, "current_step": step,
                       "tokens_per_second": tokens_per_second}

    def _beat(self) -> None:
        from gemma_search import db

        _keep_beating(lambda: db.worker_heartbeat(self.engine, self.worker_id, **self._state),
                      self._interval, self._done, "worker heartbeat")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        from gemma_search import db

        self._done.set()
        self._thread.join(timeout=self._interval + 5)
        state = "exited" if exc is None else "failed"
        # A worker that fails may be failing on an outage it already waited out: one try.
        patience = self._patience if exc is None else 0.0
        try:
            retry_transient(lambda: db.worker_exit(self.engine, self.worker_id, state),
                            patience=patience, what=f"mark the worker {state}")
        except GemmaSearchError as error:
            log.warning("could not mark worker %s %s: %s", self.worker_id, state, error)
        self.engine.dispose()


def _keep_beating(beat: Callable[[], Any], interval: float, done: threading.Event,
                  what: str) -> None:
    """Call `beat` every `interval` s until `done` is set; never stop on an error.

    After a failure the next try comes after `backoff`, not a whole interval, so the first
    beat after an outage lands as soon as the server answers. One line when beats start
    failing and one when they come back, not one per beat.
    """
    failing_since: float | None = None
    attempt = 0
    while True:
        try:
            beat()
        except Exception as exc:
            if failing_since is None:
                failing_since = time.monotonic()
                log.warning("%s failed (%s); retrying", what, cause_line(exc))
            wait = min(float(interval), backoff(attempt))
            attempt += 1
        else:
            if failing_since is not None:
                log.warning("%s: recorded again after %.1f s", what,
                            time.monotonic() - failing_since)
            failing_since, attempt, wait = None, 0, float(interval)
        if done.wait(wait):
            return


class TrialHeartbeat:
    """The running trial's Optuna heartbeat, recorded from a thread every
    `storage.heartbeat_interval` s, as Optuna's own heartbeat thread does inside
    `study.optimize`, but one that an outage does not end (Optuna's dies on the first
    error it meets). The heartbeats are the same rows: `fail_stale_trials` and
    `RetryHeartbeatStaleTrialCallback` read them as ever."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=_keep_beating, name="gs-trial-heartbeat", daemon=True,
            args=(lambda: storage.record_heartbeat(trial_id), interval, self._done,
                  "trial heartbeat"))

    def __enter__(self) -> TrialHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._done.set()
        self._thread.join()


class PatientTrial:
    """An `optuna.Trial` whose every method waits out a database outage
    (`storage.retry_transient`); attributes pass through.

    The objective only calls methods that are safe to repeat after a failure that may have
    come after the commit: `suggest_*` (Optuna ignores a parameter stored twice, and an
    enqueued or relative parameter is the same value again), `set_user_attr` and `report`
    (one row per key and step, overwritten; `set_user_attrs` is those in one transaction),
    `should_prune` (a read).
    """

    def __init__(self, trial: Any, patience: float) -> None:
        self._trial = trial
        self._patience = patience

    def set_user_attrs(self, attrs: dict[str, Any]) -> None:
        """`set_user_attr` for every item, in one transaction (`storage.set_user_attrs`)."""
        from gemma_search.storage import set_user_attrs

        retry_transient(lambda: set_user_attrs(self._trial, attrs), patience=self._patience,
                        what=f"trial {self._trial.number}: set_user_attrs")

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._trial, name)
        if name.startswith("_") or not callable(value):
            return value

        def patient(*args: Any, **kwargs: Any) -> Any:
            return retry_transient(lambda: value(*args, **kwargs), patience=self._patience,
                                   what=f"trial {self._trial.number}: {name}")

        return patient


class StopFlag:
    """SIGTERM / SIGINT: the first asks the running trial to checkpoint and hand itself back;
    a second exits at once."""

    def __init__(self) -> None:
        self.requested = False
        self.handed_back: int | None = None
        """The trial this worker checkpointed and re-queued on the signal, if one ran."""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        log.warning("signal %s: checkpointing the running trial, then exiting", signum)

    def __call__(self) -> bool:
        return self.requested


def run_worker(name: str, url: str, *, index: int = 0, stop: StopFlag | None = None) -> int:
    """Run trials of study `name` until its budget is spent; return how many ran here."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # `study.ask` warns when the storage heartbeats outside `optimize`: this worker records
    # the heartbeats itself (`TrialHeartbeat`).
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used",
                            category=UserWarning)
    stop = stop or StopFlag()
    study, spec = load_study(name, url, heartbeat=True, worker_index=index)
    base, data = load_resources(spec)
    _baselines(study, spec, base, data)
    with WorkerRow(url, name, spec.storage, base.device) as status:
        return _trial_loop(study, spec, url, index, base, data, stop, status)


def _baselines(study: Any, spec: StudySpec, base: Any, data: Any) -> None:
    """Measure the study's baselines once (the first worker to start does), before its first
    trial. A verify companion shares its search study's, and a database hiccup only costs
    the figures: the next worker to start measures them."""
    from gemma_search.baselines import record_baselines
    from gemma_search.verify import search_study_of

    if search_study_of(study) is not None:
        return
    try:
        record_baselines(study, spec, base, data)
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("baselines not recorded (storage unavailable: %s)", first_line(exc))


def _trial_loop(study: Any, spec: StudySpec, url: str, index: int, base: Any, data: Any,
                stop: StopFlag, status: WorkerRow) -> int:
    from optuna.trial import TrialState

    from gemma_search.objective import Objective, TrialPreempted

    patience = float(spec.storage.reconnect_seconds)
    lock = StudyLock(url, spec.name, connect_patience=patience)
    at_rung = None
    if pausing(spec):
        def at_rung(trial: Any, evaluation: int, tokens: int) -> tuple[bool, int | None]:
            return retry_transient(
                functools.partial(_decide_at_rung, study, spec, lock, trial.number,
                                  evaluation, tokens),
                patience=patience, what=f"trial {trial.number}: rung decision")
    objective = Objective(spec, base, data, status.engine, stop_requested=stop, status=status,
                          at_rung=at_rung)
    ran = failures = 0
    while not stop.requested:
        action, trial = retry_transient(lambda: _claim(study, spec, lock, status.engine),
                                        patience=patience, what=f"worker {index}: claim a trial")
        if action == "done":
            break
        if action == "wait":
            # Trials still run elsewhere: one may go stale and be re-queued, so stay.
            time.sleep(min(spec.storage.heartbeat_interval, 10))
            continue
        ran += 1
        told, finished, error = _run_trial(study, trial, objective, spec.storage)
        status.update(trial=None, step=None, tokens_per_second=None)
        if pausing(spec) and finished.state in (TrialState.COMPLETE, TrialState.PRUNED):
            remove_checkpoints(spec, finished.number)  # nothing resumes a finished trial
        if finished.state != told:
            # Failed as stale while it ran (its heartbeats were late: an outage longer than
            # storage.grace_period, or a machine so loaded the heartbeat thread starved) and
            # re-queued by another worker; the retry resumes it from its checkpoint.
            log.warning("trial %s was failed as stale and re-queued meanwhile; its result "
                        "here is dropped, the retry resumes from its checkpoint",
                        finished.number)
            continue
        # Why this run stopped is this run's own: the exception it raised, never an
        # attribute a retry inherited from the trial it retries.
        preempted = isinstance(error, TrialPreempted)
        if preempted or (error is not None and is_transient(error)):
            # Handed back (SIGTERM), or cut off by an outage longer than the patience of its
            # storage calls: a worker resumes it from its checkpoint.
            retry_transient(functools.partial(_hand_back, study, spec, lock, finished.number),
                            patience=patience, what=f"re-queue trial {finished.number}")
            if preempted:
                stop.handed_back = finished.number
                break
            continue
        failures = failures + 1 if finished.state == TrialState.FAIL else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise GemmaSearchError(f"worker {index}: {failures} trials in a row failed; "
                                   "see the trials' fail_reason in `gemma-search status` and "
                                   "fix the spec or environment")
    return ran


def _claim(study: Any, spec: StudySpec, lock: StudyLock, engine: Any) -> tuple[str, Any]:
    """Under the study lock: ("run", the trial `ask` popped from the queue), or ("wait" |
    "done", None). The pop is inside the lock (see `_claim_trial`); an outage anywhere in
    it fails the whole claim, which the caller retries from the lock."""
    import optuna

    # Read the study before taking the lock: the first read of a process is the whole study
    # (1.6 s at 10,000 trials), and the reads under the lock then take only what changed.
    read_trials(study)
    lock.acquire()
    try:
        if pausing(spec):
            action, trial_id = _claim_paused(study, spec, engine)
        else:
            action, trial_id = _claim_trial(study, spec, engine), None
            if action == "run":  # what `study.ask` does, less the sampling
                study._thread_local.cached_all_trials = None
                trial_id = _pop_waiting(study)
                if trial_id is None:
                    trial_id = study._storage.create_new_trial(study._study_id)
    finally:
        lock.release()
    if action != "run" or trial_id is None:
        return action, None
    # The trial exists and is RUNNING: the budget counts it. Sampling its parameters (the
    # sampler reads the study's history) needs no lock, so other workers claim meanwhile.
    # The sampler and the pruner read the history incrementally (`live_study`).
    study._thread_local.cached_all_trials = None
    _show_to_optuna_cache(study, trial_id)
    return action, optuna.Trial(live_study(study), trial_id)


def _show_to_optuna_cache(study: Any, trial_id: int) -> None:
    """Add trial `trial_id` to the cache Optuna keeps in front of the storage.

    The cache checks each parameter a trial sets against what it knows of the trial, and
    fails on one it never read. Claims read through `read_trials`, so a trial that another
    process created (a warm start, a retry, a paused trial) has never been through it.
    """
    cache = study._storage
    add = getattr(cache, "_add_trials_to_cache", None)
    if add is None:  # not Optuna's cache: nothing to tell
        return
    from optuna.storages._cached_storage import _StudyInfo

    trial = cache._backend.get_trial(trial_id)
    with cache._lock:
        cache._studies.setdefault(study._study_id, _StudyInfo())
        add(study._study_id, [trial])


def _pop_waiting(study: Any) -> int | None:
    """`Study._pop_waiting_trial_id` on `read_trials`: the id of the oldest waiting trial,
    now set RUNNING for this worker, or None. Optuna's own reads the study through its cache,
    whose first read in a process is the whole study, under the lock."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    for trial in read_trials(study):
        if trial.state != TrialState.WAITING:
            continue
        try:  # False or an error: another process took it or finished it meanwhile
            if study._storage.set_trial_state_values(trial._trial_id,
                                                     state=TrialState.RUNNING):
                return trial._trial_id
        except UpdateFinishedTrialError:
            continue
    return None


def _claim_paused(study: Any, spec: StudySpec, engine: Any) -> tuple[str, int | None]:
    """`_claim` for a study whose trials pause at rungs: the queue, else a promotion, else a
    new trial (`promotion.claim`). `study.ask` is not used: it would pop paused trials in
    the order they paused, not by their results."""
    from gemma_search import db

    trials = _claimable(study, spec, engine)

    def checkpoint_tokens(numbers: list[int]) -> int:
        latest = None if not numbers or engine is None else db.latest_checkpoint(
            engine, spec.name, numbers)
        return 0 if latest is None else int(latest["tokens"])

    return promotion.claim(study, spec, trials, may_add=_has_room(trials, spec),
                           checkpoint_tokens=checkpoint_tokens)


def _decide_at_rung(study: Any, spec: StudySpec, lock: StudyLock, number: int,
                    evaluation: int, tokens: int) -> tuple[bool, int | None]:
    """Whether trial `number`, at rung `evaluation`, goes on: under the study lock, so that
    no claim resumes another trial on the same result meanwhile."""
    lock.acquire()
    try:
        return promotion.decide_at_rung(study, spec, number, evaluation, tokens)
    finally:
        lock.release()


def _pause(study: Any, trial: Any, paused: dict[str, Any]) -> Any:
    """Store a trial that stopped at a rung as paused: WAITING, with its `paused` record."""
    from optuna.trial import TrialState

    storage = study._storage
    storage.set_trial_system_attr(trial._trial_id, promotion.PAUSED, paused)
    # The same, in words, where optuna-dashboard shows it (it lists the trial as WAITING).
    where = "at a rung" if paused["at_rung"] else "at its share of budget.max_tokens"
    storage.set_trial_user_attr(trial._trial_id, promotion.PAUSED,
                                f"paused {where} after evaluation {paused['eval']}; best so "
                                f"far {paused['best_value']}")
    storage.set_trial_state_values(trial._trial_id, state=TrialState.WAITING)
    return storage.get_trial(trial._trial_id)


def remove_checkpoints(spec: StudySpec, number: int) -> None:
    """Delete trial `number`'s checkpoint folder (its database rows stay, as history)."""
    from gemma_search.objective import checkpoint_dir

    shutil.rmtree(checkpoint_dir(spec, number), ignore_errors=True)


def _run_trial(study: Any, trial: Any, objective: Callable[[Any], float],
               storage: StorageSpec) -> tuple[Any, Any, Exception | None]:
    """Run `objective` on `trial` while heartbeating it, then tell Optuna how it ended.

    Returns the state told, the trial as the storage has it after the tell, and the
    exception the objective raised (None when it returned or pruned). A tell that fails is
    told again once the server answers, for up to `storage.reconnect_seconds`: a worker that
    is alive never leaves its trial RUNNING.
    """
    import optuna
    from optuna.trial import TrialState

    from gemma_search.objective import TrialPaused, TrialPreempted

    patience = float(storage.reconnect_seconds)
    value: float | None = None
    error: Exception | None = None
    with TrialHeartbeat(study._storage, trial._trial_id, storage.heartbeat_interval):
        try:
            value = objective(PatientTrial(trial, patience))
            state = TrialState.FAIL if math.isnan(value) else TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except TrialPaused as paused:
            log.info("%s; checkpointed, a promotion resumes it", paused)
            return TrialState.WAITING, retry_transient(
                functools.partial(_pause, study, trial, paused.paused), patience=patience,
                what=f"trial {trial.number}: pause"), None
        except Exception as exc:
            state, error = TrialState.FAIL, exc

    def tell() -> Any:
        # skip_if_finished: a retried tell finds the first one's commit, or the trial failed
        # as stale by another worker; the caller tells those apart by the state.
        if state == TrialState.COMPLETE:
            return study.tell(trial, value, skip_if_finished=True)
        return study.tell(trial, state=state, skip_if_finished=True)

    finished = retry_transient(tell, patience=patience, what=f"trial {trial.number}: tell")
    if isinstance(error, TrialPreempted):
        log.warning("%s; handed back, a worker resumes it from that checkpoint", error)
    elif error is not None:
        # A bug keeps its traceback; an error the user can fix is one line.
        log.warning("trial %s failed: %s", trial.number, first_line(error),
                    exc_info=None if isinstance(error, GemmaSearchError) else error)
    elif state == TrialState.FAIL:
        log.warning("trial %s failed: its value is %s", trial.number, value)
    return state, finished, error


def _hand_back(study: Any, spec: StudySpec, lock: StudyLock, number: int) -> None:
    """Re-queue failed trial `number` for a worker to resume, unless that happened already.

    Under the study lock, where stale trials are failed and re-queued too
    (`_claim_trial`): a trial failed as stale by another worker while this one told it
    FAIL is re-queued once, not twice; and a retried re-queue whose first commit landed
    finds its trial there.
    """
    import optuna

    lock.acquire()
    try:
        trials = read_trials(study)
        if any(number in t.system_attrs.get("retry_history", ()) for t in trials
               if t.number != number):
            return
        requeue = optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=spec.storage.max_retries, inherit_intermediate_values=True)
        # A copy: the callback appends to the trial's own retry_history list.
        requeue(study, copy.deepcopy(next(t for t in trials if t.number == number)))
    finally:
        lock.release()


def _claim_trial(study: Any, spec: StudySpec, engine: Any = None) -> str:
    """Under the study lock: "run" with a WAITING trial ready to pop, "wait", or "done".

    `max_trials` and `max_gpu_hours` hold for the whole study (optuna#2907): a worker adds a
    trial only while the budget has room, and `study.ask` then pops a waiting trial instead
    of creating one. The lock stays held until that pop (`_claim`): otherwise two workers
    could count the same waiting trial and one of them would create a trial past the budget
    (seen on PostgreSQL with two workers: 7 trials for 6).
    """
    from optuna.trial import TrialState

    from gemma_search.verify import SEARCH_STUDY

    trials = _claimable(study, spec, engine)
    if any(t.state == TrialState.WAITING for t in trials):
        return "run"
    if SEARCH_STUDY in study.user_attrs:
        # A verify companion (`STUDY.verify`) runs exactly the re-runs enqueued in it.
        return "wait" if any(t.state == TrialState.RUNNING for t in trials) else "done"
    # Without pausing, `max_tokens` is a start rule like `max_gpu_hours`: a trial starts
    # while the tokens trained so far are below it, and runs to its end (each worker may
    # pass it by one trial). A pausing study reserves and stops exactly (`promotion`).
    max_tokens = spec.budget.max_tokens
    tokens_left = max_tokens is None or promotion.tokens_spent(trials) < max_tokens
    if _has_room(trials, spec) and tokens_left:
        study.enqueue_trial({}, skip_if_exists=False)
        return "run"
    return "wait" if any(t.state == TrialState.RUNNING for t in trials) else "done"


def _claimable(study: Any, spec: StudySpec, engine: Any) -> list[Any]:
    """Under the study lock, what a claim decides on: the trials of dead workers failed and
    re-queued first (stale heartbeats, then `_requeue_orphans`), then the study's trials,
    read once (`read_trials`: only what changed), and again only if an orphan was
    re-queued."""
    import optuna

    optuna.storages.fail_stale_trials(study)
    trials = read_trials(study)
    if engine is not None and _requeue_orphans(study, spec, engine, trials):
        trials = read_trials(study)
    return trials


def _has_room(trials: list[Any], spec: StudySpec) -> bool:
    """Whether `budget.max_trials` and `budget.max_gpu_hours` let the study add a trial."""
    budget = spec.budget
    hours_left = budget.max_gpu_hours is None or gpu_hours_used(trials) < budget.max_gpu_hours
    return budget_used(trials) < budget.max_trials and hours_left


def _requeue_orphans(study: Any, spec: StudySpec, engine: Any, trials: list[Any]) -> bool:
    """Fail and re-queue RUNNING trials (of `trials`, the study's) that no live worker runs
    and that never heartbeat; whether there was any.

    Optuna counts a trial as stale only from its last heartbeat. A trial set RUNNING whose
    worker lost the database before the first heartbeat (a restart at that moment) has
    none: it would stay RUNNING for ever, and every worker would wait on it. Our own
    workers table says who runs what; a trial nobody alive runs, older than the grace
    period plus two heartbeats, is an orphan.
    """
    from datetime import datetime

    import optuna
    from optuna.trial import TrialState

    from gemma_search import db

    store = spec.storage
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if not running:
        return False
    live = {w["current_trial"] for w in db.list_workers(engine, spec.name,
                                                         stale_after=store.grace_period)
            if w["alive"] and w["state"] == "running"}
    limit = store.grace_period + 2 * store.heartbeat_interval
    requeue = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=store.max_retries,
                                                       inherit_intermediate_values=True)
    requeued = False
    for t in running:
        start = t.datetime_start
        age = (datetime.now(start.tzinfo) - start).total_seconds() if start else 0.0
        if t.number in live or age < limit:
            continue
        log.warning("trial %s runs on no live worker; failing and re-queueing it", t.number)
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):
            continue  # finished meanwhile
        requeue(study, study._storage.get_trial(t._trial_id))  # that trial, not all
        requeued = True
    return requeued
