"""Workers as real processes: study-wide budgets, preemption, kill -9, retry-as-resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from gemma_search.cli import app
from gemma_search.objective import checkpoint_dir
from gemma_search.spec import load_spec

pytestmark = pytest.mark.slow


def fleet_spec(tmp_path: Path, name: str, model: Path, data: tuple[Path, Path], *,
               max_trials: int, max_tokens: int, checkpoint_every: int | None = None,
               grace_period: int = 3) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
name: {name}
model: {{name_or_path: {model}, dtype: float32}}
task: {{type: classification, text_column: text, labels: [negative, positive]}}
data: {{train: {data[0]}, validation: {data[1]}, max_seq_len: 32}}
search:
  learning_rate: {{low: 1.0e-3, high: 1.0e-2, log: true}}
  micro_batch_size: 8
  gradient_accumulation_steps: 1
  epochs: 20
  lora_r: {{choices: [4, 8]}}
  lora_targets: attention
pruner: {{type: none}}
budget: {{max_trials: {max_trials}, max_tokens_per_trial: {max_tokens}, eval_every_tokens: 800}}
storage: {{heartbeat_interval: 1, grace_period: {grace_period}}}
checkpoints: {{dir: {tmp_path / 'ckpt'}, every_steps: {checkpoint_every or 'null'}}}
""")
    return path


def create(spec: Path, url: str) -> Any:
    result = CliRunner().invoke(app, ["create", str(spec), "--storage", url])
    assert result.exit_code == 0, result.output
    return load_spec(spec)


def start_worker(name: str, url: str, index: int = 0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GEMMA_SEARCH_STORAGE": url, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gemma_search", "worker", name, "--index",
                             str(index)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def running_with_checkpoint(study: Any, spec: Any, url: str) -> Any:
    """A running trial whose checkpoint is saved and recorded in `url`: a retry resumes only
    from a checkpoint the database knows (the folder is written just before its row)."""
    from gemma_search import db

    engine = db.make_engine(url)
    try:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if any(checkpoint_dir(spec, t.number).glob("step-*")) and \
                    db.latest_checkpoint(engine, spec.name, [t.number]) is not None:
                return t
        return None
    finally:
        engine.dispose()


def test_eight_workers_hold_the_study_budget(tmp_path: Path, tiny_model: Path,
                                            demo_data: tuple[Path, Path],
                                            postgres_url: str) -> None:
    name = f"budget-{tmp_path.name[-12:]}"
    # A grace period far above any heartbeat delay: this test is about the budget, and on a
    # loaded 2-core machine 8 workers' heartbeats can come seconds late.
    spec = create(fleet_spec(tmp_path, name, tiny_model, demo_data, max_trials=40,
                             max_tokens=1600, grace_period=60), postgres_url)
    workers = [start_worker(name, postgres_url, i) for i in range(8)]
    for w in workers:
        out, _ = w.communicate(timeout=600)
        assert w.returncode == 0, out.decode()[-2000:]
    study = optuna.load_study(study_name=spec.name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 40
    assert sorted(t.number for t in trials) == list(range(40))  # no duplicate numbers
    assert all(t.state == TrialState.COMPLETE for t in trials), [
        (t.number, t.state.name, t.user_attrs, t.system_attrs) for t in trials
        if t.state != TrialState.COMPLETE]
    assert all(t.intermediate_values for t in trials)  # every reported value stored


def test_sigterm_checkpoints_requeues_and_a_new_worker_resumes(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path],
        storage_url: str) -> None:
    name = f"term-{tmp_path.name[-12:]}"
    spec = create(fleet_spec(tmp_path, name, tiny_model, demo_data, max_trials=1,
                             max_tokens=16000), storage_url)
    study = optuna.load_study(study_name=spec.name, storage=storage_url)
    worker = start_worker(name, storage_url)
    victim = wait_for(lambda: running_with_checkpoint(study, spec, storage_url), 120,
                      "a checkpoint")
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=60)
    assert time.monotonic() - sent < 30, "worker took too long to exit"
    assert worker.returncode == 0, out.decode()[-2000:]
    assert b"re-queued" in out

    failed = study.get_trials(deepcopy=False)[victim.number]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["stop_reason"] == "preempted"
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == failed.params
    assert waiting[0].system_attrs["retry_history"] == [victim.number]

    resumer = start_worker(name, storage_url)
    out, _ = resumer.communicate(timeout=300)
    assert resumer.returncode == 0, out.decode()[-2000:]
    retried = study.get_trials(deepcopy=False)[waiting[0].number]
    assert retried.state == TrialState.COMPLETE
    assert retried.params == failed.params
    assert retried.user_attrs["resumed_from_step"] > 0
    # the retry's outcome is its own; the predecessor's is kept apart, as history
    assert retried.user_attrs["stop_reason"] == "completed"
    assert retried.user_attrs["predecessor_stop"] == "preempted"
    assert not retried.user_attrs.get("fail_reason")
    # reported values continue where they stopped: the inherited ones come first
    assert set(failed.intermediate_values) <= set(retried.intermediate_values)
    assert len(study.get_trials(deepcopy=False)) == 2  # the budget of 1 counted the retry once


def test_kill_9_mid_trial_is_failed_requeued_and_resumed_by_another_worker(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path],
        storage_url: str) -> None:
    name = f"kill-{tmp_path.name[-12:]}"
    spec = create(fleet_spec(tmp_path, name, tiny_model, demo_data, max_trials=2,
                             max_tokens=16000), storage_url)
    study = optuna.load_study(study_name=spec.name, storage=storage_url)
    doomed = start_worker(name, storage_url, 0)
    victim = wait_for(lambda: running_with_checkpoint(study, spec, storage_url), 120,
                      "a checkpoint")
    doomed.kill()
    doomed.wait()
    killed_at = time.monotonic()
    survivor = start_worker(name, storage_url, 1)

    def retry_started() -> Any:
        for t in study.get_trials(deepcopy=False):
            if victim.number in t.system_attrs.get("retry_history", []):
                return t
        return None

    retry = wait_for(retry_started, 120, "the dead worker's trial to be re-queued")
    stale = study.get_trials(deepcopy=False)[victim.number]
    assert stale.state == TrialState.FAIL
    assert time.monotonic() - killed_at < 60
    out, _ = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, out.decode()[-2000:]
    retry = study.get_trials(deepcopy=False)[retry.number]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == victim.params
    assert retry.user_attrs["resumed_from_step"] > 0
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(done) == 2  # the budget of 2 trials holds with the retry counted once
