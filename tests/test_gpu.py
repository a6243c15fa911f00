"""GPU checks: the same engine on CUDA (bfloat16 autocast), memory back at baseline after trials.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma_search.objective import LEAK_TOLERANCE_BYTES
from gemma_search.train.engine import train_trial
from gemma_search.train.reporter import NullReporter

from .test_train import load, make_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_trials_on_gpu_learn_and_return_memory_to_baseline(tiny_model: Path, tmp_path: Path,
                                                          task: str) -> None:
    base, data = load(tiny_model, tmp_path, task)  # `load` picks CPU: move it
    base.model.to("cuda")
    base.device = torch.device("cuda")
    base.head_state = {k: v.to("cuda") for k, v in base.head_state.items()}
    base.memory_baseline = torch.cuda.memory_allocated()
    for seed in range(3):
        result = train_trial(base, data, make_config(task, seed=seed, epochs=2.0),
                             NullReporter())
        assert result.stop_reason == "completed"
        assert result.peak_memory_bytes > base.memory_baseline
        assert base.memory_above_baseline() <= LEAK_TOLERANCE_BYTES


def test_worker_trains_on_the_gpu_and_registers_it(tmp_path: Path, tiny_model: Path,
                                                    demo_data: tuple[Path, Path]) -> None:
    """`gemma-search worker` on a CUDA machine: the trials run there with the engine's GPU
    choices (a soft-capping attention kernel other than eager, Liger where installed), and
    the worker row names the card."""
    import importlib.util

    import optuna
    from typer.testing import CliRunner

    from gemma_search import db
    from gemma_search.cli import app

    from .conftest import demo_spec_text, write_spec

    name = "gpu-worker"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    text = demo_spec_text(name, tiny_model, *demo_data, max_trials=2).replace(
        "dtype: float32", "dtype: auto")
    runner = CliRunner()
    result = runner.invoke(app, ["create", str(write_spec(tmp_path / "spec.yaml", text)),
                                 "--storage", url])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["worker", name, "--storage", url])
    assert result.exit_code == 0, result.output

    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    assert len(trials) == 2
    for t in trials:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        ran = t.user_attrs["engine"]
        assert ran["attention"] in ("flex_attention", "flash_attention_2"), ran
        assert ran["fused_kernels"] == (importlib.util.find_spec("liger_kernel") is not None)
        assert t.user_attrs.get("memory_above_baseline_bytes") is None  # nothing leaked
    print("worker trials on GPU:", [t.user_attrs["engine"] for t in trials])
    engine = db.make_engine(url)
    workers = db.list_workers(engine, name, stale_after=120)
    engine.dispose()
    assert [w["gpu_name"] for w in workers] == [torch.cuda.get_device_name(0)]
