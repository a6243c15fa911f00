"""`gemma-search status`: the fleet view, budget left and the time-to-finish estimate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import update

from gemma_search import db
from gemma_search.spec import spec_from_text
from gemma_search.status import estimate_seconds_left
from gemma_search.study import create_study
from gemma_search.verify import enqueue_verification

from .conftest import demo_spec_text, finished_study
from .test_cli import run

T0 = datetime(2026, 11, 26, 12, 0, 0)
DISTRIBUTIONS = {"learning_rate": FloatDistribution(1e-4, 3e-2, log=True),
                 "optimizer": CategoricalDistribution(["adamw", "sgd"]),
                 "lora_r": CategoricalDistribution([4, 8])}


def trial(number: int, state: TrialState, start: datetime | None, seconds: float | None,
          value: float | None = None, lr: float = 1e-3) -> FrozenTrial:
    return FrozenTrial(
        number=number, state=state, value=value, datetime_start=start,
        datetime_complete=None if seconds is None or start is None
        else start + timedelta(seconds=seconds),
        params={"learning_rate": lr, "optimizer": "adamw", "lora_r": 4},
        distributions=DISTRIBUTIONS, user_attrs={}, system_attrs={},
        intermediate_values={1: value} if value is not None else {}, trial_id=number)


def test_time_to_finish_follows_the_pace_of_finished_trials(tmp_path: Path) -> None:
    spec = spec_from_text(demo_spec_text("eta", tmp_path, tmp_path / "t", tmp_path / "v",
                                         max_trials=10))
    # 4 finished trials of 60 s (a pruned one counts towards the pace), 1 running for 20 s
    trials = [trial(i, TrialState.COMPLETE if i % 2 else TrialState.PRUNED, T0, 60.0, 0.5)
              for i in range(4)]
    now = T0 + timedelta(seconds=300)
    trials.append(trial(4, TrialState.RUNNING, now - timedelta(seconds=20), None))
    # left: 5 not started x 60 s + the running one's 40 s = 340 s over 2 workers
    assert estimate_seconds_left(trials, spec, workers=2, now=now) == 170.0
    assert estimate_seconds_left(trials, spec, workers=1, now=now) == 340.0
    assert estimate_seconds_left(trials, spec, workers=0, now=now) is None
    assert estimate_seconds_left(trials[4:], spec, workers=2, now=now) is None  # no pace yet
    # A GPU-hour budget ends the study sooner: 4 x 60 s + 20 s used of 0.1 h = 100 s left
    capped = spec_from_text(demo_spec_text("eta", tmp_path, tmp_path / "t", tmp_path / "v",
                                           max_trials=10,
                                           extra="  max_gpu_hours: 0.1"))
    assert capped.budget.max_gpu_hours == 0.1
    assert estimate_seconds_left(trials, capped, workers=1, now=now) == 100.0


def fleet_study(tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> str:
    """A study with finished and running trials and two workers, one of them stale."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    spec = spec_from_text(demo_spec_text("fleet", tiny_model, *demo_data, max_trials=8))
    study = create_study(spec, url)
    start = datetime.now() - timedelta(minutes=30)
    for i, (state, value, lr) in enumerate([(TrialState.COMPLETE, 0.40, 2e-3),
                                            (TrialState.COMPLETE, 0.31, 5e-3),
                                            (TrialState.PRUNED, 0.69, 1e-4)]):
        study.add_trial(trial(i, state, start + timedelta(minutes=5 * i), 240.0,
                              value if state == TrialState.COMPLETE else None, lr))
    running = study.ask({"learning_rate": FloatDistribution(1e-4, 3e-2, log=True)})
    running.report(0.5, 1)
    engine = db.make_engine(url)
    live = db.register_worker(engine, "fleet", "gpu-node-1", 4242, "NVIDIA H200", 3)
    db.worker_heartbeat(engine, live, current_trial=running.number, current_step=40,
                        tokens_per_second=9876.5)
    dead = db.register_worker(engine, "fleet", "gpu-node-2", 777, "NVIDIA H200", 0)
    with db.session_scope(engine) as session:  # its last heartbeat was an hour ago
        session.execute(update(db.GsWorker).where(db.GsWorker.id == dead)
                        .values(last_seen=datetime.now(UTC) - timedelta(hours=1)))
    engine.dispose()
    return url


def test_status_json_shows_the_fleet_budget_and_estimate(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = fleet_study(tmp_path, tiny_model, demo_data)
    code, out = run("status", "fleet", "--storage", url, "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["trials"]["complete"] == 2 and summary["trials"]["pruned"] == 1
    assert summary["trials"]["running"] == 1
    assert summary["best"]["trial"] == 1 and summary["best"]["value"] == 0.31
    assert summary["best"]["params"]["learning_rate"] == 5e-3
    workers = {w["host"]: w for w in summary["workers"]}
    assert workers["gpu-node-1"]["alive"] is True
    assert workers["gpu-node-1"]["gpu_name"] == "NVIDIA H200"
    assert workers["gpu-node-1"]["gpu_index"] == 3
    assert workers["gpu-node-1"]["current_trial"] == 3
    assert workers["gpu-node-1"]["current_step"] == 40
    assert workers["gpu-node-1"]["tokens_per_second"] == 9876.5
    assert workers["gpu-node-2"]["alive"] is False
    assert summary["workers_alive"] == 1
    # 3 finished trials of 240 s; 4 not started + the running one: about 4 x 240 s + rest
    assert 4 * 240 <= summary["eta_seconds"] <= 5 * 240
    assert summary["gpu_hours_used"] >= 3 * 240 / 3600  # 3 finished trials of 240 s, + running
    # 2 complete trials: regions yes, importances not yet, and it says why
    advice = summary["recommendation"]
    assert advice["top_trials"][0] == 1 and advice["importances"] == {}
    assert "need at least 4" in advice["importance_note"]


def test_status_table_names_stale_workers(tmp_path: Path, tiny_model: Path,
                                          demo_data: tuple[Path, Path]) -> None:
    url = fleet_study(tmp_path, tiny_model, demo_data)
    code, out = run("status", "fleet", "--storage", url)
    assert code == 0, out
    assert "workers: 1 alive of 2" in out
    assert "stale" in out and "gpu-node-2" in out
    assert "3: NVIDIA H200" in out
    assert "time to finish: about" in out
    assert "best single: trial 1" in out
    assert "what matters" in out and "learning_rate: good trials lie in" in out


def test_status_watch_refreshes_until_ctrl_c(tmp_path: Path, tiny_model: Path,
                                             demo_data: tuple[Path, Path]) -> None:
    url = fleet_study(tmp_path, tiny_model, demo_data)
    env = {**os.environ, "GEMMA_SEARCH_STORAGE": url}
    proc = subprocess.Popen([sys.executable, "-m", "gemma_search", "status", "fleet",
                             "--watch", "--interval", "0.5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        study = optuna.load_study(study_name="fleet", storage=url)
        time.sleep(6)  # started and refreshed a few times
        study.tell(3, 0.2)  # the running trial finishes: the next refresh shows a new best
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "best single: trial 3" in text


def test_status_of_a_verify_companion_counts_its_reruns(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = finished_study(url, "s", tiny_model, demo_data, ((1e-3, 0.3), (4e-3, 0.2)))
    spec = spec_from_text(demo_spec_text("s", tiny_model, *demo_data, max_trials=4))
    companion, _ = enqueue_verification(study, spec, url, top=1, seeds=3)
    companion.tell(companion.ask(), 0.25)
    summary = json.loads(run("status", "s.verify", "--storage", url, "--json")[1])
    assert summary["verifies"] == "s"
    assert (summary["budget_used"], summary["max_trials"]) == (3, 3)
    assert summary["trials"]["complete"] == 1 and summary["trials"]["waiting"] == 2
    assert summary["best"] is None and summary["export_pick"] is None
    code, out = run("status", "s", "--storage", url)
    assert code == 0, out
    assert "best single: trial 1" in out
    assert "export picks: trial 1 by mean over 1 new seed(s) (0.25)" in out
    assert "verify: 2 re-run(s) pending in study 's.verify'" in out


def test_the_budget_line_names_the_hours_by_what_the_workers_ran_on(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    url = fleet_study(tmp_path, tiny_model, demo_data)  # H200 workers
    code, out = run("status", "fleet", "--storage", url)
    assert code == 0 and "GPU-hours used" in out, out
    code, out = run("status", "fleet", "--storage", url, "--json")
    assert json.loads(out)["device"] == "gpu"
    # The same kind of study run by CPU workers: no GPU-hours to speak of.
    cpu_url = f"sqlite:///{tmp_path / 'cpu.db'}"
    spec = spec_from_text(demo_spec_text("on-cpu", tiny_model, *demo_data, max_trials=4)
                          + "  max_gpu_hours: 1\n")
    study = create_study(spec, cpu_url)
    study.add_trial(trial(0, TrialState.COMPLETE, datetime.now() - timedelta(minutes=10),
                          360.0, 0.4))
    engine = db.make_engine(cpu_url)
    exited = db.register_worker(engine, "on-cpu", "laptop", 4242)  # no GPU: gpu_name None
    db.worker_exit(engine, exited, "exited")
    engine.dispose()
    code, out = run("status", "on-cpu", "--storage", cpu_url)
    assert code == 0, out
    assert "device-hours (CPU) used 0.1 of 1 (0.9 left)" in out
    assert "GPU-hours" not in out
    code, out = run("status", "on-cpu", "--storage", cpu_url, "--json")
    summary = json.loads(out)
    assert summary["device"] == "cpu"
    assert summary["gpu_hours_used"] == 0.1 and summary["gpu_hours_left"] == 0.9  # keys kept
