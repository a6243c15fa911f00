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
