"""The engine's fast paths give the same training as the plain ones: packing, the memory
plan's activation checkpointing; and a plan that cannot fit fails the trial up front."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gemma_search.train.engine import OutOfMemory, train_trial
from gemma_search.train.reporter import NullReporter

from .test_train import load, make_config


def history(result: Any) -> list[float]:
    return [row["val_loss"] for row in result.history]


def test_packed_training_matches_padded_training(tiny_model: Path, tmp_path: Path) -> None:
    base, data = load(tiny_model, tmp_path, "causal_lm")
    cfg = make_config("causal_lm", epochs=1.0, lora_dropout=0.0, micro_batch_size=8,
                      gradient_accumulation_steps=2)
    padded = train_trial(base, dataclasses.replace(data, packing=False), cfg, NullReporter())
    packed = train_trial(base, dataclasses.replace(data, packing=True, max_seq_len=48), cfg,
                         NullReporter())
    # The same examples per optimizer step and the same loss normalisation: each step's
    # gradient is the same sum, so the evaluations agree to float rounding.
    assert packed.optimizer_steps == padded.optimizer_steps
    assert packed.tokens_trained == padded.tokens_trained  # real tokens only, no padding
    assert history(packed) == pytest.approx(history(padded), rel=1e-4)
    assert packed.loss_backend == "chunked"


def test_planned_checkpointing_trains_the_same(tiny_model: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma_search.train.engine as engine
    from gemma_search.train import memory

    base, data = load(tiny_model, tmp_path, "classification")
    cfg = make_config("classification", epochs=1.0, lora_dropout=0.0)
    plain = train_trial(base, data, cfg, NullReporter())
    assert not plain.activation_checkpointing and plain.plan == ""  # CPU: no plan

    shapes = memory.ModelShapes.from_config(base.model.config)
    seq = max(data.train["length"])
    without, with_ckpt = (memory.estimate_peak_bytes(
        shapes, micro_batch=16, seq_len=seq, weight_bytes=4, lora_r=8, lora_dropout=0.0,
        checkpointing=ckpt, attention="eager", fused_loss=True, task="classification")
        for ckpt in (False, True))
    assert with_ckpt.total < without.total
    # A device whose budget (0.9 x free) lies between the two: the plan must trade.
    free = (with_ckpt.total + without.total) / 2 / 0.9
    monkeypatch.setattr(engine, "free_device_bytes", lambda _device: int(free))
    planned = train_trial(base, data, cfg, NullReporter())
    assert "micro-batch 16 without checkpointing needs" in planned.plan
    assert planned.activation_checkpointing or planned.micro_batch_size < 16
    assert planned.optimizer_steps == plain.optimizer_steps
    assert history(planned) == pytest.approx(history(plain), rel=1e-4)
    assert not base.activation_checkpointing  # turned off again for the next trial
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.model.modules())


def test_a_plan_that_cannot_fit_fails_the_trial_before_training(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma_search.train.engine as engine

    base, data = load(tiny_model, tmp_path, "classification")
    monkeypatch.setattr(engine, "free_device_bytes", lambda _device: 1024)
    with pytest.raises(OutOfMemory, match="the memory plan finds no setting that fits"):
        train_trial(base, data, make_config("classification", epochs=1.0), NullReporter())


def test_trial_switch_is_measured(tiny_model: Path, tmp_path: Path) -> None:
    base, data = load(tiny_model, tmp_path, "classification")
    result = train_trial(base, data, make_config("classification", epochs=1.0), NullReporter())
    assert 0 < result.setup_seconds < result.wall_seconds
    assert result.teardown_seconds > 0
    assert result.micro_batch_size == 16


def test_finished_trials_release_their_optimizer_and_adapters(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU there is no allocator to read: check the references themselves. After each of
    3 trials on the resident base, nothing keeps its optimizer or LoRA weights alive."""
    import gc
    import weakref

    import gemma_search.train.engine as engine

    base, data = load(tiny_model, tmp_path, "causal_lm")
    optimizers: list[Any] = []
    adapters: list[Any] = []
    real_build = engine.build_optimizer

    def tracked(params: Any, **kwargs: Any) -> Any:
        params = list(params)
        adapters.extend(weakref.ref(p) for p in params if p.requires_grad)
        opt = real_build(params, **kwargs)
        optimizers.append(weakref.ref(opt))
        return opt

    monkeypatch.setattr(engine, "build_optimizer", tracked)
    names = set(base.model.state_dict())
    for seed in range(3):
        result = train_trial(base, data, make_config("causal_lm", epochs=0.5, seed=seed),
                             NullReporter())
        assert result.stop_reason == "completed"
        gc.collect()
        assert all(ref() is None for ref in optimizers), f"trial {seed}: optimizer kept"
        assert all(ref() is None for ref in adapters), f"trial {seed}: adapter weights kept"
        assert set(base.model.state_dict()) == names  # no lora_ keys left on the base
    assert len(optimizers) == 3
