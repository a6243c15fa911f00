"""Export a study's best trial in forms that standard tools load.

    best_config.yaml    the full spec with every setting fixed at the best trial's values
                        (`gemma-search create best_config.yaml` re-runs exactly that config)
    training_args.json  `transformers.TrainingArguments(**json.load(f))`
    lora_config.json    `peft.LoraConfig(**json.load(f))`
    provenance.json     study, trial, value, base model and revision, data fingerprint,
                        package versions, spec hash
    leaderboard.csv     the top trials with their params and metrics
"""

from __future__ import annotations

import csv
import dataclasses
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from gemma_search.errors import StorageError
from gemma_search.ranking import ranked_trials
from gemma_search.space import fixed_search, trial_config
from gemma_search.spec import StudySpec, WarmStartSpec, dump_spec, spec_hash
from gemma_search.storage import redact
from gemma_search.study import load_study
from gemma_search.train.config import TrialConfig
from gemma_search.verify import export_pick, load_companion

__all__ = ["export_study", "leaderboard", "lora_config_kwargs", "training_args_kwargs"]

#: Our optimizer names -> `TrainingArguments.optim`. transformers has no plain Adam or
#: AdaBelief: those map to the nearest optimizer and say so in provenance.json.
_HF_OPTIM = {"adamw": "adamw_torch", "adam": "adamw_torch", "sgd": "sgd", "adagrad": "adagrad",
             "rmsprop": "rmsprop", "adabelief": "adamw_torch"}
_HF_SCHEDULE = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
_PACKAGES = ("gemma-search", "torch", "transformers", "peft", "accelerate", "datasets", "optuna")


def export_study(name: str, url: str, out_dir: str | Path, *, top_k: int = 10) -> dict[str, Path]:
    """Write the export files for the best trial of study `name`; return their paths."""
    import optuna
    import yaml

    study, spec = load_study(name, url)
    # With verification re-runs, the best mean over new seeds; else the best single trial.
    pick = export_pick(study, spec, load_companion(study, url))
    if pick is None:
        raise StorageError(f"study {name!r} in {redact(url)} has no completed trial yet; run "
                           "workers first (`gemma-search launch`) and export when one finished")
    best = next(t for t in study.get_trials(deepcopy=False) if t.number == pick["trial"])
    chosen = pick if pick["by"] == "mean" else None
    if chosen is not None:
        selection: dict[str, Any] = {
            "by": f"best mean {spec.objective.metric} over {chosen['n']} new seed(s) "
                  "(gemma-search verify)",
            "mean": chosen["mean"], "std": chosen["std"], "seeds": chosen["seeds"],
            "values": chosen["values"], "verify_trials": chosen["verify_trials"],
            "verify_study": chosen["verify_study"],
            "best_single_trial": chosen["best_single_trial"],
            "best_single_value": chosen["best_single_value"]}
    else:
        selection = {"by": f"best single trial by {spec.objective.metric}; run `gemma-search "
                           "verify` to re-check the top trials on new seeds"}
    cfg = trial_config(optuna.trial.FixedTrial(best.params), spec)
    # Everything fixed: nothing left to warm-start.
    best_spec = dataclasses.replace(spec, name=f"{spec.name}-best",
                                    search=fixed_search(spec, cfg), warm_start=WarmStartSpec())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / key for key in ("best_config.yaml", "training_args.json",
                                        "lora_config.json", "provenance.json",
                                        "leaderboard.csv")}
    header = (f"# Best trial {best.number} of study {spec.name!r}: {spec.objective.metric} = "
              f"{best.value:.6g}\n# Re-run it: gemma-search create best_config.yaml && "
              "gemma-search launch " + best_spec.name + "\n")
    if chosen is not None:
        spread = "" if chosen["std"] is None else f" +- {chosen['std']:.3g}"
        header += (f"# Chosen by its mean over {chosen['n']} new seed(s): "
                   f"{chosen['mean']:.6g}{spread}\n")
    paths["best_config.yaml"].write_text(header + dump_spec(best_spec))
    hf_args, notes = training_args_kwargs(spec, cfg, output_dir=str(out / "checkpoints"))
    paths["training_args.json"].write_text(json.dumps(hf_args, indent=2) + "\n")
    paths["lora_config.json"].write_text(json.dumps(lora_config_kwargs(spec, cfg), indent=2)
                                         + "\n")
    provenance = {
        "study": spec.name,
        "trial_number": best.number,
        "value": best.value,
        "metric": spec.objective.metric,
        "direction": spec.direction,
        "params": best.params,
        "selection": selection,
        "metrics": {k: v for k, v in best.user_attrs.items() if isinstance(v, int | float)},
        "base_model": spec.model.name_or_path,
        "base_model_revision": spec.model.revision,
        "data_fingerprint": best.user_attrs.get("data_fingerprint"),
        "spec_hash": spec_hash(spec),
        "storage": redact(url),
        "packages": _versions(),
        "notes": notes,
    }
    paths["provenance.json"].write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    _write_leaderboard(paths["leaderboard.csv"], leaderboard(study, spec, top_k))
    yaml.safe_load(paths["best_config.yaml"].read_text())  # the file we wrote must parse
    return paths


def training_args_kwargs(spec: StudySpec, cfg: TrialConfig, *,
                         output_dir: str) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments `transformers.TrainingArguments` accepts, and what did not map."""
    notes: list[str] = []
    if cfg.optimizer == "adam" and cfg.weight_decay > 0:
        notes.append("optimizer adam (L2 weight decay) exported as adamw_torch (decoupled "
                     "decay); best_config.yaml keeps the exact setting")
    if cfg.optimizer == "adabelief":
        notes.append("optimizer adabelief has no TrainingArguments name; exported as "
                     "adamw_torch; use pytorch_optimizer.AdaBelief via `optimizers=` for the "
                     "exact setting")
    if cfg.l1_penalty > 0 or cfg.token_dropout > 0:
        notes.append("l1_penalty and token_dropout have no TrainingArguments field; see "
                     "best_config.yaml")
    args: dict[str, Any] = {
        "output_dir": output_dir,
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.micro_batch_size,
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
    if cfg.max_tokens is not None:
        notes.append(f"trials stopped after {cfg.max_tokens} training tokens; set max_steps "
                     "to match your data")
    return args, notes


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


def leaderboard(study: Any, spec: StudySpec, top_k: int) -> list[dict[str, Any]]:
    """The `top_k` best search trials (`ranking.ranked_trials`), with params and metrics."""
    rows = []
    for rank, t in enumerate(ranked_trials(study, spec)[:top_k], start=1):
        row: dict[str, Any] = {"rank": rank, "trial": t.number, "value": t.value}
        row.update(t.params)
        row.update({k: v for k, v in t.user_attrs.items() if isinstance(v, int | float)})
        rows.append(row)
    return rows


def _write_leaderboard(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
