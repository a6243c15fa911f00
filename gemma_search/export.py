"""Export a study's best trial in forms that standard tools load.

    best_config.yaml    the full spec with every setting fixed at the best trial's values
                        (`gemma-search create best_config.yaml` re-runs exactly that config)
    training_args.json  `transformers.TrainingArguments(**json.load(f))`
    lora_config.json    `peft.LoraConfig(**json.load(f))`
    provenance.json     study, trial, value, base model and revision, data fingerprint,
                        package versions, spec hash
    leaderboard.csv     the top trials with their params and metrics
    data.json           the examples the trial used, prompt, labels, head and loss
    early_stopping.json `transformers.EarlyStoppingCallback(**...)` (trials with patience)
    sft_config.json     `trl.SFTConfig(**...)` (causal_lm)
    reproduce.py        re-trains the trial with plain transformers + peft (+ TRL) from the
                        files above and prints each evaluation and the best, which is the
                        trial's recorded value
"""

from __future__ import annotations

import csv
import dataclasses
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from gemma_search.baselines import BASELINES_ATTR, compare_to_baselines
from gemma_search.errors import GemmaSearchError, StorageError
from gemma_search.hf_config import (
    data_description,
    early_stopping_kwargs,
    lora_config_kwargs,
    sft_config_kwargs,
    training_args_kwargs,
)
from gemma_search.promotion import PAUSED, is_paused
from gemma_search.ranking import ranked_trials
from gemma_search.reads import read_trials
from gemma_search.space import fixed_search, trial_config
from gemma_search.spec import (
    MAX_NAME_CHARS,
    StudySpec,
    WarmStartSpec,
    dump_spec,
    spec_hash,
    without_secrets,
)
from gemma_search.storage import redact
from gemma_search.study import load_study
from gemma_search.train.config import TrialConfig
from gemma_search.verify import export_pick, load_companion

__all__ = ["export_study", "leaderboard", "lora_config_kwargs", "training_args_kwargs"]

_PACKAGES = ("gemma-search", "torch", "transformers", "peft", "accelerate", "datasets", "optuna")


def export_study(name: str, url: str, out_dir: str | Path, *, top_k: int = 10) -> dict[str, Path]:
    """Write the export files for the best trial of study `name`; return their paths.

    The study's trials are read once (`reads.read_trials`), its companion's once when it
    was verified; the pick, the trial and the leaderboard all come from those lists.
    """
    import optuna
    import yaml

    study, spec = load_study(name, url)
    trials = read_trials(study)
    # With verification re-runs, the best mean over new seeds; else the best single trial.
    # (export_pick reads the companion's trials, once, when there is one.)
    pick = export_pick(study, spec, load_companion(study, url), trials=trials)
    if pick is None:
        raise StorageError(f"study {name!r} in {redact(url)} has no completed trial yet; run "
                           "workers first (`gemma-search launch`) and export when one finished")
    # The ranking's copy: a paused trial there carries its best value so far.
    best = next((t for t in ranked_trials(trials, spec) if t.number == pick["trial"]),
                None) or next(t for t in trials if t.number == pick["trial"])
    paused = best.system_attrs.get(PAUSED) if is_paused(best) else None
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
    # Without the storage password: a shared file (the study's spec has none, unless an
    # earlier gemma-search stored it).
    best_spec = dataclasses.replace(without_secrets(spec), name=_best_name(spec.name),
                                    search=fixed_search(spec, cfg), warm_start=WarmStartSpec())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: _inside(out, key) for key in ("best_config.yaml", "training_args.json",
                                                "lora_config.json", "provenance.json",
                                                "leaderboard.csv")}
    header = (f"# Best trial {best.number} of study {spec.name!r}: {spec.objective.metric} = "
              f"{best.value:.6g}\n# Re-run it: gemma-search create best_config.yaml && "
              "gemma-search launch " + best_spec.name + "\n")
    if paused is not None:
        header += (f"# Paused after evaluation {paused['eval']} (pruner.pause): its value is "
                   "the best so far, before the rest of its planned steps\n")
    if chosen is not None:
        spread = "" if chosen["std"] is None else f" +- {chosen['std']:.3g}"
        header += (f"# Chosen by its mean over {chosen['n']} new seed(s): "
                   f"{chosen['mean']:.6g}{spread}\n")
    paths["best_config.yaml"].write_text(header + dump_spec(best_spec))
    schedule = best.user_attrs.get("schedule")
    hf_args, notes = training_args_kwargs(spec, cfg, output_dir=str(out / "checkpoints"),
                                          schedule=schedule)
    _write_json(paths["training_args.json"], hf_args)
    _write_json(paths["lora_config.json"], lora_config_kwargs(spec, cfg))
    paths.update(_write_reproduction(out, spec, cfg, best, hf_args))
    provenance = {
        "study": spec.name,
        "trial_number": best.number,
        "value": best.value,
        "value_is": ("the best of the trial's evaluations (a trial's value; reproduce.py "
                     "prints every evaluation and this best)"),
        "metric": spec.objective.metric,
        "direction": spec.direction,
        "params": best.params,
        "selection": selection,
        # A trial the budget left paused at a rung: how far it trained.
        "paused": paused,
        # What the trial must beat: the untrained start and the trivial predictor.
        "baselines": compare_to_baselines(spec, study.user_attrs.get(BASELINES_ATTR),
                                          best.value),
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
    _write_leaderboard(paths["leaderboard.csv"], leaderboard(trials, spec, top_k))
    yaml.safe_load(paths["best_config.yaml"].read_text())  # the file we wrote must parse
    return paths


def leaderboard(study: Any, spec: StudySpec, top_k: int) -> list[dict[str, Any]]:
    """The `top_k` best search trials (`ranking.ranked_trials`), with params and metrics.

    `study`: an Optuna study, or its trials already read (`reads.read_trials`)."""
    rows = []
    for rank, t in enumerate(ranked_trials(study, spec)[:top_k], start=1):
        # A trial left paused at a rung: its value is its best so far, after this evaluation.
        paused_after = t.system_attrs[PAUSED]["eval"] if is_paused(t) else None
        row: dict[str, Any] = {"rank": rank, "trial": t.number, "value": t.value,
                               "paused_after_eval": paused_after}
        row.update(t.params)
        row.update({k: v for k, v in t.user_attrs.items() if isinstance(v, int | float)})
        rows.append(row)
    return rows


def _write_reproduction(out: Path, spec: StudySpec, cfg: TrialConfig, trial: Any,
                        hf_args: dict[str, Any]) -> dict[str, Path]:
    """data.json, early_stopping.json (with patience), sft_config.json (causal_lm) and
    reproduce.py, the standalone script that re-trains the trial from these files."""
    from importlib import resources

    schedule = trial.user_attrs.get("schedule")
    written = {name: _inside(out, name) for name in ("data.json", "reproduce.py")}
    _write_json(written["data.json"], data_description(spec, cfg, schedule,
                                                       trial.user_attrs.get("engine")))
    stopping = early_stopping_kwargs(cfg)
    _inside(out, "early_stopping.json").unlink(missing_ok=True)  # a re-export of another trial
    if stopping is not None:
        written["early_stopping.json"] = _inside(out, "early_stopping.json")
        _write_json(written["early_stopping.json"], stopping)
    _inside(out, "sft_config.json").unlink(missing_ok=True)
    if cfg.task == "causal_lm":
        written["sft_config.json"] = _inside(out, "sft_config.json")
        _write_json(written["sft_config.json"], sft_config_kwargs(spec, cfg, hf_args))
    script = resources.files("gemma_search").joinpath("reproduce.py").read_text()
    written["reproduce.py"].write_text(script)
    return written


def _best_name(name: str) -> str:
    """The name of the best config's study: NAME-best, cut to the spec's name limit."""
    suffix = "-best"
    return name[:MAX_NAME_CHARS - len(suffix)] + suffix


def _inside(root: Path, name: str) -> Path:
    """`root / name`, refused if it resolves outside `root`: a symlink left in the export
    folder would otherwise have the export overwrite whatever it points at."""
    path = root / name
    real, top = path.resolve(), root.resolve()
    if not real.is_relative_to(top):
        raise GemmaSearchError(f"{path} links to {real}, outside the export folder {top}; "
                               "remove the link or export into another folder")
    return path


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


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
