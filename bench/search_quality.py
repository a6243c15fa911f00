"""Search quality: which sampler + pruner finds the best config for the least compute.

    python bench/search_quality.py --data ../shared/data/sst2 --write-docs   # ~1 h, 2 cores
    python bench/search_quality.py --data ../shared/data/sst2 --quick        # smoke, < 2 min

On a subset of SST-2 (a dataset the project did not write; read from `--data`, never copied)
it builds a tiny Gemma 2 whose tokenizer is trained on SST-2 training sentences, pretrains it
as a causal LM on those sentences without their labels (`bench/pretrain_base.py`, cached in
`--work`; `--random-base` skips this and searches on the random model), then runs the same
trial budget under each strategy (sampler + pruner) and sampler seed, through the project's
real path: `study.create_study` in a SQLite file per study, `worker.run_worker`
in-process (one worker: sequential, reproducible for a sampler seed), trials read back from
Optuna. Compute is counted in training tokens (`tokens_trained` of every trial, pruned ones
included). Per strategy it reports the best validation loss (completed trials, as `export`
picks) and that trial's accuracy, the compute spent, the compute needed to come within 1% of
the no-pruning best (tpe+none, same seed), and whether it beats random+none at equal compute.

A linear probe of the frozen base (random and pretrained) says how much sentiment it knows
before any search; the results and the docs section name the base and give its figures.

Raw results go to `--out` (JSON), the table to stdout, the best-so-far-vs-compute plot to
`--png`; `--write-docs` replaces this benchmark's section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2"
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- bench/search_quality.py: begin (generated; a re-run replaces it) -->"
END = "<!-- bench/search_quality.py: end -->"

#: The project default (tpe+median: SamplerSpec / PrunerSpec defaults), the baselines the
#: issue names, and a candidate rung schedule for Hyperband.
STRATEGIES: dict[str, dict[str, Any]] = {
    # The default before this benchmark; its values are spelled out so that the row keeps
    # its meaning (and its studies stay reusable) whatever PrunerSpec's defaults become.
    "tpe+hyperband": {"sampler": "tpe", "pruner": {
        "type": "hyperband", "min_resource": 1, "reduction_factor": 3}},
    "tpe+median": {"sampler": "tpe", "pruner": {"type": "median"}},
    "random+median": {"sampler": "random", "pruner": {"type": "median"}},
    "tpe+none": {"sampler": "tpe", "pruner": {"type": "none"}},
    "random+none": {"sampler": "random", "pruner": {"type": "none"}},
    "tpe+hyperband(min2,rf2)": {"sampler": "tpe", "pruner": {
        "type": "hyperband", "min_resource": 2, "reduction_factor": 2}},
    # Trials pause at rungs 1, 3, 9 and the best are resumed (gemma_search.promotion). Its
    # budget is compute, not a trial count: a third of what the no-pruning search may
    # train (max_trials x max_tokens_per_trial), with room for as many trials as that buys.
    "tpe+asha-pause": {"sampler": "tpe", "pruner": {
        "type": "asha", "pause": "true", "min_resource": 1, "reduction_factor": 3},
        "token_fraction": 1 / 3, "trials_factor": 5},
    # The same with later rungs, where the ranking of early evaluations starts to hold:
    # rungs at 4 and 8 (half go on at each), and at 2 and 6 (a third).
    "tpe+asha-pause(min4,rf2)": {"sampler": "tpe", "pruner": {
        "type": "asha", "pause": "true", "min_resource": 4, "reduction_factor": 2},
        "token_fraction": 1 / 3, "trials_factor": 5},
    "tpe+asha-pause(min2,rf3)": {"sampler": "tpe", "pruner": {
        "type": "asha", "pause": "true", "min_resource": 2, "reduction_factor": 3},
        "token_fraction": 1 / 3, "trials_factor": 5},
    # Random search stopped at a third of the no-pruning compute (`budget.max_tokens` starts
    # no trial past it): the equal-compute baseline of tpe+asha-pause, for a third of the cost
    # of random+none. It answers "vs random at equal compute" only for strategies that spent
    # no more than it did.
    "random+none(third)": {"sampler": "random", "pruner": {"type": "none"},
                           "token_fraction": 1 / 3},
}
DEFAULT_STRATEGY = "tpe+median"
REFERENCE = "tpe+none"
RANDOM_BASELINE = "random+none"
RANDOM_THIRD = "random+none(third)"
WITHIN = 0.01
VOCAB, INIT = 4096, 0.02  # "within 1% of the no-pruning best"


@dataclass(frozen=True)
class Scale:
    """How big one run is: data subset, trial budget and evaluation points."""

    max_trials: int
    max_train_examples: int
    max_validation_examples: int
    max_seq_len: int
    max_tokens_per_trial: int
    eval_every_tokens: int
    micro_batch_size: int


FULL = Scale(max_trials=20, max_train_examples=8000, max_validation_examples=400,
             max_seq_len=48, max_tokens_per_trial=80_000, eval_every_tokens=8_000,
             micro_batch_size=32)
QUICK = Scale(max_trials=3, max_train_examples=300, max_validation_examples=48,
              max_seq_len=32, max_tokens_per_trial=2_400, eval_every_tokens=600,
              micro_batch_size=16)

SEARCH = """
search:
  learning_rate: {low: 1.0e-5, high: 1.0e-1, log: true}
  micro_batch_size: MICRO
  gradient_accumulation_steps: {choices: [1, 2]}
  epochs: 20
  optimizer: {choices: [adamw, adabelief, sgd]}
  momentum: {low: 0.5, high: 0.95}
  lr_schedule: {choices: [cosine, linear, constant]}
  warmup_ratio: {low: 0.0, high: 0.1}
  weight_decay: {low: 0.0, high: 0.1}
  lora_r: {choices: [4, 8, 16]}
  lora_alpha: {choices: [8, 16, 32]}
  lora_dropout: {low: 0.0, high: 0.1}
  lora_targets: {choices: [attention, all_linear]}
  max_grad_norm: {choices: [0.3, 1.0]}
"""


def spec_text(name: str, model: Path, data: Path, work: Path, scale: Scale, sampler: str,
              seed: int, pruner: dict[str, Any], token_fraction: float | None = None,
              trials_factor: int = 1) -> str:
    """The study spec: SST-2 subset, a search space like the shipped study sst2_gemma2_9b
    scaled to the tiny model, the strategy's sampler and pruner (unset keys keep the spec
    defaults)."""
    pruner_yaml = "{" + ", ".join(f"{k}: {v}" for k, v in pruner.items()) + "}"
    return f"""
name: {name}
model:
  name_or_path: {model}
  dtype: float32
  attn_implementation: eager
  lora_target_modules:
    attention: [embed_tokens, q_proj, k_proj, v_proj, o_proj]
    all_linear: [embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
task: {{type: classification, text_column: sentence, label_column: label,
        labels: [negative, positive]}}
data:
  train: {data / 'train.tsv'}
  validation: {data / 'dev.tsv'}
  rename_columns: {{content: sentence}}
  max_seq_len: {scale.max_seq_len}
  max_train_examples: {scale.max_train_examples}
  max_validation_examples: {scale.max_validation_examples}
{SEARCH.replace('MICRO', str(scale.micro_batch_size))}
objective: {{metric: val_loss}}
sampler: {{type: {sampler}, seed: {seed}}}
pruner: {pruner_yaml}
budget:
  max_trials: {scale.max_trials * trials_factor}
  max_tokens_per_trial: {scale.max_tokens_per_trial}
  eval_every_tokens: {scale.eval_every_tokens}
  max_tokens: {'null' if token_fraction is None else
               round(token_fraction * scale.max_trials * scale.max_tokens_per_trial)}
checkpoints: {{dir: {work / 'checkpoints' / name}, every_steps: 100000000}}
"""


def build_model(data: Path, work: Path) -> Path:
    """A tiny Gemma 2 with a tokenizer trained on SST-2 training sentences (built once)."""
    from gemma_search.tiny import make_tiny_model

    out = work / f"tiny-gemma2-sst2-v{VOCAB}-init{INIT}"
    if (out / "config.json").is_file():
        return out
    lines = (data / "train.tsv").read_text().splitlines()[1:20001]
    texts = [line.split("\t", 1)[1] for line in lines if "\t" in line]
    texts += ["positive", "negative"] * 100
    return make_tiny_model(out, texts, vocab_size=VOCAB, initializer_range=INIT)


def prepare_base(data: Path, work: Path, quick: bool, random_base: bool,
                 threads: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The base model the searches run on and what the results record about it.

    Pretrained (default): `pretrain_base.ensure_base` on the random tiny model, trained once
    per settings and data and then reused, with `threads` torch threads (None: its default,
    1). `random_base`: the random model itself.
    """
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import pretrain_base as pb

    model = build_model(data, work)
    probe = pb.QUICK_PROBE if quick else pb.FULL_PROBE
    if random_base:
        p = pb.random_probe(model, data, probe)
        return model, {"kind": "random", "path": str(model),
                       "probe_settings": p["settings"],
                       "probe_dev_accuracy": p["random"]["dev_accuracy"],
                       "probe_random_dev_accuracy": p["random"]["dev_accuracy"],
                       "probe_pretrained_dev_accuracy": None, "pretrain": None}
    settings = pb.QUICK_PRETRAIN if quick else pb.FULL_PRETRAIN
    b = pb.ensure_base(model, data, work, settings, probe, threads=threads or 1)
    after = b["probe"]["pretrained"]["dev_accuracy"]
    return Path(b["path"]), {
        "kind": "pretrained", "path": b["path"], "probe_settings": b["probe"]["settings"],
        "probe_dev_accuracy": after,
        "probe_random_dev_accuracy": b["probe"]["random"]["dev_accuracy"],
        "probe_pretrained_dev_accuracy": after,
        "pretrain": {k: b[k] for k in ("key", "reused", "settings", "seconds", "threads",
                                       "train_sentences", "tokens_trained",
                                       "tokens_per_pass",
                                       "final_train_loss", "date")}}


def run_study(strategy: str, seed: int, model: Path, data: Path, work: Path,
              scale: Scale) -> dict[str, Any]:
    """One study: create it in its own SQLite file, run one worker to the end, read back.

    `work` holds the study's database and checkpoints: one folder per base model.
    """
    import optuna

    from gemma_search.spec import spec_from_text
    from gemma_search.study import create_study
    from gemma_search.worker import run_worker

    s = STRATEGIES[strategy]
    safe = "".join(c if c.isalnum() else "-" for c in strategy).strip("-")
    name = f"sq-{safe}-s{seed}"
    db_path = work / "studies" / f"{name}.db"
    db_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{db_path}"
    spec = spec_from_text(spec_text(name, model, data, work, scale, s["sampler"], seed,
                                    s["pruner"], s.get("token_fraction"),
                                    s.get("trials_factor", 1)))
    reused = db_path.is_file() and _finished_study(name, url, spec)
    if not reused:
        db_path.unlink(missing_ok=True)
        create_study(spec, url)
        started = time.perf_counter()
        run_worker(name, url)
        loaded = optuna.load_study(study_name=name, storage=url)
        loaded.set_user_attr("bench_wall_seconds", round(time.perf_counter() - started, 1))
        loaded.set_user_attr("bench_finished", True)
    study = optuna.load_study(study_name=name, storage=url)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    finished.sort(key=lambda t: (t.datetime_complete, t.number))
    # Trials left paused at a rung when the budget ran out trained too. When is not recorded
    # by trial, so they come first in the compute curve: figures of compute to reach a loss
    # then err on the high side.
    paused = [t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("paused")]
    # The worker's run, timed; a study from before that was recorded: first start to last
    # completion (short for a pausing study, whose last trials end paused, untimed).
    wall = study.user_attrs.get("bench_wall_seconds") or (
        (finished[-1].datetime_complete - min(t.datetime_start for t in finished)
         ).total_seconds() if finished else 0.0)
    trials = [{
        "number": t.number, "state": "PAUSED", "tokens": int(t.system_attrs["paused"]["tokens"]),
        "val_loss": None, "accuracy": None, "evals": len(t.intermediate_values),
        "params": t.params} for t in paused] + [{
        "number": t.number,
        "state": t.state.name,
        "tokens": int(t.user_attrs.get("tokens_trained", 0)),
        # value: the trial's best evaluation; only completed trials count as found configs
        "val_loss": t.value if t.state.name == "COMPLETE" else None,
        "accuracy": t.user_attrs.get("accuracy") if t.state.name == "COMPLETE" else None,
        "evals": len(t.intermediate_values),
        # (evaluation, value) pairs: how early evaluations foretell the last (`correlations`)
        "curve": sorted(t.intermediate_values.items()),
        "params": t.params,
    } for t in finished]
    return {"strategy": strategy, "seed": seed, "wall_seconds": wall, "reused": reused,
            "trials": trials,
            "pruner": {**dataclass_dict(spec.pruner)}, "sampler": dataclass_dict(spec.sampler)}


def _finished_study(name: str, url: str, spec: Any) -> bool:
    """True when `url` already holds this study, run to its budget: an interrupted benchmark
    resumes by reusing the studies it finished.

    The stored spec must agree on every key that both it and this spec have; keys added to
    the spec schema since (new fields, at their defaults) do not force a re-run.
    """
    import optuna
    import yaml

    from gemma_search import db
    from gemma_search.spec import dump_spec

    try:
        stored = db.load_study_spec(db.make_engine(url), name)
        study = optuna.load_study(study_name=name, storage=url)
    except Exception:  # a half-written file: run the study again
        return False
    if stored is None:
        return False
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
    return _agree(yaml.safe_load(stored[0]), yaml.safe_load(dump_spec(spec))) and \
        (done >= spec.budget.max_trials or bool(study.user_attrs.get("bench_finished")))


def _agree(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_agree(a[k], b[k]) for k in a.keys() & b.keys())
    return bool(a == b)


def dataclass_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------- analysis


def curve(trials: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """Best-so-far (cumulative tokens, val_loss, accuracy) after each trial, in completion
    order; points start at the first completed trial."""
    out: list[tuple[int, float, float]] = []
    tokens, best, acc = 0, math.inf, math.nan
    for t in trials:
        tokens += t["tokens"]
        if t["val_loss"] is not None and t["val_loss"] < best:
            best, acc = t["val_loss"], t["accuracy"] if t["accuracy"] is not None else math.nan
        if best < math.inf:
            out.append((tokens, best, acc))
    return out


def best_at(points: list[tuple[int, float, float]], tokens: float) -> float:
    """Best loss found within `tokens` of compute (inf when nothing had completed)."""
    found = [loss for t, loss, _ in points if t <= tokens]
    return min(found) if found else math.inf


def tokens_to_reach(points: list[tuple[int, float, float]], target: float) -> int | None:
    return next((t for t, loss, _ in points if loss <= target), None)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run and per-strategy figures: best loss/accuracy, compute, compute to target."""
    by = {(r["strategy"], r["seed"]): r for r in runs}
    for r in runs:
        pts = curve(r["trials"])
        r["curve"] = pts
        r["total_tokens"] = sum(t["tokens"] for t in r["trials"])
        r["best_val_loss"] = pts[-1][1] if pts else None
        r["best_accuracy"] = pts[-1][2] if pts else None
        r["n_pruned"] = sum(1 for t in r["trials"] if t["state"] in ("PRUNED", "PAUSED"))
        ref = by.get((REFERENCE, r["seed"]))
        ref_best = ref and curve(ref["trials"])
        r["reference_best"] = ref_best[-1][1] if ref_best else None
        r["reference_tokens"] = (sum(t["tokens"] for t in ref["trials"]) if ref else None)
        r["tokens_to_within"] = (tokens_to_reach(pts, r["reference_best"] * (1 + WITHIN))
                                 if r["reference_best"] is not None else None)
        rnd = by.get((RANDOM_BASELINE, r["seed"])) or by.get((RANDOM_THIRD, r["seed"]))
        if rnd is not None and rnd["strategy"] == RANDOM_THIRD and \
                sum(t["tokens"] for t in rnd["trials"]) < r["total_tokens"]:
            rnd = None  # stopped by its token budget short of this strategy's compute
        if rnd is not None and r["total_tokens"] > 0 and r["strategy"] != rnd["strategy"]:
            mine = best_at(pts, r["total_tokens"])
            theirs = best_at(curve(rnd["trials"]), r["total_tokens"])
            r["random_at_equal_compute"] = None if theirs == math.inf else theirs
            r["beats_random_at_equal_compute"] = mine < theirs
            r["vs_random_at_equal_compute"] = ("win" if mine < theirs else
                                               "tie" if mine == theirs else "loss")
        else:
            r["random_at_equal_compute"] = r["beats_random_at_equal_compute"] = None
            r["vs_random_at_equal_compute"] = None
    strategies: dict[str, Any] = {}
    for name in dict.fromkeys(r["strategy"] for r in runs):
        rs = [r for r in runs if r["strategy"] == name]
        reached = [r["tokens_to_within"] for r in rs]
        fractions = [r["tokens_to_within"] / r["reference_tokens"] for r in rs
                     if r["tokens_to_within"] is not None and r["reference_tokens"]]
        strategies[name] = {
            "seeds": [r["seed"] for r in rs],
            "best_val_loss": [r["best_val_loss"] for r in rs],
            "best_accuracy": [r["best_accuracy"] for r in rs],
            "total_tokens": [r["total_tokens"] for r in rs],
            "n_pruned": [r["n_pruned"] for r in rs],
            "tokens_to_within": reached,
            "fraction_of_reference_compute": fractions,
            "beats_random_at_equal_compute": [r["beats_random_at_equal_compute"] for r in rs],
            "vs_random_at_equal_compute": [r["vs_random_at_equal_compute"] for r in rs],
            "wall_seconds": [r["wall_seconds"] for r in rs],
        }
    return strategies


def correlations(runs: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """For the strategies that run every trial to its end (no pruning), per evaluation k
    before the last: Spearman's rank correlation between the complete trials' loss at k and
    their value, the mean over seeds. Near 1, an early evaluation ranks trials as they end,
    and stopping or pausing there costs little; near 0 or below, it misleads."""
    from scipy.stats import spearmanr

    out: dict[str, list[float | None]] = {}
    for name in dict.fromkeys(r["strategy"] for r in runs):
        if STRATEGIES[name]["pruner"]["type"] != "none":
            continue
        per_seed = []
        for r in (r for r in runs if r["strategy"] == name):
            done = [t for t in r["trials"] if t["val_loss"] is not None and t.get("curve")]
            if len(done) < 3:
                continue
            evaluations = min(len(t["curve"]) for t in done)
            per_seed.append([float(spearmanr([t["curve"][k][1] for t in done],
                                             [t["val_loss"] for t in done]).statistic)
                             for k in range(evaluations - 1)])
        if per_seed:
            width = min(len(row) for row in per_seed)
            # NaN: a seed whose losses at k all tie says nothing there
            defined = [[row[k] for row in per_seed if not math.isnan(row[k])]
                       for k in range(width)]
            out[name] = [statistics.mean(v) if v else None for v in defined]
    return out


def correlation_table(corr: dict[str, list[float | None]]) -> str:
    width = max((len(v) for v in corr.values()), default=0)
    lines = ["| rank correlation with the final value, at evaluation | "
             + " | ".join(str(k + 1) for k in range(width)) + " |",
             "|" + " --- |" * (width + 1)]
    lines += [f"| `{name}` | " + " | ".join("n/a" if v is None else f"{v:+.2f}" for v in row)
              + " |" for name, row in corr.items()]
    return "\n".join(lines)


def _ms(values: list[Any], fmt: str, scale: float = 1.0) -> str:
    vals = [v / scale for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"


def table(strategies: dict[str, Any]) -> str:
    head = ("| strategy | best val loss | accuracy | compute (k tokens) | "
            "pruned or paused trials | "
            f"k tokens to within 1% of {REFERENCE} best (per seed) | vs {RANDOM_BASELINE} "
            "at equal compute (win-tie-loss) | wall s |")
    lines = [head, "|" + " --- |" * 8]
    for name, s in strategies.items():
        reach = ", ".join("never" if t is None else f"{t / 1000:.0f}"
                          for t in s["tokens_to_within"])
        vs = s["vs_random_at_equal_compute"]
        beat = ("n/a" if all(v is None for v in vs) else
                "-".join(str(vs.count(k)) for k in ("win", "tie", "loss")))
        lines.append(f"| {name} | {_ms(s['best_val_loss'], '.4f')} | "
                     f"{_ms(s['best_accuracy'], '.3f')} | "
                     f"{_ms(s['total_tokens'], '.0f', 1000)} | "
                     f"{_ms(s['n_pruned'], '.1f')} | {reach} | {beat} | "
                     f"{_ms(s['wall_seconds'], '.0f')} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["strategy"] for r in runs))
    colours = {n: plt.get_cmap("tab10")(i) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for r in runs:
        pts = r["curve"]
        if not pts:
            continue
        xs = [p[0] / 1000 for p in pts] + [r["total_tokens"] / 1000]
        style = "-" if r["strategy"] in (DEFAULT_STRATEGY, REFERENCE) else "--"
        for ax, k in ((axes[0], 1), (axes[1], 2)):
            ys = [p[k] for p in pts]
            ax.step(xs, ys + ys[-1:], where="post", color=colours[r["strategy"]],
                    linestyle=style, alpha=0.8, linewidth=1.4,
                    label=r["strategy"] if r["seed"] == min(x["seed"] for x in runs
                                                             if x["strategy"] == r["strategy"])
                    else None)
            ax.plot(xs[-1], ys[-1], "o", color=colours[r["strategy"]], markersize=3)
    axes[0].set_ylabel("best validation loss so far")
    axes[1].set_ylabel("accuracy of that trial")
    for ax in axes:
        ax.set_xlabel("compute: training tokens, all trials (thousands)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Search quality on SST-2 (tiny Gemma 2, CPU): best-so-far vs compute, "
                 "one line per sampler seed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(strategies: dict[str, Any]) -> list[str]:
    """The issue's targets, checked for every pruned strategy: within 1% of the no-pruning
    best with <= 1/3 of its compute, and better than random search at equal compute."""
    ref = strategies.get(REFERENCE)
    if ref is None:
        return []
    out = []
    ref_losses = [v for v in ref["best_val_loss"] if v is not None]
    noise = statistics.stdev(ref_losses) if len(ref_losses) > 1 else None
    if noise is not None:
        out.append(f"- Seed noise: the {REFERENCE} best is {statistics.mean(ref_losses):.4f} "
                   f"± {noise:.4f} (std over seeds).")
    for name, d in strategies.items():
        if name in (REFERENCE, RANDOM_BASELINE, RANDOM_THIRD):
            continue
        fr = d["fraction_of_reference_compute"]
        reached = sum(1 for t in d["tokens_to_within"] if t is not None)
        mine = [v for v in d["best_val_loss"] if v is not None]
        share = statistics.mean(d["total_tokens"]) / statistics.mean(ref["total_tokens"])
        line = (f"- **{name}**: within 1% of the {REFERENCE} best in {reached} of "
                f"{len(d['seeds'])} seeds, after "
                + (", ".join(f"{f:.0%}" for f in fr) if fr else "-")
                + f" of {REFERENCE}'s compute; spent {share:.0%} of it in all")
        if noise and mine:
            gap = (statistics.mean(mine) - statistics.mean(ref_losses)) / noise
            line += f"; mean best {gap:+.1f} std from {REFERENCE}'s"
        vs = d["vs_random_at_equal_compute"]
        if any(v is not None for v in vs):
            line += (f"; vs {RANDOM_BASELINE} at equal compute: {vs.count('win')} wins, "
                     f"{vs.count('tie')} ties (same best trial), {vs.count('loss')} losses")
        out.append(line + ".")
    return out


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                   check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model}), no GPU"


def base_text(result: dict[str, Any]) -> str:
    """What the docs say about the base model the searches ran on, from the results."""
    base = result.get("base")
    if base is None:  # results from before the base was recorded: the random base
        return ("The tokenizer is trained on SST-2 training sentences; the base model is "
                "random (the tiny Gemma 2 of the tests; these results predate the base "
                "record and the linear probe), so LoRA + the classification head learn the "
                "task from scratch. The benchmark's spec adds `embed_tokens` to both LoRA "
                "target sets: the adapters can then learn word meanings.")
    ps = base["probe_settings"]
    probe = (f"A linear probe of the frozen base (logistic regression on the mean-pooled "
             f"last hidden states of {ps['n_train']:,} training sentences, accuracy on "
             f"`dev.tsv`) gives {base['probe_random_dev_accuracy']:.1%} on the random base")
    if base["kind"] == "random":
        return ("The tokenizer is trained on SST-2 training sentences. The base model is "
                "**random** (the tiny Gemma 2 of the tests, run with `--random-base`), so "
                "LoRA and the classification head learn the task from scratch and absolute "
                "accuracies are modest; what is compared is the search. " + probe
                + ": random 64-wide embeddings carry almost no sentiment, so the benchmark's "
                "spec adds `embed_tokens` to both LoRA target sets and the adapters can "
                "learn word meanings.")
    pt = base["pretrain"]
    st = pt["settings"]
    threads = f"{pt['threads']} torch thread" + ("s" if pt["threads"] != 1 else "")
    return ("The tokenizer is trained on SST-2 training sentences. The base model is the "
            "tiny Gemma 2 of the tests (64 wide, 2 layers, soft-caps, tied embeddings), "
            "**pretrained** by `bench/pretrain_base.py` as a causal LM on "
            f"{pt['train_sentences']:,} SST-2 training sentences without their labels: "
            f"{st['steps']} steps of {st['batch_size']} x {st['block_size']} tokens "
            f"({pt['tokens_trained'] / 1e6:.2f} M tokens, "
            f"{pt['tokens_trained'] / pt['tokens_per_pass']:.1f} passes), AdamW at "
            f"{st['learning_rate']:g} with warm-up and cosine decay; {pt['seconds']:.0f} s "
            f"with {threads} on {pt['date']} (cached in `--work` and reused). The searches "
            "then adapt a base that has seen the language, as LoRA adapts a pretrained "
            "checkpoint; `--random-base` runs them on the random model instead. " + probe
            + f" and {base['probe_pretrained_dev_accuracy']:.1%} on the pretrained one. The "
            "benchmark's spec adds `embed_tokens` to both LoRA target sets.")


def docs_section(result: dict[str, Any], png: Path) -> str:
    v = result["versions"]
    sc = result["scale"]
    rel_png = os.path.relpath(png, DOCS.parent)
    lines = [
        BEGIN,
        "## Search quality: which sampler and pruner find the best config for less compute",
        "",
        *textwrap.wrap(
            "`bench/search_quality.py` runs the same trial budget under each strategy "
            "(sampler + pruner) and sampler seed, on a subset of SST-2 with the tiny Gemma 2 "
            "on CPU, through the project's real path (`create_study` in SQLite, `run_worker` "
            "in-process, one worker). " + base_text(result), width=88,
            break_on_hyphens=False),
        "",
        f"Command, {result['date']}, on the {result['machine']}; torch {v['torch']}, "
        f"transformers {v['transformers']}, optuna {v['optuna']}; the studies' wall times "
        f"add up to {sum(r['wall_seconds'] for r in result['runs']) / 60:.0f} min "
        "(a finished study in `--work` is reused, so an interrupted run resumes):",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"- Data: `train.tsv` subset of {sc['max_train_examples']} examples (seeded, the same "
        f"for every study), `dev.tsv` subset of {sc['max_validation_examples']}, "
        f"max_seq_len {sc['max_seq_len']}.",
        f"- Budget: {sc['max_trials']} trials per study; each trial at most "
        f"{sc['max_tokens_per_trial']:,} training tokens (the LR schedule spans them, design "
        f"decision 11), evaluated every {sc['eval_every_tokens']:,} tokens "
        f"({sc['max_tokens_per_trial'] // sc['eval_every_tokens']} evaluation points; rung 1 "
        "= 10% of the budget). Sampler seeds: "
        f"{', '.join(str(s) for s in result['seeds'])}.",
        "- Search space: learning rate 1e-5..1e-1 (log), AdamW / AdaBelief / SGD, momentum, "
        "LR schedule, warmup, weight decay, gradient accumulation 1-2, LoRA r / alpha / "
        "dropout / targets, max grad norm.",
        "- Compute = training tokens of every trial, pruned ones included. Best = lowest "
        "val loss of a *completed* trial (what `export` picks), with that trial's accuracy. "
        f"\"Within 1%\": val loss <= 1.01 x the best of {REFERENCE} with the same sampler "
        "seed. \"At equal compute\": the strategy's best with all its compute vs the best "
        f"{RANDOM_BASELINE} had found by the time it had spent the same number of tokens.",
        "- Strategies: `sampler+pruner`; TPE with the `SamplerSpec` default n_startup_trials 5 "
        "(its first 5 trials are random, so TPE and random share them for a seed). Pruner "
        "keys not given take the `PrunerSpec` defaults (median: n_startup_trials 2, "
        "n_warmup_steps 1, i.e. prunable from the first evaluation, at 10% of the budget): "
        + "; ".join(f"`{n}` {STRATEGIES[n]['pruner']}" for n in result["summary"]) + ".",
        "",
        "Mean ± std over seeds:",
        "",
        result["table"],
        "",
        *result["verdict"],
        "",
        *(["How early evaluations foretell the final value (`correlations`: Spearman over "
           "the complete trials of each seed, mean over seeds):", "",
           correlation_table(result["correlations"]), ""]
          if result.get("correlations") else []),
        f"![best validation loss so far vs compute, per strategy and seed]({rel_png})",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_docs(section: str) -> None:
    text = DOCS.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding SST-2's train.tsv and dev.tsv")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gemma-search-bench"),
                        help="scratch folder: tiny model, study databases (a finished study "
                        "there with the same spec is reused, so a re-run resumes)")
    parser.add_argument("--out", type=Path, default=None,
                        help="raw results JSON (default WORK/search_quality.json)")
    parser.add_argument("--png", type=Path, default=None,
                        help="plot (default docs/img/search_quality.png; WORK/... with --quick)")
    parser.add_argument("--strategies", nargs="+", default=None, choices=list(STRATEGIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--trials", type=int, default=None, help="override max_trials")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 3 strategies x 1 seed x 3 small trials")
    parser.add_argument("--random-base", action="store_true",
                        help="search on the random tiny model, not the one pretrained on "
                        "SST-2's training text (for comparison)")
    parser.add_argument("--write-docs", action="store_true",
                        help="replace this benchmark's section of docs/benchmarks.md")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (pretraining the base: 1 unless given)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render table, plot and docs from a saved --out, no training")
    args = parser.parse_args()
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        result["summary"] = summarise(result["runs"])
        result["table"], result["verdict"] = table(result["summary"]), verdict(result["summary"])
        result["correlations"] = correlations(result["runs"])
        png = args.png or REPO / "docs" / "img" / "search_quality.png"
        plot(result["runs"], png)
        print(result["table"])
        print("\n".join(result["verdict"]))
        if args.write_docs:
            write_docs(docs_section(result, png))
        return
    data = args.data.resolve()
    if not (data / "train.tsv").is_file() or not (data / "dev.tsv").is_file():
        sys.exit(f"no SST-2 at {data}: pass --data FOLDER holding train.tsv and dev.tsv "
                 "(the GLUE SST-2 split, tab-separated, with sentence and label columns)")
    scale = QUICK if args.quick else FULL
    if args.trials:
        scale = Scale(**{**scale.__dict__, "max_trials": args.trials})
    strategies = args.strategies or ([DEFAULT_STRATEGY, REFERENCE, RANDOM_BASELINE]
                                     if args.quick else list(STRATEGIES))
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    work = args.work.resolve() / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or work / "search_quality.json"
    png = args.png or (work / "search_quality.png" if args.quick
                       else REPO / "docs" / "img" / "search_quality.png")

    import logging

    import optuna
    import torch
    import transformers

    from gemma_search.spec import PrunerSpec

    # Quick mode shares its cores with whatever else CI runs: one thread does not oversubscribe.
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("gemma_search").setLevel(logging.ERROR)
    started = time.perf_counter()
    model, base = prepare_base(data, work, args.quick, args.random_base, args.threads)
    print(f"{base['kind']} base {model} ready after {time.perf_counter() - started:.0f} s; "
          f"linear probe, dev accuracy: random {base['probe_random_dev_accuracy']:.3f}"
          + (f", pretrained {base['probe_pretrained_dev_accuracy']:.3f}"
             if base["kind"] == "pretrained" else ""), flush=True)
    # Studies on the random base stay where they always were; each other base has its own.
    runs_work = work if args.random_base else work / f"runs-{model.name}"
    runs = []
    for seed in seeds:  # seed-major: a partial run still compares strategies
        for strategy in strategies:
            t0 = time.perf_counter()
            r = run_study(strategy, seed, model, data, runs_work, scale)
            runs.append(r)
            pts = curve(r["trials"])
            print(f"[{time.perf_counter() - started:6.0f} s] {strategy:24s} seed {seed}"
                  f"{' (reused)' if r['reused'] else ''}: "
                  f"{len(r['trials'])} trials "
                  f"({sum(t['state'] in ('PRUNED', 'PAUSED') for t in r['trials'])} "
                  "pruned or paused), "
                  f"{sum(t['tokens'] for t in r['trials']):,} tokens, best val loss "
                  f"{pts[-1][1] if pts else float('nan'):.4f} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    summary = summarise(runs)
    pruner_defaults = {k: v for k, v in dataclass_dict(PrunerSpec()).items()
                       if k in ("type", "min_resource", "reduction_factor")}
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "command": "python bench/search_quality.py " + " ".join(sys.argv[1:]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "optuna": optuna.__version__},
        "scale": scale.__dict__,
        "base": base,
        "seeds": seeds,
        "strategies_run": strategies,
        "pruner_defaults": pruner_defaults,
        "wall_seconds": time.perf_counter() - started,
        "summary": summary,
        "table": table(summary),
        "verdict": verdict(summary),
        "correlations": correlations(runs),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    plot(runs, png)
    print()
    print(result["table"])
    print("\n".join(result["verdict"]))
    if result["correlations"]:
        print(correlation_table(result["correlations"]))
    print(f"\nraw results: {out}\nplot: {png}")
    if args.write_docs:
        write_docs(docs_section(result, png))
        print(f"docs: {DOCS}")


if __name__ == "__main__":
    main()
