"""A real study on CPU: tiny Gemma 2, two worker processes, pruning, and an export that
standard tools load. Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from gemma_search.cli import app
from gemma_search.spec import Choice, FloatRange, IntRange, load_spec

from .conftest import demo_spec_text, write_spec

pytestmark = pytest.mark.slow


def test_study_runs_prunes_and_exports(tmp_path: Path, tiny_model: Path,
                                       demo_data: tuple[Path, Path], storage_url: str) -> None:
    name = f"e2e-{tmp_path.name[-20:]}"
    text = demo_spec_text(name, tiny_model, *demo_data, max_trials=6)
    # The sampled learning rates are too small to learn anything; two enqueued trials use a
    # rate that learns (Optuna takes enqueued values as given, even outside the range). Once
    # one of those has completed, the median pruner prunes every sampled trial at its first
    # evaluation, so the test does not hang on what the sampler happens to draw.
    text = text.replace("learning_rate: {low: 1.0e-4, high: 3.0e-2, log: true}",
                        "learning_rate: {low: 1.0e-8, high: 2.0e-8, log: true}")
    text = text.replace("pruner: {type: hyperband, min_resource: 1, reduction_factor: 3}",
                        "pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}")
    spec_path = write_spec(tmp_path / "spec.yaml", text)
    runner = CliRunner()
    result = runner.invoke(app, ["create", str(spec_path), "--storage", storage_url])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name=name, storage=storage_url)
    for lora_r in (8, 4):
        study.enqueue_trial({"learning_rate": 2.0e-2, "optimizer": "adamw", "lora_r": lora_r})

    result = runner.invoke(app, ["launch", name, "--workers", "2", "--storage", storage_url])
    assert result.exit_code == 0, result.output

    # 1. the budget holds study-wide, every trial ended, some were pruned
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.user_attrs["stop_reason"] == "pruned" for t in pruned)
    assert {t.user_attrs["host"] for t in trials}  # metrics stored as trial attributes
    best = study.best_trial
    assert best.params["learning_rate"] == 2.0e-2
    assert best.user_attrs["accuracy"] > 0.7 and best.user_attrs["tokens_trained"] > 0
    # how each trial ran is on its dashboard page, apart from the metrics
    ran = best.user_attrs["engine"]
    assert (ran["attention"], ran["loss"], ran["fused_kernels"]) == ("eager", "head", False)
    assert ran["micro_batch_size"] == 16 and ran["setup_seconds"] > 0

    # 2. gemma-search's own tables: every evaluation, the checkpoints, the two workers
    from gemma_search import db

    engine = db.make_engine(storage_url)
    history = db.eval_history(engine, name, best.number)
    assert [r["eval_index"] for r in history] == sorted(best.intermediate_values)
    assert history[0]["metrics"]["val_loss"] == pytest.approx(best.intermediate_values[1])
    ckpt = db.latest_checkpoint(engine, name, [best.number])
    assert ckpt is not None and Path(ckpt["path"]).is_dir()
    workers = db.list_workers(engine, name, stale_after=120)
    assert len(workers) == 2 and {w["state"] for w in workers} == {"exited"}

    # 3. status sees the same study
    result = runner.invoke(app, ["status", name, "--storage", storage_url, "--json"])
    summary = json.loads(result.output)
    assert summary["trials"]["pruned"] == len(pruned)
    assert summary["best"]["trial"] == best.number

    # 4. export: files that transformers, peft and gemma-search itself load
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", name, "--out", str(out), "--storage", storage_url])
    assert result.exit_code == 0, result.output
    from peft import LoraConfig
    from transformers import TrainingArguments

    args = TrainingArguments(**json.loads((out / "training_args.json").read_text()))
    assert args.learning_rate == pytest.approx(2.0e-2)
    assert args.per_device_train_batch_size == 16
    lora = LoraConfig(**json.loads((out / "lora_config.json").read_text()))
    assert lora.r == best.params["lora_r"] and set(lora.target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj"}
    again = load_spec(out / "best_config.yaml")
    fixed = [getattr(again.search, f) for f in again.search.__dataclass_fields__]
    assert not any(isinstance(v, Choice | FloatRange | IntRange) for v in fixed)
    assert again.search.learning_rate == pytest.approx(2.0e-2)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["trial_number"] == best.number
    assert provenance["base_model"] == str(tiny_model)
    assert len(provenance["data_fingerprint"]) == 64 and len(provenance["spec_hash"]) == 64
    assert "optuna" in provenance["packages"]
    rows = (out / "leaderboard.csv").read_text().splitlines()
    assert rows[0].startswith("rank,trial,value") and len(rows) == 1 + sum(
        t.state == TrialState.COMPLETE for t in trials)
    assert yaml.safe_load((out / "best_config.yaml").read_text())["name"] == f"{name}-best"
