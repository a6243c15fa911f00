"""Trials that pause at rungs and are promoted later (`pruner: {type: asha, pause: true}`):
the rung rule, exact resume, the token budget, two workers, the ranking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from gemma_search.promotion import PAUSED, is_paused, pick, tokens_spent
from gemma_search.spec import spec_from_text
from tests.conftest import demo_spec_text


def pausing_spec_text(name: str, model: Path, data: tuple[Path, Path], ckpt: Path, *,
                      max_trials: int = 6, max_tokens: int | None = None,
                      reduction_factor: int = 2) -> str:
    text = demo_spec_text(name, model, *data, max_trials=max_trials,
                          extra=f"checkpoints: {{dir: {ckpt}}}\n")
    text = text.replace("pruner: {type: hyperband, min_resource: 1, reduction_factor: 3}",
                        "pruner: {type: asha, pause: true, min_resource: 1, "
                        f"reduction_factor: {reduction_factor}}}")
    text = text.replace("max_tokens_per_trial: 8000\n  eval_every_tokens: 1000",
                        "max_tokens_per_trial: 4000\n  eval_every_tokens: 800"
                        + ("" if max_tokens is None else f"\n  max_tokens: {max_tokens}"))
    return text


def frozen(number: int, state: TrialState, values: dict[int, float], *,
           paused_at: int | None = None, at_rung: bool = True) -> FrozenTrial:
    system: dict[str, Any] = {}
    if paused_at is not None:
        system[PAUSED] = {"eval": paused_at, "at_rung": at_rung, "tokens": 800 * paused_at,
                          "seconds": 1.0, "best_value": min(values.values()),
                          "value": values[paused_at]}
    return FrozenTrial(number=number, trial_id=number, state=state,
                       value=min(values.values()) if state == TrialState.COMPLETE else None,
                       values=None, datetime_start=None, datetime_complete=None, params={},
                       distributions={}, user_attrs={"tokens_trained": 800 * len(values)},
                       system_attrs=system, intermediate_values=values)


@pytest.fixture
def spec(tmp_path: Path) -> Any:
    return spec_from_text(pausing_spec_text("rungs", tmp_path, (tmp_path / "t.csv",
                                                                tmp_path / "v.csv"),
                                            tmp_path / "ckpt", reduction_factor=3))


def test_a_paused_trial_is_promoted_once_a_third_of_its_rung_is_worse(spec: Any) -> None:
    # Rungs at evaluations 1, 3, 9 (min_resource 1, reduction_factor 3); a lower loss is better.
    first = frozen(0, TrialState.WAITING, {1: 0.50}, paused_at=1)
    second = frozen(1, TrialState.WAITING, {1: 0.60}, paused_at=1)
    assert pick([first, second], spec) is None  # 2 results: the top floor(2/3) is nobody
    third = frozen(2, TrialState.WAITING, {1: 0.70}, paused_at=1)
    assert pick([first, second, third], spec) == 0
    # The first trial of a rung is judged by the results that come after it, not killed:
    # a late bloomer that paused first at a bad value is promoted once enough are worse.
    late = frozen(0, TrialState.WAITING, {1: 0.65}, paused_at=1)
    worse = [frozen(n, TrialState.PRUNED, {1: 0.9}) for n in range(3, 6)]
    assert pick([late, second, third, *worse], spec) == 1  # 0.60 is the best of the six
    done = frozen(1, TrialState.COMPLETE, {1: 0.60, 2: 0.5, 3: 0.4})
    assert pick([late, done, third, *worse], spec) == 0  # now 0.65 is in the top 2 of 6


def test_the_highest_rung_with_room_goes_first_and_short_pauses_before_all(spec: Any) -> None:
    low = [frozen(n, TrialState.WAITING, {1: 0.1 * (n + 1)}, paused_at=1) for n in range(6)]
    high = [frozen(6, TrialState.WAITING, {1: 0.2, 2: 0.2, 3: 0.30}, paused_at=3),
            frozen(7, TrialState.COMPLETE, {1: 0.3, 2: 0.3, 3: 0.35, 4: 0.3}),
            frozen(8, TrialState.COMPLETE, {1: 0.3, 2: 0.3, 3: 0.40, 4: 0.3})]
    assert pick([*low, *high], spec) == 6
    short = frozen(9, TrialState.WAITING, {1: 0.9}, paused_at=1, at_rung=False)
    assert pick([*low, *high, short], spec) == 9
    # A running trial deciding at a rung is counted as waiting there.
    running = frozen(10, TrialState.RUNNING, {1: 0.05})
    assert pick([*low, running], spec, deciding=(10, 1)) == 10


def test_tokens_count_each_trial_once_at_its_cumulative_count(spec: Any) -> None:
    paused = frozen(0, TrialState.WAITING, {1: 0.5}, paused_at=1)
    complete = frozen(1, TrialState.COMPLETE, {1: 0.5, 2: 0.4})
    crashed = frozen(2, TrialState.FAIL, {1: 0.5})
    retry = frozen(3, TrialState.RUNNING, {1: 0.5})
    retry.system_attrs = {"retry_history": [2], "segment": {"start_tokens": 800, "cap": 2400}}
    assert is_paused(paused) and not is_paused(complete)
    # 800 paused + 1600 complete + the retry's reservation (2400); the crashed trial's
    # tokens are carried by its retry.
    assert tokens_spent([paused, complete, crashed, retry]) == 800 + 1600 + 2400


def test_a_complete_trial_ranks_before_a_paused_one_with_the_same_value(spec: Any) -> None:
    from gemma_search.ranking import ranked_trials

    paused = frozen(0, TrialState.WAITING, {1: 0.4}, paused_at=1)
    complete = frozen(1, TrialState.COMPLETE, {1: 0.5, 2: 0.4})
    better = frozen(2, TrialState.WAITING, {1: 0.3}, paused_at=1)
    queued = frozen(3, TrialState.WAITING, {})
    ranked = ranked_trials([paused, complete, better, queued], spec)
    assert [(t.number, t.value) for t in ranked] == [(2, 0.3), (1, 0.4), (0, 0.4)]
    assert is_paused(ranked[0]) and not is_paused(ranked[1])


def test_without_pausing_max_tokens_stops_new_trials_once_spent(tmp_path: Path) -> None:
    """budget.max_tokens is a budget in every study, not only a pausing one: a worker starts
    no trial once the study's trials have trained that many tokens."""
    from gemma_search.study import create_study, load_study
    from gemma_search.worker import _claim_trial

    url = f"sqlite:///{tmp_path / 'tokens.db'}"
    text = pausing_spec_text("tokens", tmp_path, (tmp_path / "t.csv", tmp_path / "v.csv"),
                             tmp_path / "ckpt", max_tokens=5000).replace(
        "type: asha, pause: true", "type: median")
    create_study(spec_from_text(text), url)
    study, spec = load_study("tokens", url)
    assert not spec.pruner.pause and spec.budget.max_tokens == 5000
    for tokens in (2000, 2500):
        assert _claim_trial(study, spec) == "run"  # 0, then 2000 of 5000 spent
        trial = study.ask()
        trial.set_user_attr("tokens_trained", tokens)
        study.tell(trial, 0.5)
    assert _claim_trial(study, spec) == "run"  # 4500: below the budget, one more starts
    trial = study.ask()
    trial.set_user_attr("tokens_trained", 3000)
    study.tell(trial, 0.4)
    assert _claim_trial(study, spec) == "done"  # 7500: spent, with room for 3 more trials
    assert len(study.get_trials(deepcopy=False)) == 3 < spec.budget.max_trials


def test_pause_needs_asha(tmp_path: Path) -> None:
    from gemma_search.errors import SpecError

    text = pausing_spec_text("bad", tmp_path, (tmp_path / "t", tmp_path / "v"),
                             tmp_path / "c").replace("type: asha", "type: median")
    with pytest.raises(SpecError, match="pruner.pause is true but pruner.type is 'median'"):
        spec_from_text(text)


# --- training, on the tiny Gemma 2 -----------------------------------------------------------


def test_a_study_that_pauses_resumes_exactly_and_holds_its_token_budget(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path],
        storage_url: str) -> None:
    """One worker in-process: trials pause at rungs, the best are resumed from their
    checkpoints and finish; a resumed trial's evaluations equal an uninterrupted run's; the
    study trains exactly what `budget.max_tokens` allows at most, each trial counted once."""
    from gemma_search import db
    from gemma_search.space import trial_config
    from gemma_search.study import create_study, load_study
    from gemma_search.train.engine import train_trial
    from gemma_search.train.reporter import NullReporter
    from gemma_search.worker import load_resources, run_worker

    name = f"pause-{tmp_path.name[-10:]}"
    budget = 12_000
    spec = spec_from_text(pausing_spec_text(name, tiny_model, demo_data, tmp_path / "ckpt",
                                            max_trials=8, max_tokens=budget))
    create_study(spec, storage_url)
    run_worker(name, storage_url)
    study, _ = load_study(name, storage_url)
    trials = study.get_trials(deepcopy=False)
    spent = tokens_spent(trials)
    assert spent <= budget
    recorded = sum(t.system_attrs[PAUSED]["tokens"] if is_paused(t)
                   else t.user_attrs["tokens_trained"] for t in trials)
    assert spent == recorded
    assert budget - spent < 4000  # the budget was used, short of a trial's worth at most
    assert not any(t.state == TrialState.RUNNING for t in trials)
    resumed = [t for t in trials if t.system_attrs.get("resumes")]
    assert resumed, [(t.number, t.state.name, t.system_attrs) for t in trials]
    assert any(is_paused(t) for t in trials)  # the rest wait, resumable
    for t in trials:
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
        froms = [r["eval"] for r in t.system_attrs.get("resumes", [])]
        assert len(froms) == len(set(froms))  # resumed from each evaluation once
    # Resumed runs repeat an uninterrupted run of the same config, evaluation for evaluation.
    engine = db.make_engine(storage_url)
    base, data = load_resources(spec)
    target = resumed[0]
    cfg = trial_config(optuna.trial.FixedTrial(target.params), spec)
    straight = train_trial(base, data, cfg, NullReporter())
    n = len(target.intermediate_values)
    assert [r["val_loss"] for r in straight.history][:n] == pytest.approx(
        [target.intermediate_values[i] for i in sorted(target.intermediate_values)], rel=1e-5)
    assert target.user_attrs["tokens_trained"] == straight.history[n - 1]["tokens"]
    # Finished trials' checkpoints are gone; paused ones keep theirs.
    from gemma_search.objective import checkpoint_dir

    for t in trials:
        folder = checkpoint_dir(spec, t.number)
        has = folder.exists() and any(folder.glob("step-*"))
        assert has == is_paused(t), (t.number, t.state.name)
    assert db.latest_checkpoint(engine, name, [target.number]) is not None
    # status counts paused trials apart and shows the token budget.
    from gemma_search.status import study_status

    summary = study_status(study, spec)
    assert summary["trials"]["paused"] == sum(is_paused(t) for t in trials) > 0
    assert summary["trials"]["waiting"] == 0
    assert (summary["tokens_used"], summary["max_tokens"]) == (spent, budget)
    # The worker stopped because nothing more fits: status says the budget is spent.
    assert summary["tokens_exhausted"] or len(trials) == spec.budget.max_trials


# --- a fleet: two workers, and a worker killed mid-resume ---------------------------------


def fleet_pausing_spec(tmp_path: Path, name: str, model: Path, data: tuple[Path, Path], *,
                       max_tokens: int, max_trials: int = 12) -> Path:
    """Short heartbeats, so that a killed worker's trial goes stale in seconds."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(pausing_spec_text(name, model, data, tmp_path / "ckpt",
                                      max_trials=max_trials, max_tokens=max_tokens)
                    + "storage: {heartbeat_interval: 1, grace_period: 4}\n")
    return path


def check_nothing_lost(trials: list[Any], budget: int) -> None:
    """Every trial ended complete or paused (resumable: its checkpoint is there), or crashed
    and carried on by a retry; the token budget held; no evaluation was run twice."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for t in trials:
        assert t.state in (TrialState.COMPLETE, TrialState.WAITING) or (
            t.state == TrialState.FAIL and t.number in retried), (t.number, t.state.name)
        assert t.state != TrialState.WAITING or is_paused(t)
        froms = [r["eval"] for r in t.system_attrs.get("resumes", [])]
        assert len(froms) == len(set(froms)), (t.number, froms)  # never resumed twice
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
    assert tokens_spent(trials) <= budget


def test_two_workers_never_resume_the_same_trial(tmp_path: Path, tiny_model: Path,
                                                 demo_data: tuple[Path, Path],
                                                 postgres_url: str) -> None:
    from tests.test_fleet import create, start_worker

    name = f"pause2-{tmp_path.name[-10:]}"
    budget = 16_000
    create(fleet_pausing_spec(tmp_path, name, tiny_model, demo_data, max_tokens=budget),
           postgres_url)
    workers = [start_worker(name, postgres_url, i) for i in range(2)]
    logs = []
    for w in workers:
        out, _ = w.communicate(timeout=900)
        logs.append(out.decode())
        assert w.returncode == 0, logs[-1][-2000:]
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    check_nothing_lost(trials, budget)
    assert all(t.state != TrialState.FAIL for t in trials)
    assert any(t.system_attrs.get("resumes") for t in trials)
    import re

    ran = [int(re.search(r"ran (\d+) trial", log).group(1)) for log in logs]  # type: ignore[union-attr]
    assert all(n >= 1 for n in ran), ran  # both workers ran trials


def test_kill_9_mid_resume_loses_nothing(tmp_path: Path, tiny_model: Path,
                                          demo_data: tuple[Path, Path],
                                          postgres_url: str) -> None:
    """A worker killed while it runs a resumed trial: the trial goes stale, a retry resumes
    it from the checkpoint it paused at (or a later one), and the study finishes in budget."""
    import time

    from tests.test_fleet import create, start_worker, wait_for

    name = f"pausek-{tmp_path.name[-10:]}"
    budget = 20_000
    spec = create(fleet_pausing_spec(tmp_path, name, tiny_model, demo_data,
                                     max_tokens=budget), postgres_url)
    study = optuna.load_study(study_name=name, storage=postgres_url)
    doomed = start_worker(name, postgres_url, 0)

    def resumed_and_running() -> Any:
        return next((t for t in study.get_trials(deepcopy=False)
                     if t.state == TrialState.RUNNING
                     and (t.system_attrs.get("segment") or {}).get("resume")), None)

    victim = wait_for(resumed_and_running, 600, "a trial resumed from its pause")
    time.sleep(0.5)  # into its run
    doomed.kill()
    doomed.wait()
    survivor = start_worker(name, postgres_url, 1)
    out, _ = survivor.communicate(timeout=900)
    assert survivor.returncode == 0, out.decode()[-2000:]
    trials = study.get_trials(deepcopy=False)
    check_nothing_lost(trials, budget)
    stale = trials[victim.number]
    if stale.state == TrialState.FAIL:  # killed before it paused again or finished
        retry = next(t for t in trials if victim.number in t.system_attrs.get(
            "retry_history", []))
        assert retry.params == victim.params
        assert retry.user_attrs.get("resumed_from_trial") == victim.number
        for step, value in victim.intermediate_values.items():
            assert retry.intermediate_values[step] == value
    assert spec.name == name


def test_export_picks_a_complete_trial_over_a_paused_one_with_the_same_value(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    import json

    from gemma_search.export import export_study
    from gemma_search.study import create_study

    url = f"sqlite:///{tmp_path / 'x.db'}"
    spec = spec_from_text(pausing_spec_text("pick", tiny_model, demo_data, tmp_path / "c"))
    study = create_study(spec, url)

    def add(value: float, *, pause: bool) -> int:
        # Not study.ask(): it would pop the paused trial, as plain Optuna does.
        trial = optuna.Trial(study, study._storage.create_new_trial(study._study_id))
        trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True)
        trial.suggest_categorical("optimizer", ["adamw", "sgd"])
        trial.suggest_categorical("lora_r", [4, 8])
        trial.report(value, 1)
        if not pause:
            study.tell(trial, value)
            return trial.number
        study._storage.set_trial_system_attr(trial._trial_id, PAUSED, {
            "eval": 1, "at_rung": True, "tokens": 800, "needs": 0, "seconds": 1.0,
            "best_value": value, "value": value})
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.WAITING)
        return trial.number

    add(0.4, pause=True)
    complete = add(0.4, pause=False)
    export_study("pick", url, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "provenance.json").read_text())["trial_number"] == \
        complete
    better = add(0.3, pause=True)
    export_study("pick", url, tmp_path / "b")
    provenance = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert provenance["trial_number"] == better and provenance["value"] == 0.3
    assert provenance["paused"]["eval"] == 1
    assert "# Paused after evaluation 1" in (tmp_path / "b" / "best_config.yaml").read_text()
    board = (tmp_path / "b" / "leaderboard.csv").read_text().splitlines()
    assert board[1].startswith(f"1,{better},0.3,1,") and board[2].startswith(f"2,{complete},0.4,,")
    # gc: nothing runs or waits, so every checkpoint goes, paused trials' too; those stay
    # ranked by their best value but are never promoted.
    from typer.testing import CliRunner

    from gemma_search.cli import app
    from gemma_search.objective import checkpoint_dir

    for n in (0, complete, better):
        folder = checkpoint_dir(spec, n) / "step-00000001"
        folder.mkdir(parents=True)
        (folder / "adapter.safetensors").write_bytes(b"x" * 2**20)
    running = optuna.Trial(study, study._storage.create_new_trial(study._study_id))
    (checkpoint_dir(spec, running.number) / "step-00000001").mkdir(parents=True)
    result = CliRunner().invoke(app, ["gc", "pick", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "removed the checkpoints of 1 trial(s), 1.0 MiB: 1" in result.output
    assert checkpoint_dir(spec, 0).exists() and checkpoint_dir(spec, running.number).exists()
    study.tell(running, state=TrialState.FAIL)  # nothing runs now: paused ones go too
    result = CliRunner().invoke(app, ["gc", "pick", "--storage", url])
    assert "removed the checkpoints of 3 trial(s), 2.0 MiB" in result.output, result.output
    trials = study.get_trials(deepcopy=False)
    assert all(t.system_attrs[PAUSED]["checkpoint_removed"] for t in trials if is_paused(t))
    assert pick(trials, spec) is None


def test_launch_ends_well_when_the_budget_leaves_trials_paused(spec: Any) -> None:
    """`launch` reads the study when its workers exit: paused trials are done, and the
    trials a spent token budget never started are not missing."""
    from gemma_search.launcher import outcome

    trials = [frozen(0, TrialState.WAITING, {1: 0.5}, paused_at=1),
              frozen(1, TrialState.COMPLETE, {1: 0.4, 2: 0.3}),
              frozen(2, TrialState.WAITING, {1: 0.6}, paused_at=1)]
    result = outcome("rungs", trials, planned=20, pausing=True)
    assert result.ok and result.line == "study rungs: 3 trials done (1 complete, 2 paused " \
        "at a rung)"
    queued = frozen(3, TrialState.WAITING, {})
    assert not outcome("rungs", [*trials, queued], planned=20, pausing=True).ok
