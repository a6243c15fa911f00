"""Workers pull trials from a study until its budget is spent; `launch` runs N of them.

A worker loads the base model and tokenizes the data once, then loops
`study.optimize(objective, n_trials=1)`: only `optimize` heartbeats (DESIGN decision 2), and
checking the study-wide budget between trials keeps `max_trials` a study budget, not a
per-worker one (optuna#2907). `gemma_search.launcher` starts and supervises several.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from typing import Any

from gemma_search.errors import GemmaSearchError, SpecError, first_line
from gemma_search.spec import StorageSpec, StudySpec
from gemma_search.storage import StudyLock, backoff, is_transient
from gemma_search.study import budget_used, gpu_hours_used, load_study, split_args

__all__ = ["load_resources", "run_worker"]

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
    every heartbeat interval (with the current trial, step and speed), closed on exit."""

    def __init__(self, url: str, study_name: str, storage: StorageSpec, device: Any) -> None:
        from gemma_search import db

        self.engine = db.make_engine(url, connect_patience=storage.reconnect_seconds)
        self._study_name = study_name
        self._interval = storage.heartbeat_interval
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
        self.worker_id = db.register_worker(self.engine, self._study_name,
                                            socket.gethostname(), os.getpid(), gpu_name,
                                            gpu_index)
        self._thread.start()
        return self

    def update(self, *, trial: int | None, step: int | None,
               tokens_per_second: float | None) -> None:
        self._state = {"current_trial": trial, "current_step": step,
                       "tokens_per_second": tokens_per_second}

    def _beat(self) -> None:
        from gemma_search import db

        while not self._done.wait(self._interval):
            try:
                db.worker_heartbeat(self.engine, self.worker_id, **self._state)
            except GemmaSearchError as exc:  # the database is away: try again next beat
                log.warning("worker heartbeat failed: %s", exc)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        from gemma_search import db

        self._done.set()
        self._thread.join(timeout=self._interval + 5)
        try:
            db.worker_exit(self.engine, self.worker_id, "exited" if exc is None else "failed")
        except GemmaSearchError as error:
            log.warning("could not mark worker %s %s: %s", self.worker_id,
                        "exited" if exc is None else "failed", error)
        self.engine.dispose()


class StopFlag:
    """SIGTERM / SIGINT: the first asks the running trial to checkpoint and hand itself back;
    a second exits at once."""

    def __init__(self) -> None:
        self.requested = False

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


class _HandedBackNote(logging.Filter):
    """Optuna logs a trial that raised as failed, with the traceback, then its value. A trial
    handed back on SIGTERM (`TrialPreempted`) did not fail: its two records become one line."""

    def __init__(self) -> None:
        super().__init__()
        self._drop_value_line = False

    def filter(self, record: logging.LogRecord) -> bool:
        from gemma_search.objective import TrialPreempted

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TrialPreempted):
            record.msg = f"{exc}; handed back, a worker resumes it from that checkpoint"
            record.args, record.exc_info, record.exc_text = (), None, None
            self._drop_value_line = True
            return True
        if self._drop_value_line and record.funcName == "_log_failed_trial":
            self._drop_value_line = False  # "Trial N failed with value None."
            return False
        return True


_HANDED_BACK_NOTE = _HandedBackNote()


def run_worker(name: str, url: str, *, index: int = 0, stop: StopFlag | None = None) -> int:
    """Run trials of study `name` until its budget is spent; return how many ran here."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The logger of `study.optimize`, which logs each failed trial with its traceback.
    optimize_log = logging.getLogger("optuna.study._optimize")
    if _HANDED_BACK_NOTE not in optimize_log.filters:
        optimize_log.addFilter(_HANDED_BACK_NOTE)
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
    import optuna

    from gemma_search.objective import Objective

    lock = StudyLock(url, spec.name, connect_patience=spec.storage.reconnect_seconds)
    objective = Objective(spec, base, data, status.engine, on_start=lock.release,
                          stop_requested=stop, status=status)
    requeue = optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=spec.storage.max_retries, inherit_intermediate_values=True)
    finished: list[Any] = []
    failures = attempt = 0
    outage_started = 0.0
    while not stop.requested:
        lock.acquire()
        try:
            action = _claim_trial(study, spec, status.engine)
            if action == "run":
                # catch=Exception: a broken trial is recorded as FAIL and the worker goes on.
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False,
                               callbacks=[lambda _study, trial: finished.append(trial)])
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
            # Our trial was declared stale while it ran (its heartbeats were late: a database
            # outage, or a machine so loaded the heartbeat thread starved) and was re-queued;
            # the retry resumes it from its checkpoint. Optuna reports this at `tell` as
            # UpdateFinishedTrialError or, since 5.0, as "Cannot tell a FAIL trial."
            if isinstance(exc, ValueError) and not str(exc).startswith("Cannot tell a"):
                raise
            log.warning("trial finished elsewhere meanwhile: %s", first_line(exc))
            continue
        except Exception as exc:
            # The database went away mid-operation (restart, failover). Connections already
            # wait for it (retry_connects); a statement cut off mid-flight lands here. Wait
            # and go on: a trial left RUNNING is re-queued (stale or orphaned) and resumes.
            outage_started = outage_started or time.monotonic()
            if not is_transient(exc) or (time.monotonic() - outage_started
                                         > spec.storage.reconnect_seconds):
                raise
            log.warning("storage unavailable (%s); retrying", first_line(exc))
            time.sleep(backoff(attempt))
            attempt += 1
            continue
        finally:
            lock.release()  # already released by the objective, unless it never started
        outage_started, attempt = 0.0, 0
        status.update(trial=None, step=None, tokens_per_second=None)
        if action == "done":
            break
        if action == "wait":
            # Trials still run elsewhere: one may go stale and be re-queued, so stay.
            time.sleep(min(spec.storage.heartbeat_interval, 10))
            continue
        last = finished[-1]
        preempted = last.user_attrs.get("stop_reason") == "preempted"
        cut_off = objective.last_error is not None and is_transient(objective.last_error)
        if preempted or (last.state == optuna.trial.TrialState.FAIL and cut_off):
            requeue(study, last)  # handed back: a worker resumes it from its checkpoint
            if preempted:
                break
            continue
        failures = failures + 1 if last.state == optuna.trial.TrialState.FAIL else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise GemmaSearchError(f"worker {index}: {failures} trials in a row failed; "
                                   "see the trials' fail_reason in `gemma-search status` and "
                                   "fix the spec or environment")
    return len(finished)


def _claim_trial(study: Any, spec: StudySpec, engine: Any = None) -> str:
    """Under the study lock: "run" with a WAITING trial ready to pop, "wait", or "done".

    `max_trials` and `max_gpu_hours` hold for the whole study (optuna#2907): a worker adds a
    trial only while the budget has room, and `optimize` then pops a waiting trial instead of
    creating one. The lock stays held until the objective starts, so that the pop is inside
    it too: otherwise two workers could count the same waiting trial and one of them would
    create a trial past the budget (seen on PostgreSQL with two workers: 7 trials for 6).
    """
    import optuna
    from optuna.trial import TrialState

    from gemma_search.verify import SEARCH_STUDY

    optuna.storages.fail_stale_trials(study)  # a dead worker's trial is re-queued first
    if engine is not None:
        _requeue_orphans(study, spec, engine)
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return "run"
    if SEARCH_STUDY in study.user_attrs:
        # A verify companion (`STUDY.verify`) runs exactly the re-runs enqueued in it.
        return "wait" if any(t.state == TrialState.RUNNING for t in trials) else "done"
    budget = spec.budget
    hours_left = budget.max_gpu_hours is None or gpu_hours_used(trials) < budget.max_gpu_hours
    if budget_used(trials) < budget.max_trials and hours_left:
        study.enqueue_trial({}, skip_if_exists=False)
        return "run"
    return "wait" if any(t.state == TrialState.RUNNING for t in trials) else "done"


def _requeue_orphans(study: Any, spec: StudySpec, engine: Any) -> None:
    """Fail and re-queue RUNNING trials that no live worker runs and that never heartbeat.

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
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return
    live = {w["current_trial"] for w in db.list_workers(engine, spec.name,
                                                         stale_after=store.grace_period)
            if w["alive"] and w["state"] == "running"}
    limit = store.grace_period + 2 * store.heartbeat_interval
    requeue = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=store.max_retries,
                                                       inherit_intermediate_values=True)
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
        requeue(study, study.get_trials(deepcopy=False)[t.number])
