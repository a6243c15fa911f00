"""`gemma-search launch`: one supervised worker per GPU or N CPU workers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from gemma_search import db, launcher
from gemma_search.errors import CONFIG_ERROR_EXIT, GemmaSearchError
from gemma_search.launcher import Slot, Supervisor, launch, parse_gpus, restart_delay
from tests.test_fleet import create, fleet_spec, start_worker, wait_for


def test_parse_gpus() -> None:
    assert parse_gpus("0,1,3") == ["0", "1", "3"]
    assert parse_gpus(" 2 ") == ["2"]
    assert parse_gpus("all", visible="4,5") == ["4", "5"]  # CUDA_VISIBLE_DEVICES is honoured
    assert parse_gpus("all", visible=None, count=lambda: 3) == ["0", "1", "2"]
    assert parse_gpus("GPU-8a1f,GPU-77b2") == ["GPU-8a1f", "GPU-77b2"]
    with pytest.raises(GemmaSearchError, match="--workers N"):
        parse_gpus("all", visible=None, count=lambda: 0)
    with pytest.raises(GemmaSearchError, match="'0,,1' is not `all`"):
        parse_gpus("0,,1")
    with pytest.raises(GemmaSearchError, match="names a GPU twice"):
        parse_gpus("1,1")


def test_restart_backoff_doubles_and_is_capped() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert restart_delay(20) == 60.0


def test_each_child_sees_only_its_gpu_and_no_url_on_its_command_line(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://gs:s3cret-pw@127.0.0.1:1/{tmp_path.name}"
    sup = Supervisor("any-study", url, [Slot(0, "3"), Slot(1, "5")], threads=1,
                     say=lambda _line: None)
    try:
        for slot in sup.slots:
            sup.start(slot)
        for slot, gpu in zip(sup.slots, ("3", "5"), strict=True):
            assert slot.proc is not None
            environ = Path(f"/proc/{slot.proc.pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{slot.proc.pid}/cmdline").read_bytes()
            assert f"CUDA_VISIBLE_DEVICES={gpu}".encode() in environ
            assert f"GEMMA_SEARCH_STORAGE={url}".encode() in environ
            assert b"s3cret-pw" not in cmdline
            assert cmdline.split(b"\0")[-4:-1] == [b"any-study", b"--index", str(slot.index)
                                                   .encode()]
    finally:
        for slot in sup.slots:
            if slot.proc is not None:
                slot.proc.kill()
                slot.proc.wait()


def test_both_gpus_and_workers_is_refused() -> None:
    from typer.testing import CliRunner

    from gemma_search.cli import app

    result = CliRunner().invoke(app, ["launch", "x", "--gpus", "0", "--workers", "2"])
    assert result.exit_code == 1
    assert "--gpus and --workers both given" in result.output


def fake_children(monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Children of `launch` run `script` (Python; `index` holds the worker index) instead of
    a worker: the supervisor itself, with its real processes and signals, is what runs."""
    popen = subprocess.Popen

    def start(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        index = int(args[-1])  # ... worker STUDY --index I
        return popen([sys.executable, "-c", f"index = {index}\n{script}"], **kwargs)

    monkeypatch.setattr(launcher.subprocess, "Popen", start)


def test_a_worker_that_keeps_crashing_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_children(monkeypatch, "raise SystemExit(1)")
    lines: list[str] = []
    code = launch("crashy", "sqlite://", workers=1, max_restarts=2, base_delay=0.05,
                  say=lines.append, poll_seconds=0.05)
    assert code == 1
    assert [line.split(";")[0] for line in lines if "crashed" in line] == [
        "worker 0: crashed (exit code 1)", "worker 0: crashed (exit code 1)",
        "worker 0: crashed 3 times in a row (last: exit code 1)"]
    assert "giving up on it" in lines[-1]
    assert sum("restarted" in line for line in lines) == 2


def test_one_crash_without_restarts_reads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_children(monkeypatch, "raise SystemExit(1)")
    lines: list[str] = []
    launch("crashy", "sqlite://", workers=1, max_restarts=0, say=lines.append,
           poll_seconds=0.05)
    assert not any("1 times" in line for line in lines)
    assert lines[0].startswith("worker 0: crashed once (last: exit code 1); giving up on it")


def test_a_configuration_error_is_not_restarted_and_stops_the_others(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Worker 0 stops on a configuration error; worker 1 runs a trial until SIGTERM, which it
    # answers as a worker does: it hands the trial back and exits 0.
    stopped, ready = tmp_path / "stopped", tmp_path / "ready"
    # Worker 0 fails only once worker 1 answers SIGTERM: on a loaded machine worker 1 can
    # otherwise be signalled before its handler is installed.
    fake_children(monkeypatch, f"""
import os, signal, sys, time
if index == 0:
    while not os.path.exists({str(ready)!r}):
        time.sleep(0.05)
    print("error: model.name_or_path '/gone' cannot be loaded", file=sys.stderr)
    raise SystemExit({CONFIG_ERROR_EXIT})
def handed_back(*_):
    open({str(stopped)!r}, "w").close()
    raise SystemExit(0)
signal.signal(signal.SIGTERM, handed_back)
open({str(ready)!r}, "w").close()
time.sleep(60)
""")
    lines: list[str] = []
    started = time.monotonic()
    code = launch("misconfigured", "sqlite://", workers=2, base_delay=0.05, say=lines.append,
                  poll_seconds=0.05)
    assert code == CONFIG_ERROR_EXIT
    assert time.monotonic() - started < 30  # not one restart, not a minute of sleep
    assert lines == ["worker 0: stopped on a configuration error (exit code 3; its error is "
                     "above), which a restart would meet again; not restarting it, and "
                     "stopping the other workers"]
    assert stopped.exists()  # worker 1 was asked to stop, as on Ctrl-C, and did


@pytest.mark.slow
def test_a_worker_whose_model_is_gone_stops_launch_without_a_restart(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    create(fleet_spec(tmp_path, "gone", model, demo_data, max_trials=2, max_tokens=800), url)
    shutil.rmtree(model)  # every worker now stops at load: nothing a restart can change
    started = time.monotonic()
    proc = _launch_process("gone", url, "--workers", "2")
    out, _ = proc.communicate(timeout=300)
    text = out.decode()
    assert proc.returncode == 1, text[-3000:]
    assert time.monotonic() - started < 120  # one model load, not five restarts with backoff
    # What the user reads: the worker's own error, why nothing restarts, and what to do.
    assert f"error: model.name_or_path '{model}' has no loadable tokenizer" in text
    assert "stopped on a configuration error (exit code 3" in text
    assert ("error: a worker of study 'gone' stopped on a configuration error (its one-line "
            "error is above); fix it, then run `gemma-search launch gone` again") in text
    assert "restarted" not in text and "crashed" not in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_sigterm_to_a_worker_prints_one_calm_line_and_no_traceback(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = create(fleet_spec(tmp_path, "calm", tiny_model, demo_data, max_trials=1,
                             max_tokens=40000), url)
    study = optuna.load_study(study_name=spec.name, storage=url)
    worker = start_worker("calm", url)
    try:
        wait_for(lambda: any(t.intermediate_values for t in study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING,))), 180, "a running trial")
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=90)
    finally:
        if worker.poll() is None:
            worker.kill()
    text = out.decode()
    assert worker.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "failed with" not in text
    assert "handed back, a worker resumes it from that checkpoint" in text
    running = study.get_trials(deepcopy=False)[0].number
    assert (f"worker 0: ran 1 trial; stopped by signal, trial {running} checkpointed and "
            "re-queued") in text


def _launch_process(name: str, url: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GEMMA_SEARCH_STORAGE": url}
    return subprocess.Popen([sys.executable, "-m", "gemma_search", "launch", name, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _running_workers(url: str, name: str) -> list[db.WorkerInfo]:
    engine = db.make_engine(url)
    try:
        return [w for w in db.list_workers(engine, name, stale_after=30)
                if w["state"] == "running"]
    finally:
        engine.dispose()


@pytest.mark.slow
def test_three_workers_reach_the_budget_and_a_killed_one_is_restarted(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path],
        postgres_url: str) -> None:
    name = f"launch-{tmp_path.name[-12:]}"
    spec = create(fleet_spec(tmp_path, name, tiny_model, demo_data, max_trials=6,
                             max_tokens=4000), postgres_url)
    proc = _launch_process(name, postgres_url, "--workers", "3")
    try:
        workers = wait_for(lambda: len(_running_workers(postgres_url, name)) == 3
                           and _running_workers(postgres_url, name), 120, "3 workers")
        victim = workers[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "crashed (signal 9); restarting" in text
    assert "restarted (pid" in text
    engine = db.make_engine(postgres_url)
    registered = db.list_workers(engine, name, stale_after=30)
    engine.dispose()
    assert len(registered) == 4  # three, and the one that replaced the killed one
    assert victim in {w["pid"] for w in registered}
    study = optuna.load_study(study_name=spec.name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    # The killed worker's trial was failed as stale and re-run: 6 trials count, 6 complete.
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_requeues_their_trials(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    name = "interrupted"
    spec = create(fleet_spec(tmp_path, name, tiny_model, demo_data, max_trials=4,
                             max_tokens=40000, grace_period=60), url)
    study = optuna.load_study(study_name=spec.name, storage=url)
    proc = _launch_process(name, url, "--workers", "2")
    try:
        wait_for(lambda: len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                 == 2 and all(t.intermediate_values for t in study.get_trials(
                     deepcopy=False, states=(TrialState.RUNNING,))), 180, "2 running trials")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.decode()
    assert proc.returncode == 1, text[-3000:]
    assert "interrupted: workers checkpointed and re-queued their trials" in text
    assert "crashed" not in text  # a stop is not a crash: nothing was restarted
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    preempted = [t for t in trials if t.state == TrialState.FAIL
                 and t.user_attrs.get("stop_reason") == "preempted"]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(preempted) == 2 and len(waiting) == 2
    assert sorted(n for t in waiting for n in t.system_attrs["retry_history"]) == sorted(
        t.number for t in preempted)
    assert not _running_workers(url, name)  # each worker marked itself exited
