"""Workers pull trials from a study until its budget is spent; `launch` runs N of them.

A worker loads the base model and tokenizes the data once, then loops
`study.optimize(objective, n_trials=1)`: only `optimize` heartbeats (DESIGN decision 2), and
checking the study-wide budget between trials keeps `max_trials` a study budget, not a
per-worker one (optuna#2907).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from gemma_search.errors import GemmaSearchError
from gemma_search.spec import StudySpec
from gemma_search.storage import STORAGE_ENV, StudyLock
from gemma_search.study import budget_used, load_study, split_args

__all__ = ["launch", "load_resources", "run_worker"]

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
                           attn_implementation=spec.model.attn_implementation, device=device)
    task_data = load_task_data(tokenizer=base.tokenizer, max_seq_len=data.max_seq_len,
                               labels=task.labels, **split_args(spec))
    return base, task_data


def run_worker(name: str, url: str, *, index: int = 0) -> int:
    """Run trials of study `name` until its budget is spent; return how many ran here."""
    import optuna

    from gemma_search.objective import Objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, spec = load_study(name, url, heartbeat=True, worker_index=index)
    base, data = load_resources(spec)
    lock = StudyLock(url, name)
    objective = Objective(spec, base, data, on_start=lock.release)
    finished: list[Any] = []
    failures = 0
    while True:
        lock.acquire()
        try:
            if not _claim_trial(study, spec.budget.max_trials):
                return len(finished)
            # catch=Exception: one broken trial is recorded as FAIL and the worker goes on.
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False,
                           callbacks=[lambda _study, trial: finished.append(trial)])
        finally:
            lock.release()  # already released by the objective, unless it never started
        failed = finished[-1].state == optuna.trial.TrialState.FAIL
        failures = failures + 1 if failed else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise GemmaSearchError(f"worker {index}: {failures} trials in a row failed; see the "
                                   "trials' fail reasons in `gemma-search status` and fix the "
                                   "spec or environment")


def _claim_trial(study: Any, max_trials: int) -> bool:
    """Under the study lock: make sure a WAITING trial is there for this worker to pop.

    `max_trials` holds for the whole study (optuna#2907): a worker adds a trial only while the
    budget has room, and `optimize` then pops a waiting trial instead of creating one. The
    lock stays held until the objective starts, so that the pop is inside it too: otherwise
    two workers could count the same waiting trial and one of them would create a trial
    past the budget (seen on PostgreSQL with two workers: 7 trials for a budget of 6).
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if budget_used(trials) < max_trials:
        study.enqueue_trial({}, skip_if_exists=False)
        return True
    return any(t.state == TrialState.WAITING for t in trials)


def launch(name: str, url: str, *, workers: int, threads_per_worker: int | None = None,
           poll: Callable[[], None] | None = None, poll_seconds: float = 2.0) -> int:
    """Start `workers` worker processes on this machine, wait for them; return a code.

    The storage URL goes to the children in the environment, never on the command line, so
    that a password does not show in process listings.
    """
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    env = dict(os.environ)
    env[STORAGE_ENV] = url
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    procs = [subprocess.Popen([sys.executable, "-m", "gemma_search", "worker", name,
                               "--index", str(i)], env=env)
             for i in range(workers)]
    try:
        while any(p.poll() is None for p in procs):
            if poll is not None:
                poll()
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    if poll is not None:
        poll()
    codes = [p.returncode for p in procs]
    return max(codes) if codes else 0
