"""The flat configuration of one trial: every setting fixed, nothing searched."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrialConfig"]


@dataclass(frozen=True)
class TrialConfig:
    """Everything the engine needs to train one trial; built by `gemma_search.space`."""

    task: str
    """`causal_lm`, `classification` or `regression`."""
    learning_rate: float
    micro_batch_size: int
    gradient_accumulation_steps: int
    epochs: float
    optimizer: str
    momentum: float | None
    """Only for sgd / rmsprop; None otherwise."""
    adam_beta2: float | None
    """Only for adamw / adam / adabelief; None otherwise."""
    lr_schedule: str
    warmup_ratio: float
    weight_decay: float
    l1_penalty: float
    lora_dropout: float
    lora_r: int
    lora_alpha: int
    lora_targets: str
    """Name of the module set; `lora_target_modules` holds its members."""
    lora_target_modules: tuple[str, ...]
    early_stopping_patience: int
    train_fraction: float
    max_grad_norm: float
    label_smoothing: float
    token_dropout: float
    seed: int
    metric: str
    """Validation metric reported to the pruner and returned as the trial's value."""
    maximize: bool
    """True when a larger `metric` is better."""
    max_tokens: int | None = None
    """Stop after this many training tokens; the LR schedule ends here too."""
    eval_every_tokens: int | None = None
    eval_every_steps: int | None = None

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps
