"""The training engine on a tiny Gemma 2 on CPU: each task learns, pruning stops, the base
model survives trials unchanged."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from gemma_search.demo import demo_sentences
from gemma_search.train.config import TrialConfig
from gemma_search.train.data import TaskData, load_task_data
from gemma_search.train.engine import (
    _drop_tokens,
    _not_first,
    _real_tokens,
    evaluate,
    plan_steps,
    train_trial,
)
from gemma_search.train.model import BaseModel, attach_lora, detach_lora, load_base_model
from gemma_search.train.optim import build_optimizer, build_scheduler
from gemma_search.train.reporter import NullReporter


def make_config(task: str, **overrides: Any) -> TrialConfig:
    values: dict[str, Any] = dict(
        task=task, learning_rate=1e-2, micro_batch_size=16, gradient_accumulation_steps=1,
        epochs=8.0, optimizer="adamw", momentum=None, adam_beta2=0.999, lr_schedule="constant",
        warmup_ratio=0.0, weight_decay=0.0, l1_penalty=0.0, lora_dropout=0.0, lora_r=8,
        lora_alpha=16, lora_targets="all_linear",
        lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"),
        early_stopping_patience=0, train_fraction=1.0, max_grad_norm=1.0, label_smoothing=0.0,
        token_dropout=0.0, seed=0, metric="val_loss", maximize=False, eval_every_steps=10)
    values.update(overrides)
    return TrialConfig(**values)


def write_task_data(folder: Path, task: str) -> Path:
    """Learnable data for each task, written as JSONL."""
    rows = demo_sentences(300, seed=3)
    if task == "regression":
        out = [{"text": r["text"], "label": 1.0 if r["label"] == "positive" else 0.0}
               for r in rows]
    elif task == "causal_lm":
        out = [{"review": r["text"], "answer": r["label"]} for r in rows]
    else:
        out = rows
    path = folder / f"{task}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def load(tiny_model: Path, tmp_path: Path, task: str) -> tuple[BaseModel, TaskData]:
    num_labels = 2 if task == "classification" else 1
    base = load_base_model(name_or_path=str(tiny_model), revision=None, task=task,
                           num_labels=num_labels, dtype="float32", attn_implementation="eager",
                           device=torch.device("cpu"))
    causal = task == "causal_lm"
    data = load_task_data(
        tokenizer=base.tokenizer, max_seq_len=48,
        labels=["negative", "positive"] if task == "classification" else None,
        task=task, train_path=str(write_task_data(tmp_path, task)), validation_path=None,
        validation_fraction=0.2, text_column=None if causal else "text",
        prompt_template="review: {review}\nsentiment:" if causal else None,
        completion_column="answer" if causal else None, label_column="label")
    return base, data


def initial_val_loss(base: BaseModel, data: TaskData) -> float:
    from accelerate import Accelerator

    peft_model = attach_lora(base, r=8, alpha=16, dropout=0.0, target_modules=("q_proj",))
    try:
        return evaluate(peft_model, data, base.device, Accelerator(cpu=True))["val_loss"]
    finally:
        detach_lora(base, peft_model)


@pytest.mark.parametrize("task", ["classification", "regression", "causal_lm"])
def test_each_task_learns(tiny_model: Path, tmp_path: Path, task: str) -> None:
    base, data = load(tiny_model, tmp_path, task)
    before = initial_val_loss(base, data)
    result = train_trial(base, data, make_config(task), NullReporter())
    assert result.stop_reason == "completed"
    assert result.value is not None and result.value < 0.8 * before, (before, result.history)
    assert result.tokens_trained > 0 and result.optimizer_steps == plan_steps(
        make_config(task), len(data.train), data.avg_train_tokens)
    expected = {"classification": {"accuracy", "macro_f1"}, "regression": {"rmse", "pearson"},
                "causal_lm": {"perplexity"}}[task]
    assert expected <= set(result.metrics)


def test_base_model_is_unchanged_after_a_trial(tiny_model: Path, tmp_path: Path) -> None:
    base, data = load(tiny_model, tmp_path, "classification")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    train_trial(base, data, make_config("classification", epochs=0.5), NullReporter())
    after = base.model.state_dict()
    assert set(after) == set(before)  # no lora_A/lora_B or wrapper left behind
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    assert not any(p.requires_grad for p in base.model.parameters())


def test_second_trial_on_the_resident_model_matches_a_fresh_one(tiny_model: Path,
                                                                tmp_path: Path) -> None:
    cfg = make_config("classification", epochs=0.5)
    base, data = load(tiny_model, tmp_path, "classification")
    first = train_trial(base, data, cfg, NullReporter())
    second = train_trial(base, data, cfg, NullReporter())
    assert second.history == first.history  # same seed, same start: same run


class PruneAt:
    def __init__(self, step: int) -> None:
        self.step, self.reported = step, []  # type: ignore[var-annotated]

    def report(self, step: int, value: float, metrics: Any) -> None:
        self.reported.append(step)

    def should_prune(self) -> bool:
        return self.reported[-1] >= self.step


def test_reporter_prunes_at_the_step_it_asks(tiny_model: Path, tmp_path: Path) -> None:
    base, data = load(tiny_model, tmp_path, "classification")
    reporter = PruneAt(2)
    result = train_trial(base, data, make_config("classification"), reporter)
    assert result.stop_reason == "pruned"
    assert reporter.reported == [1, 2]
    assert result.optimizer_steps == 20


def test_early_stopping_patience(tiny_model: Path, tmp_path: Path) -> None:
    base, data = load(tiny_model, tmp_path, "classification")
    # lr 0: nothing improves after the first evaluation, so patience 2 stops at the third.
    cfg = make_config("classification", learning_rate=0.0, early_stopping_patience=2,
                      epochs=5.0)
    result = train_trial(base, data, cfg, NullReporter())
    assert result.stop_reason == "early_stopped"
    assert len(result.history) == 3


def test_token_budget_caps_the_run(tiny_model: Path, tmp_path: Path) -> None:
    base, data = load(tiny_model, tmp_path, "classification")
    cfg = make_config("classification", epochs=10.0, max_tokens=2000, eval_every_steps=None,
                      eval_every_tokens=500)
    result = train_trial(base, data, cfg, NullReporter())
    assert 2000 <= result.tokens_trained < 2000 + 2 * 16 * 48
    evals = [h["tokens"] for h in result.history]
    assert all(t >= 500 * (i + 1) for i, t in enumerate(evals[:-1]))


def test_train_fraction_and_accumulation(tiny_model: Path, tmp_path: Path) -> None:
    base, data = load(tiny_model, tmp_path, "classification")
    cfg = make_config("classification", train_fraction=0.5, gradient_accumulation_steps=2,
                      epochs=1.0)
    result = train_trial(base, data, cfg, NullReporter())
    used = math.ceil(len(data.train) / 2)
    assert result.optimizer_steps == math.ceil(math.ceil(used / 16) / 2)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adagrad", "rmsprop", "adabelief"])
@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_optimizers_and_schedules_step(name: str, schedule: str) -> None:
    weight = torch.nn.Parameter(torch.ones(4))
    opt = build_optimizer([weight], name=name, lr=0.01, weight_decay=0.01, momentum=0.5,
                          adam_beta2=0.99)
    sched = build_scheduler(opt, schedule=schedule, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        (weight ** 2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        lrs.append(opt.param_groups[0]["lr"])
    assert float(weight.sum()) < 4.0  # it descended
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(0.01)
    else:
        assert lrs[-1] < lrs[2]


def test_token_dropout_keeps_bos_and_padding() -> None:
    ids = torch.tensor([[2, 10, 11, 12, 0, 0]] * 64)
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]] * 64)}
    out = _drop_tokens(ids, _real_tokens(batch) & _not_first(batch), 0.5, unk_id=3)
    assert (out[:, 0] == 2).all() and (out[:, 4:] == 0).all()
    dropped = (out[:, 1:4] == 3).float().mean()
    assert 0.3 < float(dropped) < 0.7


def test_l1_penalty_shrinks_adapters(tiny_model: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma_search.train.engine as engine

    base, data = load(tiny_model, tmp_path, "classification")
    real_detach = engine.detach_lora
    seen: list[float] = []

    def measuring_detach(b: BaseModel, peft_model: Any) -> None:
        seen.append(float(sum(p.abs().sum() for n, p in peft_model.named_parameters()
                              if "lora_B" in n)))
        real_detach(b, peft_model)

    monkeypatch.setattr(engine, "detach_lora", measuring_detach)
    for l1 in (0.0, 1.0):
        train_trial(base, data, make_config("classification", l1_penalty=l1, epochs=1.0),
                    NullReporter())
    without, with_l1 = seen
    assert with_l1 < 0.5 * without


def test_configs_are_frozen() -> None:
    cfg = make_config("classification")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- checkpoints, faults


def test_preempted_trial_resumes_where_it_stopped(tiny_model: Path, tmp_path: Path) -> None:
    from gemma_search.train.checkpoint import Checkpointing

    base, data = load(tiny_model, tmp_path, "classification")
    cfg = make_config("classification", epochs=3.0, lora_dropout=0.1, token_dropout=0.1)
    straight = train_trial(base, data, cfg, NullReporter())

    steps: list[int] = []
    saved: list[int] = []
    first = Checkpointing(tmp_path / "trial-0", on_saved=lambda step, tokens, path:
                          saved.append(step))

    def stop_after_23_steps() -> bool:
        steps.append(1)
        return len(steps) > 23

    stopped = train_trial(base, data, cfg, NullReporter(), checkpointing=first,
                          stop_requested=stop_after_23_steps)
    assert stopped.stop_reason == "preempted" and stopped.optimizer_steps == 23
    assert saved == [10, 20, 23]  # after each evaluation, and on the stop
    assert sorted(p.name for p in (tmp_path / "trial-0").iterdir()) == [
        "step-00000020", "step-00000023"]  # keep_last=2

    resumed = train_trial(base, data, cfg, NullReporter(), checkpointing=Checkpointing(
        tmp_path / "trial-1", resume_from=stopped.checkpoint))
    assert resumed.resumed_from_step == 23
    assert resumed.optimizer_steps == straight.optimizer_steps
    assert resumed.tokens_trained == straight.tokens_trained
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert a["step"] == b["step"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert resumed.value == pytest.approx(straight.value, rel=1e-4)


def test_a_checkpoint_holds_tensors_and_plain_values_only(tiny_model: Path,
                                                          tmp_path: Path) -> None:
    """The trainer file loads with `weights_only=True` (nothing in it can run code), the
    random streams come back exactly, and a resumed run repeats the evaluations of an
    uninterrupted one bit for bit (regression: metrics computed with numpy)."""
    import random

    import numpy as np

    from gemma_search.train.checkpoint import (
        Checkpointing,
        TrainState,
        load_checkpoint,
        save_checkpoint,
    )

    base, data = load(tiny_model, tmp_path, "regression")
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules=("q_proj",))
    try:
        optimizer = build_optimizer(model.parameters(), name="adamw", lr=1e-3,
                                    weight_decay=0.0, momentum=None, adam_beta2=0.999)
        scheduler = build_scheduler(optimizer, schedule="cosine", warmup_steps=1,
                                    total_steps=10)
        np.random.seed(7)
        np.random.standard_normal()  # a cached Gaussian is part of numpy's state
        state = TrainState(step=3, best={"val_loss": np.float64(0.25)})
        folder = save_checkpoint(Checkpointing(tmp_path / "trial-9"), model, optimizer,
                                 scheduler, state)
        saved = torch.load(folder / "trainer.pt", weights_only=True)
        assert isinstance(saved["rng"]["numpy"]["keys"], list)
        drawn = (random.random(), np.random.random(), np.random.standard_normal(),
                 torch.rand(3).tolist())
        restored = load_checkpoint(folder, model, optimizer, scheduler)
        again = (random.random(), np.random.random(), np.random.standard_normal(),
                 torch.rand(3).tolist())
        assert again == drawn
        assert restored.step == 3 and restored.best == {"val_loss": 0.25}
    finally:
        detach_lora(base, model)

    cfg = make_config("regression", epochs=2.0, lora_dropout=0.1, token_dropout=0.1)
    straight = train_trial(base, data, cfg, NullReporter())
    calls: list[int] = []

    def stop_after_13_steps() -> bool:
        calls.append(1)
        return len(calls) > 13

    stopped = train_trial(base, data, cfg, NullReporter(), checkpointing=Checkpointing(
        tmp_path / "trial-0"), stop_requested=stop_after_13_steps)
    resumed = train_trial(base, data, cfg, NullReporter(), checkpointing=Checkpointing(
        tmp_path / "trial-1", resume_from=stopped.checkpoint))
    assert resumed.resumed_from_step == 13
    assert resumed.history == straight.history


def test_out_of_memory_halves_the_micro_batch(tiny_model: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma_search.train.engine as engine

    base, data = load(tiny_model, tmp_path, "classification")
    real_loss = engine._loss_sum

    def oom_above_4(model: Any, batch: dict[str, Any], task: str, smoothing: float) -> Any:
        if batch["input_ids"].shape[0] > 4:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return real_loss(model, batch, task, smoothing)

    monkeypatch.setattr(engine, "_loss_sum", oom_above_4)
    cfg = make_config("classification", epochs=1.0)
    result = train_trial(base, data, cfg, NullReporter())
    assert result.stop_reason == "completed"
    assert result.oom_events == [{"step": 0, "micro_batch_size": 8},
                                 {"step": 0, "micro_batch_size": 4}]
    assert result.optimizer_steps == plan_steps(cfg, len(data.train), data.avg_train_tokens)
    # the same examples per step: the token count matches a run that never ran out of memory
    monkeypatch.setattr(engine, "_loss_sum", real_loss)
    assert result.tokens_trained == train_trial(base, data, cfg, NullReporter()).tokens_trained


def test_out_of_memory_at_every_size_fails_and_frees(tiny_model: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    import weakref

    import gemma_search.train.engine as engine

    base, data = load(tiny_model, tmp_path, "classification")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    optimizers: list[Any] = []
    real_build = engine.build_optimizer

    def tracked(*args: Any, **kwargs: Any) -> Any:
        opt = real_build(*args, **kwargs)
        optimizers.append(weakref.ref(opt))
        return opt

    def always_oom(*args: Any) -> Any:
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(engine, "build_optimizer", tracked)
    monkeypatch.setattr(engine, "_loss_sum", always_oom)
    with pytest.raises(engine.OutOfMemory, match="out of memory at micro-batch 2 after 3"):
        train_trial(base, data, make_config("classification"), NullReporter())
    gc.collect()
    assert optimizers and optimizers[0]() is None  # the optimizer and its state are gone
    after = base.model.state_dict()
    assert set(after) == set(before)  # adapters detached even though the trial failed


def test_nan_loss_stops_as_diverged(tiny_model: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma_search.train.engine as engine

    base, data = load(tiny_model, tmp_path, "classification")
    real_loss = engine._loss_sum
    calls: list[int] = []

    def nan_after_5(*args: Any) -> Any:
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) > 5 else loss

    monkeypatch.setattr(engine, "_loss_sum", nan_after_5)
    result = train_trial(base, data, make_config("classification"), NullReporter())
    assert result.stop_reason == "diverged"
    assert result.optimizer_steps == 5
