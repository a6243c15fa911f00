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
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gemma_search.train.config import TrialConfig
from gemma_search.train.data import TaskData, collate
from gemma_search.train.model import BaseModel, attach_lora, detach_lora
from gemma_search.train.optim import build_optimizer, build_scheduler
from gemma_search.train.reporter import Reporter

__all__ = ["TrainResult", "evaluate", "plan_steps", "train_trial"]

EVAL_BATCH_SIZE = 16


@dataclass
class TrainResult:
    """What one trial produced."""

    value: float | None
    """Best value of the objective metric over the evaluations; None if it diverged early."""
    metrics: dict[str, float]
    """All validation metrics at the best evaluation."""
    stop_reason: str
    """completed | early_stopped | pruned | diverged."""
    tokens_trained: int
    optimizer_steps: int
    wall_seconds: float
    peak_memory_bytes: int
    history: list[dict[str, float]] = field(default_factory=list)
    """One row per evaluation: eval, step, tokens and the metrics."""


def plan_steps(cfg: TrialConfig, n_train: int, avg_tokens: float) -> int:
    """Optimizer steps of the whole trial: epochs over the data, capped by the token budget.

    The LR schedule runs over exactly these steps, so that evaluations at fixed token counts
    see the schedule of the full-length run (DESIGN decision 11).
    """
    micro_batches = math.ceil(n_train / cfg.micro_batch_size)
    steps_per_epoch = max(1, math.ceil(micro_batches / cfg.gradient_accumulation_steps))
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_tokens is not None:
        tokens_per_step = max(avg_tokens, 1.0) * cfg.effective_batch_size
        total = min(total, max(1, math.ceil(cfg.max_tokens / tokens_per_step)))
    return total


def train_trial(base: BaseModel, data: TaskData, cfg: TrialConfig,
                reporter: Reporter) -> TrainResult:
    """Attach adapters, fit, detach; the base model is left exactly as it was."""
    import torch

    _seed_everything(cfg.seed)
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
    peft_model = attach_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             target_modules=cfg.lora_target_modules)
    try:
        return _fit(peft_model, base, data, cfg, reporter)
    finally:
        detach_lora(base, peft_model)
        del peft_model
        gc.collect()
        if base.device.type == "cuda":
            torch.cuda.empty_cache()


def _fit(model: Any, base: BaseModel, data: TaskData, cfg: TrialConfig,
         reporter: Reporter) -> TrainResult:
    import torch
    from accelerate import Accelerator

    started = time.monotonic()
    device = base.device
    accelerator = Accelerator(cpu=device.type == "cpu",
                              mixed_precision="bf16" if device.type == "cuda" else "no")
    # 1. data: a fixed prefix of the once-shuffled train set, reshuffled per epoch by seed
    n_train = max(1, math.ceil(cfg.train_fraction * len(data.train)))
    train_set = data.train.select(range(n_train))
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.micro_batch_size, shuffle=True, generator=generator,
        collate_fn=partial(collate, task=data.task, pad_token_id=data.pad_token_id))
    # 2. optimizer and schedule over the planned steps
    total_steps = plan_steps(cfg, n_train, data.avg_train_tokens)
    optimizer = build_optimizer(model.parameters(), name=cfg.optimizer, lr=cfg.learning_rate,
                                weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                adam_beta2=cfg.adam_beta2)
    scheduler = build_scheduler(optimizer, schedule=cfg.lr_schedule,
                                warmup_steps=round(cfg.warmup_ratio * total_steps),
                                total_steps=total_steps)
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    batches = _endless(loader)

    # 3. the loop: one optimizer step per window of gradient_accumulation_steps micro-batches
    tokens = step = evals = since_best = 0
    best: dict[str, float] | None = None
    history: list[dict[str, float]] = []
    stop_reason = "completed"
    next_eval_tokens = cfg.eval_every_tokens
    model.train()
    while step < total_steps:
        window = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
        targets = sum(_count_targets(b, data.task) for b in window)
        window_loss = 0.0
        for batch in window:
            batch = {k: v.to(device) for k, v in batch.items()}
            if cfg.token_dropout > 0:
                batch["input_ids"] = _drop_tokens(batch["input_ids"], batch["attention_mask"],
                                                  cfg.token_dropout, data.unk_token_id)
            with accelerator.autocast():
                loss_sum = _loss_sum(model, batch, data.task, cfg.label_smoothing)
            # Normalise by the window's target count, not per micro-batch: micro-batches of
            # causal_lm differ in completion tokens (the transformers#34191 accumulation bug).
            loss = loss_sum / max(targets, 1)
            if cfg.l1_penalty > 0:
                l1 = sum(p.abs().sum() for p in adapters)
                loss = loss + cfg.l1_penalty * l1 / len(window)
            accelerator.backward(loss)
            window_loss += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(window_loss):
            stop_reason = "diverged"
            break
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        due = (tokens >= next_eval_tokens) if next_eval_tokens is not None else (
            step % cfg.eval_every_steps == 0)  # type: ignore[operator]
        if not due:
            continue
        while next_eval_tokens is not None and tokens >= next_eval_tokens:
            next_eval_tokens += cfg.eval_every_tokens  # type: ignore[operator]
        evals += 1
        metrics = evaluate(model, data, device, accelerator)
        history.append({"eval": evals, "step": step, "tokens": tokens, **metrics})
        value = metrics[cfg.metric]
        if not math.isfinite(value):
            stop_reason = "diverged"
            break
        if best is None or _better(value, best[cfg.metric], cfg.maximize):
            best, since_best = metrics, 0
        else:
            since_best += 1
        reporter.report(evals, value)
        if reporter.should_prune():
            stop_reason = "pruned"
            break
        if cfg.early_stopping_patience and since_best >= cfg.early_stopping_patience:
            stop_reason = "early_stopped"
            break
        model.train()

    # 4. a last evaluation at the end of the run, if the last one was not there already
    if stop_reason == "completed" and (not history or history[-1]["step"] != step):
        metrics = evaluate(model, data, device, accelerator)
        history.append({"eval": evals + 1, "step": step, "tokens": tokens, **metrics})
        if not math.isfinite(metrics[cfg.metric]):
            stop_reason = "diverged"
        elif best is None or _better(metrics[cfg.metric], best[cfg.metric], cfg.maximize):
            best = metrics
    del optimizer, scheduler, adapters
    return TrainResult(
        value=None if best is None else best[cfg.metric],
        metrics=best or {},
        stop_reason=stop_reason,
        tokens_trained=tokens,
        optimizer_steps=step,
        wall_seconds=time.monotonic() - started,
        peak_memory_bytes=_peak_memory(device),
        history=history,
    )


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


def _endless(loader: Any) -> Any:
    """Micro-batches across epochs; each epoch reshuffles (the loader's seeded generator)."""
    while True:
        yield from loader


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
