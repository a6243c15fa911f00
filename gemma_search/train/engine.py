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
from gemma_search.train.loss import causal_lm_loss_sum, fused_loss_available
from gemma_search.train.memory import BatchPlan, ModelShapes, free_device_bytes, plan_batch
from gemma_search.train.model import BaseModel, attach_lora, detach_lora
from gemma_search.train.optim import build_optimizer, build_scheduler
from gemma_search.train.packing import collate_packed, micro_batches, pack_rows
from gemma_search.train.reporter import Reporter

__all__ = ["MAX_OOM_RETRIES", "OutOfMemory", "TrainResult", "evaluate", "plan_eval_steps",
           "plan_steps", "train_trial"]

EVAL_BATCH_SIZE = 16


#: Allocator rounding and cuBLAS workspaces: below this, memory counts as back to baseline.
LEAK_TOLERANCE_BYTES = 64 * 2**20

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
    """completed | early_stopped | pruned | diverged | preempted | paused (at a rung, or at
    the token cap: `paused_at_rung` tells which)."""
    tokens_trained: int
    optimizer_steps: int
    wall_seconds: float
    peak_memory_bytes: int
    history: list[dict[str, float]] = field(default_factory=list)
    """One row per evaluation: eval, step, tokens and the metrics."""
    resumed_from_step: int = 0
    """Optimizer steps restored from a checkpoint (0: a fresh start)."""
    paused_at_rung: bool = False
    """Paused: at an evaluation the reporter chose (True), or short of it at its token cap."""
    blocked_tokens: int = 0
    """Paused at the token cap: the tokens of the optimizer step that did not fit."""
    oom_events: list[dict[str, int]] = field(default_factory=list)
    """Each out-of-memory retry: the step and the micro-batch it fell back to."""
    checkpoint: Path | None = None
    """The last checkpoint written, if any."""
    setup_seconds: float = 0.0
    """From the call to the first optimizer step's start: adapters, optimizer, plan."""
    teardown_seconds: float = 0.0
    """Adapters detached and memory freed after the run; with the next trial's setup, the
    trial switch of a worker whose base stays resident (design decision 6)."""
    micro_batch_size: int = 0
    """The micro-batch the run ended with (the memory plan and OOM halvings applied)."""
    activation_checkpointing: bool = False
    """Whether the memory plan turned on activation checkpointing."""
    loss_backend: str = ""
    """causal_lm: `liger` or `chunked` fused cross-entropy; other tasks: `head`."""
    plan: str = ""
    """Why the memory plan chose this micro-batch and checkpointing."""
    schedule: dict[str, Any] = field(default_factory=dict)
    """What the trial planned, in the terms `transformers.TrainingArguments` uses: max_steps,
    warmup_steps, eval_steps, the examples it drew from, the precision (export reads it)."""


def plan_steps(cfg: TrialConfig, n_train: int, avg_tokens: float) -> int:
    """Optimizer steps of the whole trial: epochs over the data, capped by the token budget.

    The LR schedule runs over exactly these steps, so that evaluations at fixed token counts
    see the schedule of the full-length run (design decision 11).
    """
    steps_per_epoch = max(1, math.ceil(n_train / cfg.effective_batch_size))
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_tokens is not None:
        tokens_per_step = max(avg_tokens, 1.0) * cfg.effective_batch_size
        total = min(total, max(1, math.ceil(cfg.max_tokens / tokens_per_step)))
    return total


def plan_eval_steps(cfg: TrialConfig, avg_tokens: float) -> int:
    """Optimizer steps between evaluations.

    `eval_every_tokens` becomes a whole number of steps at the mean example length, like the
    token budget in `plan_steps`: the i-th evaluation of every trial lands near i x
    eval_every_tokens whatever its batch size, and the schedule is a plain `eval_steps` that
    `TrainingArguments` can repeat (an exported trial reproduces in plain transformers).
    """
    if cfg.eval_every_steps is not None:
        return cfg.eval_every_steps
    assert cfg.eval_every_tokens is not None  # the spec requires one of the two
    tokens_per_step = max(avg_tokens, 1.0) * cfg.effective_batch_size
    return max(1, round(cfg.eval_every_tokens / tokens_per_step))


def train_trial(base: BaseModel, data: TaskData, cfg: TrialConfig, reporter: Reporter, *,
                checkpointing: Checkpointing | None = None,
                stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Attach adapters, fit, detach; the base model is left exactly as it was.

    `checkpointing`: save (and resume from) checkpoints. `stop_requested`: polled after every
    optimizer step; when it answers True the trial checkpoints and stops as `preempted`.
    """
    import torch

    entered = time.monotonic()
    _seed_everything(cfg.seed)
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
    peft_model = attach_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             target_modules=cfg.lora_target_modules)
    result: TrainResult | None = None
    try:
        result = _fit(peft_model, base, data, cfg, reporter, checkpointing, stop_requested,
                      entered)
        return result
    finally:
        leaving = time.monotonic()
        if base.activation_checkpointing:  # the plan turned it on for this trial
            _checkpointing(base.model, on=False)
            base.model.disable_input_require_grads()
            base.activation_checkpointing = False
        detach_lora(base, peft_model)
        del peft_model
        # The adapters, optimizer state and gradients went with their last references. A
        # full collection (about 0.5 s with a resident model's many objects) runs only when
        # device memory shows something still held, in a reference cycle.
        if base.memory_above_baseline() > LEAK_TOLERANCE_BYTES:
            gc.collect()
            torch.cuda.empty_cache()
        if result is not None:
            result.teardown_seconds = time.monotonic() - leaving


def _fit(model: Any, base: BaseModel, data: TaskData, cfg: TrialConfig, reporter: Reporter,
         ckpt: Checkpointing | None, stop_requested: Callable[[], bool] | None,
         entered: float) -> TrainResult:
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
    eval_steps = plan_eval_steps(cfg, data.avg_train_tokens)
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    optimizer = build_optimizer(model.parameters(), name=cfg.optimizer, lr=cfg.learning_rate,
                                weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                adam_beta2=cfg.adam_beta2)
    scheduler = build_scheduler(optimizer, schedule=cfg.lr_schedule,
                                warmup_steps=warmup_steps, total_steps=total_steps)
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    state = TrainState(micro_batch_size=cfg.micro_batch_size,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    resumed_from = 0
    if ckpt is not None and ckpt.resume_from is not None:
        state = load_checkpoint(ckpt.resume_from, model, optimizer, scheduler)
        resumed_from = state.step
    # 3. a micro-batch and activation checkpointing that fit the device's free memory
    plan = _memory_plan(base, data, cfg, train_set)
    if plan is not None:
        if not plan.fits:
            raise OutOfMemory(f"the memory plan finds no setting that fits: {plan.reason}")
        if plan.micro_batch < state.micro_batch_size:  # a resumed state may be smaller yet
            state.micro_batch_size = plan.micro_batch
            state.gradient_accumulation_steps = plan.grad_accum
        if plan.checkpointing:
            _checkpointing(base.model, on=True)
            model.enable_input_require_grads()  # frozen embeddings: let gradients reach LoRA
            base.activation_checkpointing = True
    stream = _ExampleStream(n_train, cfg.seed, state.epoch, state.example_offset)
    # The micro-batch the run starts with (the memory plan may lower it): an export repeats it.
    planned_batch = (state.micro_batch_size, state.gradient_accumulation_steps)
    last_saved: Path | None = None

    def checkpoint() -> None:
        nonlocal last_saved
        if ckpt is not None:
            state.epoch, state.example_offset = stream.epoch, stream.offset
            last_saved = save_checkpoint(ckpt, model, optimizer, scheduler, state)

    # 4. the loop: one optimizer step per window of micro_batch x accumulation examples
    stop_reason = "completed"
    model.train()
    setup_seconds = time.monotonic() - entered
    should_pause = getattr(reporter, "should_pause", None)
    token_cap = getattr(reporter, "token_cap", None)
    paused_at_rung, blocked_tokens = False, 0
    while state.step < total_steps:
        if stop_requested is not None and stop_requested():
            checkpoint()
            stop_reason = "preempted"
            break
        cap = None if token_cap is None or ckpt is None else token_cap()
        if cap is not None:
            upcoming = stream.peek(cfg.effective_batch_size)
            needs = sum(len(train_set[i]["input_ids"]) for i in upcoming)
            if state.tokens + needs > cap:
                checkpoint()  # its share of the study's tokens is spent: pause before it
                stop_reason, blocked_tokens = "paused", needs
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

        if state.step % eval_steps:
            continue
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
        pause = (ckpt is not None and should_pause is not None and state.step < total_steps
                 and should_pause())
        if ckpt is not None and (pause or not ckpt.every_steps):
            checkpoint()
        if pause:
            stop_reason, paused_at_rung = "paused", True
            break
        model.train()

    # 5. a last evaluation at the end of the run, if the last one was not there already
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
        paused_at_rung=paused_at_rung,
        blocked_tokens=blocked_tokens,
        oom_events=state.oom_events,
        checkpoint=last_saved,
        setup_seconds=setup_seconds,
        micro_batch_size=state.micro_batch_size,
        activation_checkpointing=bool(plan and plan.checkpointing),
        loss_backend=fused_loss_available(device) if data.task == "causal_lm" else "head",
        plan="" if plan is None else plan.reason,
        schedule={"max_steps": total_steps, "warmup_steps": warmup_steps,
                  "eval_steps": eval_steps, "train_examples": n_train,
                  "train_examples_available": len(data.train),
                  "validation_examples": len(data.validation),
                  "micro_batch_size": planned_batch[0],
                  "gradient_accumulation_steps": planned_batch[1], "device": device.type,
                  "mixed_precision": "bf16" if device.type == "cuda" else "no"},
    )


def _checkpointing(model: Any, *, on: bool) -> None:
    """Activation checkpointing on or off: transformers 5.24 renamed gradient_checkpointing_*
    to activation_checkpointing_* (the old names warn); 5.17, on the GPU image, has only
    the old ones. Non-reentrant: the reentrant variant needs inputs that require grad."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _memory_plan(base: BaseModel, data: TaskData, cfg: TrialConfig,
                 train_set: Any) -> BatchPlan | None:
    """The batch plan for the device's free memory; None on CPU (no limit to plan for).

    Checkpointing costs ~28% of throughput (docs/design.md, H200 at batch 4), so it is only used
    when the requested micro-batch does not fit otherwise (`memory.plan_batch`).
    """
    free = free_device_bytes(base.device)
    if free is None:
        return None
    return plan_batch(
        ModelShapes.from_config(base.model.config), free_bytes=free,
        resident_bytes=base.memory_baseline, micro_batch=cfg.micro_batch_size,
        grad_accum=cfg.gradient_accumulation_steps,
        seq_len=(data.max_seq_len if data.packing and data.max_seq_len
                 else max(1, max(train_set["length"]) if len(train_set) else 1)),
        weight_bytes=0.55 if base.quantized else base.model.dtype.itemsize,
        lora_r=cfg.lora_r, lora_targets=cfg.lora_target_modules, lora_dropout=cfg.lora_dropout,
        attention=base.attn_implementation,  # type: ignore[arg-type]
        fused_loss=True, fused_kernels=base.fused_kernels, task=cfg.task)


def _train_window(model: Any, train_set: Any, window: list[int], data: TaskData,
                  cfg: TrialConfig, state: TrainState, adapters: list[Any], accelerator: Any,
                  optimizer: Any) -> float:
    """Forward and backward over one optimizer step's examples; return the summed loss.

    Out of device memory: free what the failed attempt held, halve the micro-batch, double
    the accumulation (the same examples, the same effective batch) and redo the window
    (design decision 9). After MAX_OOM_RETRIES halvings the trial fails with OutOfMemory.
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
    batches = _micro_batches(model, train_set, window, data, state.micro_batch_size)
    # Normalise by the window's target count, not per micro-batch: micro-batches of causal_lm
    # differ in completion tokens (the transformers#34191 accumulation bug).
    targets = max(1, sum(_count_targets(b, data.task) for b in batches))
    window_loss, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        real = _real_tokens(batch)
        if cfg.token_dropout > 0:
            batch["input_ids"] = _drop_tokens(batch["input_ids"], real & _not_first(batch),
                                              cfg.token_dropout, data.unk_token_id)
        with accelerator.autocast():
            loss = _loss_sum(model, batch, data.task, cfg.label_smoothing) / targets
        if cfg.l1_penalty > 0:
            l1 = sum(p.abs().sum() for p in adapters)
            loss = loss + cfg.l1_penalty * l1 / len(batches)
        accelerator.backward(loss)
        window_loss += float(loss.detach())
        tokens += int(real.sum())
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

    def peek(self, k: int) -> list[int]:
        """The next `k` indices `take` would return, without moving."""
        position = self.epoch, self.offset, self._order
        try:
            return self.take(k)
        finally:
            self.epoch, self.offset, self._order = position

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
    total, count = 0.0, 0
    preds: list[Any] = []
    labels: list[Any] = []
    n = len(data.validation)
    with torch.no_grad():
        # Batches by hand, not a DataLoader: creating its iterator draws from the global
        # random stream, which would shift every later dropout mask of the trial.
        for start in range(0, n, EVAL_BATCH_SIZE):
            rows = [data.validation[i] for i in range(start, min(start + EVAL_BATCH_SIZE, n))]
            batch = {k: v.to(device) for k, v in
                     collate(rows, data.task, data.pad_token_id).items()}
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
    # use_cache=False: training keeps no key/value cache (Gemma 2's config turns it on).
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False).logits


def _loss_sum(model: Any, batch: dict[str, Any], task: str, label_smoothing: float) -> Any:
    """Summed loss of a micro-batch: masked NLL, cross-entropy or squared error."""
    import torch.nn.functional as F

    if task == "causal_lm":
        # Fused linear cross-entropy with Gemma 2's final soft-cap: the [tokens, 256k]
        # logits are never materialised for the whole micro-batch (design decision 7).
        return causal_lm_loss_sum(model, batch["input_ids"], batch.get("attention_mask"),
                                  batch["labels"], batch.get("position_ids"))
    logits = _forward(model, batch).float()
    labels = batch["labels"]
    if task == "classification":
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum")
    return F.mse_loss(logits.squeeze(-1), labels, reduction="sum")


def _count_targets(batch: dict[str, Any], task: str) -> int:
    if task == "causal_lm":
        return int((batch["labels"][:, 1:] != -100).sum())
    return len(batch["labels"])


def _micro_batches(model: Any, train_set: Any, window: list[int], data: TaskData,
                   size: int) -> list[dict[str, Any]]:
    """One optimizer step's examples as micro-batches of `size` rows.

    causal_lm with packing: the examples are packed into rows of `data.max_seq_len` tokens,
    each attending only within itself (`train.packing`), so no padding is trained on; with
    flash_attention_2 a micro-batch is one flat row (transformers runs its varlen kernel only
    then). Otherwise: `size` right-padded examples per micro-batch.
    """
    rows = [train_set[i] for i in window]
    if data.packing:
        groups = pack_rows(rows, data.max_seq_len or max(len(r["input_ids"]) for r in rows))
        flash = getattr(model.config, "_attn_implementation", "") == "flash_attention_2"
        return [collate_packed(rows, chunk, data.pad_token_id)
                for chunk in micro_batches(groups, size, one_row=flash)]
    return [collate(rows[i:i + size], data.task, data.pad_token_id)
            for i in range(0, len(rows), size)]


def _real_tokens(batch: dict[str, Any]) -> Any:
    """Boolean mask of the non-padding tokens of a micro-batch (packed or padded)."""
    if "document_ids" in batch:
        return batch["document_ids"] >= 0
    return batch["attention_mask"].bool()


def _not_first(batch: dict[str, Any]) -> Any:
    """Boolean mask without each example's first token (<bos>)."""
    import torch

    if "position_ids" in batch:
        return batch["position_ids"] > 0
    keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    keep[:, 0] = False
    return keep


def _drop_tokens(ids: Any, droppable: Any, p: float, unk_id: int) -> Any:
    """Token-dropout augmentation: replace `droppable` input tokens by <unk> with
    probability p (callers keep <bos> and padding out); labels are untouched."""
    import torch

    drop = (torch.rand(ids.shape, device=ids.device) < p) & droppable
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
