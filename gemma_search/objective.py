"""Where Optuna meets training: trial -> TrialConfig -> engine -> value and attributes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from gemma_search.errors import GemmaSearchError, SpecError, first_line
from gemma_search.promotion import SEGMENT, is_rung
from gemma_search.space import trial_config
from gemma_search.spec import StudySpec
from gemma_search.storage import retry_transient
from gemma_search.train.checkpoint import Checkpointing, CheckpointRefused, check_checkpoint
from gemma_search.train.data import TaskData
from gemma_search.train.engine import LEAK_TOLERANCE_BYTES, OutOfMemory, train_trial
from gemma_search.train.model import BaseModel
from gemma_search.verify import VERIFY_SEED

__all__ = ["Objective", "OptunaReporter", "RungDecision", "TrialPaused", "TrialPreempted",
           "WorkerStatus", "checkpoint_dir", "study_checkpoint_dir"]

log = logging.getLogger("gemma_search.objective")


class TrialPreempted(GemmaSearchError):
    """The worker was asked to stop; the trial checkpointed and is handed back for retry."""


class TrialPaused(Exception):
    """The trial stopped at a rung (or at its share of the token budget), checkpointed, to
    be resumed by a promotion (`gemma_search.promotion`). `paused`: what the worker stores
    in the trial's `paused` system attribute."""

    def __init__(self, number: int, paused: dict[str, Any]) -> None:
        super().__init__(f"trial {number} paused at evaluation {paused['eval']}")
        self.paused = paused


#: Called at a rung with (trial, evaluation number, tokens trained): whether the trial goes
#: on, and its new token cap. The worker decides under the study lock.
RungDecision = Callable[[Any, int, int], tuple[bool, "int | None"]]


class WorkerStatus(Protocol):
    """What the worker shows in `gs_workers`: the trial it runs, where it is, how fast."""

    def update(self, *, trial: int | None, step: int | None,
               tokens_per_second: float | None) -> None: ...


class OptunaReporter:
    """The engine's `Reporter`: reports to the Optuna trial, keeps every evaluation in
    `gs_eval_metrics`, and tells the worker's status where the trial is.

    `patience`: seconds each evaluation's record waits out a database outage
    (`storage.reconnect_seconds`). The trial's own calls wait in the trial the worker
    passes (`worker.PatientTrial`).
    """

    def __init__(self, trial: Any, engine: Any, study_name: str,
                 status: WorkerStatus | None = None, *, prunable: bool = True,
                 patience: float = 0.0, at_rung: Callable[[int, int], Any] | None = None,
                 token_cap: int | None = None) -> None:
        self._trial = trial
        self._at_rung = at_rung
        """With a pausing scheduler: called with (evaluation, tokens) after each one; None
        when it is no rung, else (go on?, the new token cap)."""
        self._cap = token_cap
        self._last: tuple[int, int] | None = None
        self._prunable = prunable
        self._patience = patience
        self._engine = engine
        self._study_name = study_name
        self._status = status
        self._started = time.monotonic()
        self._first_tokens: float | None = None

    def report(self, step: int, value: float, metrics: Mapping[str, float]) -> None:
        from gemma_search import db

        self._trial.report(value, step)
        tokens = int(metrics.get("tokens", 0))
        self._last = (step, tokens)
        number = self._trial.number
        # record_eval replaces a row of the same index: safe to repeat after a lost answer.
        retry_transient(lambda: db.record_eval(self._engine, self._study_name, number, step,
                                               int(metrics.get("step", 0)), tokens,
                                               dict(metrics)),
                        patience=self._patience, what=f"trial {number}: record evaluation")
        if self._status is not None:
            # A resumed trial starts with tokens already trained: count only this run's.
            if self._first_tokens is None:
                self._first_tokens = tokens - 1.0
            elapsed = max(time.monotonic() - self._started, 1e-9)
            self._status.update(trial=self._trial.number, step=int(metrics.get("step", 0)),
                                tokens_per_second=(tokens - self._first_tokens) / elapsed)

    def should_prune(self) -> bool:
        return self._prunable and bool(self._trial.should_prune())

    def should_pause(self) -> bool:
        if self._at_rung is None or self._last is None:
            return False
        decision = self._at_rung(*self._last)
        if decision is None:
            return False
        go_on, cap = decision
        if go_on:
            self._cap = cap
        return not go_on

    def token_cap(self) -> int | None:
        return self._cap


def checkpoint_dir(spec: StudySpec, trial_number: int) -> Path:
    """The folder of one trial's checkpoints: checkpoints.dir/NAME/trial-NNNNNN.

    Refused if it resolves (symlinks followed) outside checkpoints.dir/NAME: the spec's name
    rule keeps `..` and `/` out of NAME, and this keeps a symlink planted in the folder from
    sending the writes elsewhere.
    """
    root = study_checkpoint_dir(spec)
    path = root / f"trial-{trial_number:06d}"
    if not path.resolve().is_relative_to(root):
        raise SpecError(f"the checkpoints of trial {trial_number} would go to "
                        f"{path.resolve()}, outside {root}; remove the link at {path} or "
                        "change checkpoints.dir")
    return path


def study_checkpoint_dir(spec: StudySpec) -> Path:
    """checkpoints.dir/NAME, resolved: every checkpoint of the study lies inside it."""
    top = Path(spec.checkpoints.dir).resolve()
    root = (top / spec.name).resolve()
    if root.parent != top:
        raise SpecError(f"the checkpoint folder of study {spec.name!r} resolves to {root}, "
                        f"not a folder of checkpoints.dir {top}; remove the link or change "
                        "checkpoints.dir")
    return root


def _set_user_attrs(trial: Any, attrs: dict[str, Any]) -> None:
    """Every item of `attrs` as a user attribute of `trial`: in one transaction from the
    worker's `PatientTrial`, one by one from a plain `optuna.Trial`."""
    if hasattr(trial, "set_user_attrs"):
        trial.set_user_attrs(attrs)
        return
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


class Objective:
    """Called with each trial the worker asks for: trains it on the worker's resident model."""

    def __init__(self, spec: StudySpec, base: BaseModel, data: TaskData, engine: Any, *,
                 on_start: Callable[[], None] | None = None,
                 stop_requested: Callable[[], bool] | None = None,
                 status: WorkerStatus | None = None,
                 at_rung: RungDecision | None = None) -> None:
        self.spec = spec
        self.at_rung = at_rung
        """With `pruner.pause`: decides at each rung whether the trial goes on (the worker
        asks under the study lock, `promotion.decide_at_rung`)."""
        self.base = base
        self.data = data
        self.engine = engine
        """Engine of gemma-search's own tables (checkpoints, evaluations)."""
        self.status = status
        self.last_error: BaseException | None = None
        """The exception the last trial failed with, if any (the worker reads it)."""
        self.on_start = on_start
        """Called first in every trial: the worker releases its study lock there."""
        self.stop_requested = stop_requested
        """Polled by the engine: True once the worker got SIGTERM / SIGINT."""

    def __call__(self, trial: Any) -> float:
        if self.on_start is not None:
            self.on_start()
        self.last_error = None
        try:
            return self._run(trial)
        except Exception as exc:
            import optuna

            if not isinstance(exc, optuna.TrialPruned | TrialPaused):
                self.last_error = exc
                # Best effort: the database may be why we are here; the error is what matters.
                with contextlib.suppress(Exception):
                    trial.set_user_attr("fail_reason", first_line(exc)[:500])
            raise

    def _run(self, trial: Any) -> float:
        import optuna

        cfg = trial_config(trial, self.spec)
        verifying = VERIFY_SEED in trial.user_attrs
        if verifying:  # a re-run of a top trial on a new seed (`gemma-search verify`)
            cfg = dataclasses.replace(cfg, seed=int(trial.user_attrs[VERIFY_SEED]))
        # A retry inherits its predecessor's user attributes (Optuna copies them): why that
        # one stopped is history, not this run's outcome.
        inherited = trial.user_attrs.get("stop_reason") or trial.user_attrs.get("fail_reason")
        start: dict[str, Any] = {}
        if inherited is not None:
            start["predecessor_stop"] = inherited
            start |= {key: None for key in ("fail_reason", "stop_reason")
                      if key in trial.user_attrs}
        start |= {"host": socket.gethostname(), "gpus": 1,
                  "data_fingerprint": self.data.fingerprint}
        _set_user_attrs(trial, start)
        from gemma_search import db

        if self.status is not None:
            self.status.update(trial=trial.number, step=0, tokens_per_second=None)
        # A duplicate checkpoint row after a lost answer is harmless: the newest step wins.
        patience = float(self.spec.storage.reconnect_seconds)
        # This trial as stored (its retry history, its segment): that one row, not the study.
        frozen = trial.study._storage.get_trial(trial._trial_id)
        segment = frozen.system_attrs.get(SEGMENT) or {}
        resume_from = (self._own_checkpoint(trial) if segment.get("resume")
                       else self._predecessor_checkpoint(trial, frozen))
        checkpointing = Checkpointing(
            directory=checkpoint_dir(self.spec, trial.number),
            every_steps=self.spec.checkpoints.every_steps,
            keep_last=self.spec.checkpoints.keep_last,
            resume_from=resume_from,
            on_saved=lambda step, tokens, path: retry_transient(
                lambda: db.record_checkpoint(self.engine, self.spec.name, trial.number, step,
                                             tokens, str(path)),
                patience=patience, what=f"trial {trial.number}: record checkpoint"))
        # A verification run is never pruned: stopped early, it would measure nothing.
        rung = None
        if self.at_rung is not None and not verifying:
            def rung(evaluation: int, tokens: int) -> tuple[bool, int | None] | None:
                if not is_rung(self.spec, evaluation):
                    return None
                assert self.at_rung is not None
                return self.at_rung(trial, evaluation, tokens)
        reporter = OptunaReporter(trial, self.engine, self.spec.name, self.status,
                                  prunable=not verifying, patience=patience, at_rung=rung,
                                  token_cap=segment.get("cap"))
        try:
            result = train_trial(self.base, self.data, cfg, reporter,
                                 checkpointing=checkpointing,
                                 stop_requested=self.stop_requested)
        except OutOfMemory:
            trial.set_user_attr("stop_reason", "oom")
            raise
        finally:
            leftover = self.base.memory_above_baseline()
            if leftover > LEAK_TOLERANCE_BYTES:
                log.warning("trial %s left %.1f MiB above the post-load baseline", trial.number,
                            leftover / 2**20)
                trial.set_user_attr("memory_above_baseline_bytes", leftover)
        # Metrics of the best evaluation, and what the trial cost; over all its segments
        # when it paused and was resumed. One transaction for them all (`set_user_attrs`).
        seconds = float(segment.get("seconds_before", 0.0)) + result.wall_seconds
        results: dict[str, Any] = {
            **result.metrics,
            "tokens_trained": result.tokens_trained,
            "optimizer_steps": result.optimizer_steps,
            "wall_seconds": round(seconds, 3),
            "peak_memory_bytes": result.peak_memory_bytes,
            "stop_reason": result.stop_reason,
            "resumed_from_step": result.resumed_from_step,
            # Steps, warmup, evaluation points and precision as planned: `export` writes
            # them into training_args.json so that plain transformers repeats this very run.
            "schedule": result.schedule,
            # How it ran, for the dashboard's trial page (one dict: not a metric to rank on).
            "engine": {
                "attention": self.base.attn_implementation, "loss": result.loss_backend,
                "fused_kernels": self.base.fused_kernels, "quantized": self.base.quantized,
                "micro_batch_size": result.micro_batch_size,
                "activation_checkpointing": result.activation_checkpointing,
                "memory_plan": result.plan, "setup_seconds": round(result.setup_seconds, 3),
                "teardown_seconds": round(result.teardown_seconds, 3)}}
        if result.oom_events:
            results["oom_events"] = result.oom_events
        _set_user_attrs(trial, results)
        if result.stop_reason == "paused":
            last = result.history[-1] if result.history else None
            raise TrialPaused(trial.number, {
                "eval": 0 if last is None else int(last["eval"]),
                "at_rung": result.paused_at_rung, "tokens": result.tokens_trained,
                "needs": result.blocked_tokens,
                "seconds": round(seconds, 3), "best_value": result.value,
                "value": None if last is None else float(last[self.spec.objective.metric])})
        if result.stop_reason == "preempted":
            raise TrialPreempted(f"trial {trial.number} preempted at step "
                                 f"{result.optimizer_steps}; checkpoint {result.checkpoint}")
        if result.stop_reason in ("pruned", "diverged") or result.value is None:
            raise optuna.TrialPruned(result.stop_reason)
        return result.value

    def _own_checkpoint(self, trial: Any) -> Path:
        """The checkpoint a paused trial stopped at: its own latest, checked like a
        predecessor's. Without one it cannot go on where it stopped (its reported values
        would be repeated from step 0), so it fails with the reason."""
        from gemma_search import db

        latest = db.latest_checkpoint(self.engine, self.spec.name, [trial.number])
        if latest is None:
            raise GemmaSearchError(f"trial {trial.number} was paused but has no checkpoint "
                                   "recorded; it cannot be resumed")
        return check_checkpoint(Path(latest["path"]), study_checkpoint_dir(self.spec))

    def _predecessor_checkpoint(self, trial: Any, frozen: Any) -> Path | None:
        """The latest checkpoint of the trials this one retries (Optuna's retry_history),
        if it passes `check_checkpoint`: inside this study's checkpoint folder, and holding
        tensors and plain values only. A refused one is said in the log and in the trial's
        `resume_refused` attribute, and the trial starts from step 0."""
        from gemma_search import db

        history = frozen.system_attrs.get("retry_history", [])
        if not history:
            return None
        latest = db.latest_checkpoint(self.engine, self.spec.name, list(history))
        if latest is None:
            return None  # died before its first checkpoint: a fresh start is all there is
        # The path comes from the database, which anyone with its password can write.
        try:
            path = check_checkpoint(Path(latest["path"]), study_checkpoint_dir(self.spec))
        except CheckpointRefused as exc:
            why = (f"checkpoint of trial {latest['trial_number']} not resumed: "
                   f"{first_line(exc)}; starting from step 0")
            log.warning("trial %s: %s", trial.number, why)
            trial.set_user_attr("resume_refused", why[:500])
            return None
        trial.set_user_attr("resumed_from_trial", latest["trial_number"])
        return path
