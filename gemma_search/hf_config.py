"""One trial in the terms of the Hugging Face tools: the arguments of `TrainingArguments`,
`LoraConfig`, `EarlyStoppingCallback` and TRL's `SFTConfig`, and a description of its data
(`data.json`) that `reproduce.py` follows to repeat the trial in plain transformers.

Everything here is derived from the trial's params (through `space.trial_config`) and the
schedule its worker recorded (`TrainResult.schedule`: the steps it planned under its token
budget, its warmup and evaluation steps, the examples it drew from, its precision).
"""

from __future__ import annotations

from typing import Any

from gemma_search.spec import StudySpec
from gemma_search.train.config import TrialConfig
from gemma_search.train.data import read_arguments

__all__ = ["EVAL_BATCH_SIZE", "data_description", "early_stopping_kwargs", "lora_config_kwargs",
           "sft_config_kwargs", "training_args_kwargs"]

#: Our optimizer names -> `TrainingArguments.optim`. transformers has no plain Adam or
#: AdaBelief: those map to the nearest optimizer and say so in the notes.
_HF_OPTIM = {"adamw": "adamw_torch", "adam": "adamw_torch", "sgd": "sgd", "adagrad": "adagrad",
             "rmsprop": "rmsprop", "adabelief": "adamw_torch"}
_HF_SCHEDULE = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
#: The engine's evaluation batch (`train.engine.EVAL_BATCH_SIZE`), kept here without
#: importing torch: export runs on machines with no GPU stack loaded.
EVAL_BATCH_SIZE = 16
#: Checkpoints a trial keeps; a Trainer run of the export keeps as many (plus the best).
_SAVE_TOTAL_LIMIT = 2


def training_args_kwargs(spec: StudySpec, cfg: TrialConfig, *, output_dir: str,
                         schedule: dict[str, Any] | None = None
                         ) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments `transformers.TrainingArguments` accepts, and what did not map.

    With the trial's recorded `schedule`, the run is pinned to it: `max_steps` (the steps the
    trial planned under its token budget), exact `warmup_steps`, evaluation and saving every
    `eval_steps`, and the best evaluation loaded at the end, since a trial's value is its
    best evaluation. Without one (a trial recorded by an older gemma-search) only the
    settings are exported and a note says what is missing.
    """
    notes: list[str] = []
    if cfg.optimizer == "adam" and cfg.weight_decay > 0:
        notes.append("optimizer adam (L2 weight decay) exported as adamw_torch (decoupled "
                     "decay); best_config.yaml keeps the exact setting")
    if cfg.optimizer == "adabelief":
        notes.append("optimizer adabelief has no TrainingArguments name; exported as "
                     "adamw_torch; use pytorch_optimizer.AdaBelief via `optimizers=` for the "
                     "exact setting")
    if cfg.l1_penalty > 0 or cfg.token_dropout > 0:
        notes.append("l1_penalty and token_dropout have no TrainingArguments field; "
                     "data.json records them and best_config.yaml keeps them")
    args: dict[str, Any] = {
        "output_dir": output_dir,
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.micro_batch_size,
        "per_device_eval_batch_size": EVAL_BATCH_SIZE,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_train_epochs": cfg.epochs,
        "optim": _HF_OPTIM[cfg.optimizer],
        "lr_scheduler_type": _HF_SCHEDULE[cfg.lr_schedule],
        # transformers 5 reads a float warmup_steps in [0, 1) as a ratio (warmup_ratio is gone)
        "warmup_steps": cfg.warmup_ratio,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "seed": cfg.seed,
        "bf16": spec.model.dtype in ("auto", "bfloat16"),
        "metric_for_best_model": cfg.metric,
        "greater_is_better": cfg.maximize,
    }
    if cfg.adam_beta2 is not None:
        args["adam_beta2"] = cfg.adam_beta2
    if cfg.momentum is not None:
        args["optim_args"] = f"momentum={cfg.momentum}"
    if cfg.task == "classification" and cfg.label_smoothing > 0:
        args["label_smoothing_factor"] = cfg.label_smoothing
    if schedule is None:
        notes.append("this trial ran before gemma-search recorded its schedule: max_steps, "
                     "warmup_steps and the evaluation steps are not exported; re-run it with "
                     "`gemma-search create best_config.yaml` for an exact export")
        return args, notes
    every = int(schedule["eval_steps"])
    if "micro_batch_size" in schedule:  # the memory plan may have lowered the micro-batch
        args["per_device_train_batch_size"] = int(schedule["micro_batch_size"])
        args["gradient_accumulation_steps"] = int(schedule["gradient_accumulation_steps"])
    args.update({
        # max_steps wins over num_train_epochs: it is where the trial's LR schedule ends.
        "max_steps": int(schedule["max_steps"]),
        "warmup_steps": int(schedule["warmup_steps"]),
        "eval_strategy": "steps", "eval_steps": every,
        "save_strategy": "steps", "save_steps": every, "save_total_limit": _SAVE_TOTAL_LIMIT,
        "load_best_model_at_end": True,
        "bf16": schedule.get("mixed_precision") == "bf16",
    })
    return args, notes


def early_stopping_kwargs(cfg: TrialConfig) -> dict[str, Any] | None:
    """`transformers.EarlyStoppingCallback` arguments, or None when the trial had no
    patience. The callback counts evaluations without a strict improvement, as the engine."""
    if not cfg.early_stopping_patience:
        return None
    return {"early_stopping_patience": cfg.early_stopping_patience,
            "early_stopping_threshold": 0.0}


def sft_config_kwargs(spec: StudySpec, cfg: TrialConfig, training_args: dict[str, Any]
                      ) -> dict[str, Any]:
    """TRL `SFTConfig` arguments for a causal_lm trial: the training arguments plus the
    sequence length, packing (TRL's best-fit packing keeps documents apart with position
    ids, as the engine does) and where the loss is taken."""
    completion_only = spec.task.completion_column is not None
    out = {**training_args, "max_length": spec.data.max_seq_len,
           "packing": spec.data.packing, "completion_only_loss": completion_only}
    if spec.data.packing:
        out["packing_strategy"] = "bfd"
    if not completion_only:
        out["dataset_text_field"] = spec.task.text_column
    return out


def lora_config_kwargs(spec: StudySpec, cfg: TrialConfig) -> dict[str, Any]:
    """Keyword arguments `peft.LoraConfig` accepts."""
    return {
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": list(cfg.lora_target_modules),
        "bias": "none",
        "task_type": "CAUSAL_LM" if cfg.task == "causal_lm" else "SEQ_CLS",
        "base_model_name_or_path": spec.model.name_or_path,
        "revision": spec.model.revision,
    }


def data_description(spec: StudySpec, cfg: TrialConfig, schedule: dict[str, Any] | None,
                     engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """`data.json`: which examples the trial used and how it turned them into tensors."""
    task, data = spec.task, spec.data
    labels = list(task.labels) if task.type == "classification" and task.labels else None
    schedule = schedule or {}
    heads = {
        "causal_lm": "AutoModelForCausalLM: the model's own LM head (final logit soft-cap "
                     "kept), no new weights",
        "classification": f"AutoModelForSequenceClassification, num_labels {len(labels or [])}, "
                          "problem_type single_label_classification: a linear `score` head on "
                          "the last non-padding token, drawn after torch.manual_seed(0) and "
                          "trained in full beside the adapters",
        "regression": "AutoModelForSequenceClassification, num_labels 1, problem_type "
                      "regression: a linear `score` head on the last non-padding token, drawn "
                      "after torch.manual_seed(0) and trained in full beside the adapters",
    }
    losses = {
        "causal_lm": "cross-entropy of the target tokens (completion only when a prompt "
                     "precedes it), summed over an optimizer step's examples and divided by "
                     "their target-token count",
        "classification": "cross-entropy (with label_smoothing), summed over an optimizer "
                          "step's examples and divided by their count",
        "regression": "squared error, summed over an optimizer step's examples and divided "
                      "by their count",
    }
    attention = (engine or {}).get("attention") or spec.model.attn_implementation
    return {
        "task": task.type,
        "files": {"train": data.train, "validation": data.validation},
        "read": {"train": read_arguments(data.train, header=data.header, columns=data.columns),
                 "validation": None if data.validation is None else read_arguments(
                     data.validation, header=data.header, columns=data.columns)},
        "rename_columns": dict(data.rename_columns),
        "validation_fraction": None if data.validation is not None else
        data.validation_fraction,
        "seed": data.seed,
        "max_train_examples": data.max_train_examples,
        "max_validation_examples": data.max_validation_examples,
        "selection": (
            "read each file with `datasets`; without a validation file, train_test_split("
            "test_size=validation_fraction, seed=seed) of the training file; shuffle the "
            "training split with seed and keep max_train_examples of it; shuffle the "
            "validation split with seed only when max_validation_examples cuts it; tokenize "
            "(causal_lm drops examples whose prompt leaves no target token within "
            "max_seq_len); the trial trains on the first train_examples of that (its "
            "train_fraction)"),
        "train_examples_available": schedule.get("train_examples_available"),
        "train_examples": schedule.get("train_examples"),
        "validation_examples": schedule.get("validation_examples"),
        "train_fraction": cfg.train_fraction,
        "order": ("epoch after epoch, a permutation of the train_examples drawn with "
                  "torch.Generator().manual_seed(seed * 100003 + epoch) (seed: the training "
                  "seed of training_args.json); each optimizer step takes the next "
                  "per_device_train_batch_size x gradient_accumulation_steps of them, "
                  "crossing epoch ends"),
        "max_seq_len": data.max_seq_len,
        "text_column": task.text_column,
        "prompt_template": task.prompt_template,
        "completion_column": task.completion_column,
        "label_column": task.label_column if task.type != "causal_lm" else None,
        "labels": labels,
        "label_mapping": None if labels is None else {name: i for i, name in enumerate(labels)},
        "num_labels": len(labels) if labels else (1 if task.type == "regression" else 0),
        "packing": data.packing and task.type == "causal_lm",
        "head": heads[task.type],
        "loss": losses[task.type],
        "token_dropout": cfg.token_dropout,
        "l1_penalty": cfg.l1_penalty,
        "metric": cfg.metric,
        "greater_is_better": cfg.maximize,
        "model": {"name_or_path": spec.model.name_or_path, "revision": spec.model.revision,
                  "dtype": spec.model.dtype, "attn_implementation": attention},
    }
