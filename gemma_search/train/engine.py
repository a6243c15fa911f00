"""Train one trial: fresh adapters on the resident base, evaluate at fixed points, report.

The path reads top to bottom: `train_trial` -> `_fit` -> `evaluate`. It knows nothing of
Optuna: it reports through a `Reporter` and stops when the reporter says so.
"""

from __future__ import annotations

import gc
import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gemma_search.errors import TrainingError
from gemma_search.train.checkpoint import (
    Checkpointing,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from gemma_search.train.config import TrialConfig
from gemma_search.train.data import TaskData, collate
from gemma_search.train.model import BaseModel, attach_lora, detach_lora
from gemma_search.train.optim import build_optimizer, build_scheduler
from gemma_search.train.reporter import Reporter

__all__ = ["MAX_OOM_RETRIES", "OutOfMemory", "TrainResult", "evaluate", "plan_steps",
           "train_trial"]

EVAL_BATCH_SIZE = 16


#: Out-of-memory retries of one trial (each halves the micro-batch) before it fails.
MAX_OOM_RETRIES = 3


class OutOfMemory(TrainingError):
    """The trial ran out of device memory even at the smallest micro-batch tried."""


@dataclass
class TrainResult:
    """What one trial produced."""

    value: float | None
    """Best value of the objective metric over the evaluations; None if it diverged early."""
    metrics: dict[str, float]
    """All validation metrics at the best evaluation."""
    stop_reason: str
    """completed | early_stopped | pruned | diverged | preempted."""
    tokens_trained: int
    optimizer_steps: int
    wall_seconds: float
    peak_memory_bytes: int
    history: list[dict[str, float]] = field(default_factory=list)
    """One row per evaluation: eval, step, tokens and the metrics."""
    resumed_from_step: int = 0
    """Optimizer steps restored from a checkpoint (0: a fresh start)."""
    oom_events: list[dict[str, int]] = field(default_factory=list)
    """Each out-of-memory retry: the step and the micro-batch it fell back to."""
    checkpoint: Path | None = None
    """The last checkpoint written, if any."""


def plan_steps(cfg: TrialConfig, n_train: int, avg_tokens: float) -> int:
    """Optimizer steps of the whole trial: epochs over the data, capped by the token budget.

    The LR schedule runs over exactly these steps, so that evaluations at fixed token counts
    see the schedule of the full-length run (DESIGN decision 11).
    """
    steps_per_epoch = max(1, math.ceil(n_train / cfg.effective_batch_size))
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_tokens is not None:
        tokens_per_step = max(avg_tokens, 1.0) * cfg.effective_batch_size
        total = min(total, max(1, math.ceil(cfg.max_tokens / tokens_per_step)))
    return total


def train_trial(base: BaseModel, data: TaskData, cfg: TrialConfig, reporter: Reporter, *,
                checkpointing: Checkpointing | None = None,
                stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Attach adapters, fit, detach; the base model is left exactly as it was.

    `checkpointing`: save (and resume from) checkpoints. `stop_requested`: polled after every
    optimizer step; when it answers True the trial checkpoints and stops as `preempted`.
    """
    import torch

    _seed_everything(cfg.seed)
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
    peft_model = attach_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             target_modules=cfg.lora_target_modules)
    try:
        return _fit(peft_model, base, data, cfg, reporter, checkpointing, stop_requested)
    finally:
        detach_lora(base, peft_model)
        del peft_model
        gc.collect()
        if base.device.type == "cuda":
            torch.cuda.empty_cache()


def _fit(model: Any, base: BaseModel, data: TaskData, cfg: TrialConfig, reporter: Reporter,
         ckpt: Checkpointing | None, stop_requested: Callable[[], bool] | None) -> TrainResult:
    from accelerate import Accelerator

    started = time.monotonic()
    device = base.device
    accelerator = Accelerator(cpu=device.type == "cpu",
                              mixed_precision="bf16" if device.type == "cuda" else "no")
    # 1. data: a fixed prefix of the once-shuffled train set, in a seeded order per epoch
    n_train = max(1, math.ceil(cfg.train_fraction * len(data.train)))
    train_set = data.train.select(range(n_train))
    # 2. optimizer and schedule over the planned steps
    total_steps = plan_steps(cfg, n_train, data.avg_train_tokens)
    optimizer = build_optimizer(model.parameters(), name=cfg.optimizer, lr=cfg.learning_rate,
                                weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                adam_beta2=cfg.adam_beta2)
    scheduler = build_scheduler(optimizer, schedule=cfg.lr_schedule,
                                warmup_steps=round(cfg.warmup_ratio * total_steps),
                                total_steps=total_steps)
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    state = TrainState(next_eval_tokens=cfg.eval_every_tokens,
                       micro_batch_size=cfg.micro_batch_size,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    resumed_from = 0
    if ckpt is not None and ckpt.resume_from is not None:
        state = load_checkpoint(ckpt.resume_from, model, optimizer, scheduler)
        resumed_from = state.step
    stream = _ExampleStream(n_train, cfg.seed, state.epoch, state.example_offset)
    last_saved: Path | None = None

    def checkpoint() -> None:
        nonlocal last_saved
        if ckpt is not None:
            state.epoch, state.example_offset = stream.epoch, stream.offset
            last_saved = save_checkpoint(ckpt, model, optimizer, scheduler, state)

    # 3. the loop: one optimizer step per window of micro_batch x accumulation examples
    stop_reason = "completed"
    model.train()
    while state.step < total_steps:
        if stop_requested is not None and stop_requested():
            checkpoint()
            stop_reason = "preempted"
            break
        window = stream.take(cfg.effective_batch_size)
        window_loss = _train_window(model, train_set, window, data, cfg, state, adapters,
                                    accelerator, optimizer)
        if not math.isfinite(window_loss):
            stop_reason = "diverged"
            break
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if ckpt is not None and ckpt.every_steps and state.step % ckpt.every_steps == 0:
            checkpoint()

        due = (state.tokens >= state.next_eval_tokens) if state.next_eval_tokens is not None \
            else state.step % cfg.eval_every_steps == 0  # type: ignore[operator]
        if not due:
            continue
        while state.next_eval_tokens is not None and state.tokens >= state.next_eval_tokens:
            state.next_eval_tokens += cfg.eval_every_tokens  # type: ignore[operator]
        state.evals += 1
        metrics = evaluate(model, data, device, accelerator)
        row = {"eval": state.evals, "step": state.step, "tokens": state.tokens, **metrics}
        state.history.append(row)
        value = metrics[cfg.metric]
        if not math.isfinite(value):
            stop_reason = "diverged"
            break
        if state.best is None or _better(value, state.best[cfg.metric], cfg.maximize):
            state.best, state.since_best = metrics, 0
        else:
            state.since_best += 1
        reporter.report(state.evals, value, row)
        if reporter.should_prune():
            stop_reason = "pruned"
            break
        if cfg.early_stopping_patience and state.since_best >= cfg.early_stopping_patience:
            stop_reason = "early_stopped"
            break
        if ckpt is not None and not ckpt.every_steps:
            checkpoint()
        model.train()

    # 4. a last evaluation at the end of the run, if the last one was not there already
    history = state.history
    if stop_reason == "completed" and (not history or history[-1]["step"] != state.step):
        metrics = evaluate(model, data, device, accelerator)
        history.append({"eval": state.evals + 1, "step": state.step, "tokens": state.tokens,
                        **metrics})
        if not math.isfinite(metrics[cfg.metric]):
            stop_reason = "diverged"
        elif state.best is None or _better(metrics[cfg.metric], state.best[cfg.metric],
                                           cfg.maximize):
            state.best = metrics
    best = state.best
    return TrainResult(
        value=None if best is None else best[cfg.metric],
        metrics=best or {},
        stop_reason=stop_reason,
        tokens_trained=state.tokens,
        optimizer_steps=state.step,
        wall_seconds=time.monotonic() - started,
        peak_memory_bytes=_peak_memory(device),
        history=history,
        resumed_from_step=resumed_from,
        oom_events=state.oom_events,
        checkpoint=last_saved,
    )


def _train_window(model: Any, train_set: Any, window: list[int], data: TaskData,
                  cfg: TrialConfig, state: TrainState, adapters: list[Any], accelerator: Any,
                  optimizer: Any) -> float:
    """Forward and backward over one optimizer step's examples; return the summed loss.

    Out of device memory: free what the failed attempt held, halve the micro-batch, double
    the accumulation (the same examples, the same effective batch) and redo the window
    (DESIGN decision 9). After MAX_OOM_RETRIES halvings the trial fails with OutOfMemory.
    """
    import torch

    while True:
        try:
            return _accumulate(model, train_set, window, data, cfg, state, adapters,
                               accelerator)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(state.oom_events) >= MAX_OOM_RETRIES or state.micro_batch_size == 1:
                raise OutOfMemory(
                    f"out of memory at micro-batch {state.micro_batch_size} after "
                    f"{len(state.oom_events)} halvings; lower search.micro_batch_size or "
                    "data.max_seq_len") from None
            state.micro_batch_size = max(1, state.micro_batch_size // 2)
            state.gradient_accumulation_steps = math.ceil(
                cfg.effective_batch_size / state.micro_batch_size)
            state.oom_events.append({"step": state.step,
                                     "micro_batch_size": state.micro_batch_size})


def _accumulate(model: Any, train_set: Any, window: list[int], data: TaskData,
                cfg: TrialConfig, state: TrainState, adapters: list[Any],
                accelerator: Any) -> float:
    device = next(p.device for p in model.parameters())
    size = state.micro_batch_size
    micro = [window[i:i + size] for i in range(0, len(window), size)]
    batches = [collate([train_set[i] for i in ids], data.task, data.pad_token_id)
               for ids in micro]
    # Normalise by the window's target count, not per micro-batch: micro-batches of causal_lm
    # differ in completion tokens (the transformers#34191 accumulation bug).
    targets = max(1, sum(_count_targets(b, data.task) for b in batches))
    window_loss, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        if cfg.token_dropout > 0:
            batch["input_ids"] = _drop_tokens(batch["input_ids"], batch["attention_mask"],
                                              cfg.token_dropout, data.unk_token_id)
        with accelerator.autocast():
            loss = _loss_sum(model, batch, data.task, cfg.label_smoothing) / targets
        if cfg.l1_penalty > 0:
            l1 = sum(p.abs().sum() for p in adapters)
            loss = loss + cfg.l1_penalty * l1 / len(batches)
        accelerator.backward(loss)
        window_loss += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    state.tokens += tokens  # counted once the whole window went through
    return window_loss


class _ExampleStream:
    """Training example indices, epoch after epoch, each epoch in its own seeded order.

    The position is (epoch, offset), two integers: a checkpoint stores it and a resumed run
    continues with exactly the examples the interrupted one would have seen next.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, offset: int = 0) -> None:
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            chunk = self._order[self.offset:self.offset + k - len(out)]
            out += chunk
            self.offset += len(chunk)
        return out


def evaluate(model: Any, data: TaskData, device: Any, accelerator: Any) -> dict[str, float]:
    """Validation loss and the task's metrics over the whole validation split."""
    import numpy as np
    import torch

    from gemma_search.train.metrics import classification_metrics, regression_metrics

    model.eval()
    loader = torch.utils.data.DataLoader(
        data.validation, batch_size=EVAL_BATCH_SIZE, shuffle=False,
        collate_fn=partial(collate, task=data.task, pad_token_id=data.pad_token_id))
    total, count = 0.0, 0
    preds: list[Any] = []
    labels: list[Any] = []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.autocast():
                if data.task == "causal_lm":
                    total += float(_loss_sum(model, batch, data.task, 0.0))
                    count += _count_targets(batch, data.task)
                    continue
                out = _forward(model, batch).float()
            if data.task == "classification":
                total += float(torch.nn.functional.cross_entropy(out, batch["labels"],
                                                                 reduction="sum"))
                preds.append(out.argmax(-1).cpu().numpy())
            else:
                pred = out.squeeze(-1)
                total += float(torch.nn.functional.mse_loss(pred, batch["labels"],
                                                            reduction="sum"))
                preds.append(pred.cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
            count += len(batch["labels"])
    val_loss = total / max(count, 1)
    if data.task == "causal_lm":
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}
    p, y = np.concatenate(preds), np.concatenate(labels)
    if data.task == "classification":
        return {"val_loss": val_loss, **classification_metrics(p, y, data.num_labels)}
    return {"val_loss": val_loss, **regression_metrics(p, y)}


# --------------------------------------------------------------------------- helpers


def _forward(model: Any, batch: dict[str, Any]) -> Any:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _loss_sum(model: Any, batch: dict[str, Any], task: str, label_smoothing: float) -> Any:
    """Summed loss of a micro-batch: masked NLL, cross-entropy or squared error."""
    import torch.nn.functional as F

    logits = _forward(model, batch).float()
    labels = batch["labels"]
    if task == "causal_lm":
        # Gemma 2's forward already applied the final-logit soft-cap (30.0) to `logits`.
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                               labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    if task == "classification":
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum")
    return F.mse_loss(logits.squeeze(-1), labels, reduction="sum")


def _count_targets(batch: dict[str, Any], task: str) -> int:
    if task == "causal_lm":
        return int((batch["labels"][:, 1:] != -100).sum())
    return len(batch["labels"])


def _drop_tokens(ids: Any, mask: Any, p: float, unk_id: int) -> Any:
    """Token-dropout augmentation: replace input tokens by <unk> with probability p.

    The first token (<bos>) and padding are kept; labels are untouched.
    """
    import torch

    drop = (torch.rand(ids.shape, device=ids.device) < p) & mask.bool()
    drop[:, 0] = False
    return torch.where(drop, torch.full_like(ids, unk_id), ids)


def _better(value: float, best: float, maximize: bool) -> bool:
    return value > best if maximize else value < best


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _peak_memory(device: Any) -> int:
    """Peak device memory of the trial on GPU; peak resident memory of the process on CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
