"""Study specs: YAML -> validated, typed, frozen config objects.

A spec is one search: model, task, data, search space, objective, sampler, pruner, budget and
storage. `load_spec(path, overrides)` reads the YAML, applies `--set a.b=v` overrides, checks
every key and value, and returns a `StudySpec`. Every error names the key, the bad value, the
rule and the fix, e.g. ``search.learning_rate.low is 0.1 but must be < high (0.01)``.

Each field of the `search` section is either a fixed value (``lora_r: 16``), a range
(``learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}``) or a choice
(``optimizer: {choices: [adamw, sgd]}``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from gemma_search.errors import SpecError, first_line
from gemma_search.train.data import MAX_LINE_BYTES

__all__ = [
    "BudgetSpec",
    "CheckpointSpec",
    "Choice",
    "DataSpec",
    "FloatRange",
    "IntRange",
    "ModelSpec",
    "ObjectiveSpec",
    "OPTIMIZERS",
    "PrunerSpec",
    "SamplerSpec",
    "SearchSpec",
    "StorageSpec",
    "StudySpec",
    "TaskSpec",
    "PRESETS",
    "WarmStartSpec",
    "apply_overrides",
    "dump_spec",
    "load_spec",
    "spec_from_dict",
    "spec_from_text",
    "spec_hash",
    "fit_to_search",
    "find_spec",
    "shipped_studies",
    "without_secrets",
]

TaskType = Literal["causal_lm", "classification", "regression"]
OPTIMIZERS = ("adamw", "adam", "sgd", "adagrad", "rmsprop", "adabelief")
SCHEDULES = ("cosine", "linear", "constant")
#: Optimizers that use `search.momentum` and `search.adam_beta2` (conditional parameters).
MOMENTUM_OPTIMIZERS = ("sgd", "rmsprop")
ADAM_OPTIMIZERS = ("adamw", "adam", "adabelief")

GEMMA2_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GEMMA2_MLP = ("gate_proj", "up_proj", "down_proj")

#: Metrics each task computes, and whether larger is better.
TASK_METRICS: dict[str, dict[str, bool]] = {
    "causal_lm": {"val_loss": False, "perplexity": False},
    "classification": {"val_loss": False, "accuracy": True, "macro_f1": True},
    "regression": {"val_loss": False, "rmse": False, "pearson": True, "spearman": True},
}


# --------------------------------------------------------------------------- search params


@dataclass(frozen=True)
class FloatRange:
    """A float searched between `low` and `high` (log-uniform when `log`)."""

    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class IntRange:
    """An integer searched between `low` and `high` inclusive."""

    low: int
    high: int
    log: bool = False
    step: int = 1


@dataclass(frozen=True)
class Choice:
    """A categorical parameter: one of `choices`."""

    choices: tuple[Any, ...]


def _param(kind: type, default: Any, doc: str, *, ge: float | None = None,
           gt: float | None = None, le: float | None = None,
           one_of: tuple[str, ...] | None = None, whole_as_int: bool = False) -> Any:
    """A `search` field: its value kind, default, rule and one-line doc in one place.

    `whole_as_int`: a float setting whose whole values are kept as ints, so that `epochs: 2`
    reads back, and is exported, as 2 rather than 2.0.
    """
    meta = {"kind": kind, "doc": doc, "ge": ge, "gt": gt, "le": le, "one_of": one_of,
            "whole_as_int": whole_as_int}
    return field(default=default, metadata=meta)


SearchValue = float | int | str | FloatRange | IntRange | Choice


@dataclass(frozen=True)
class SearchSpec:
    """Every training setting of a trial: each fixed, a range or a choice."""

    learning_rate: SearchValue = _param(float, FloatRange(1e-5, 5e-4, log=True),
                                        "peak learning rate", gt=0)
    micro_batch_size: SearchValue = _param(int, 4, "examples per forward pass", ge=1, le=4096)
    gradient_accumulation_steps: SearchValue = _param(int, 4, "micro-batches per optimizer step",
                                                      ge=1, le=4096)
    epochs: SearchValue = _param(float, 1, "passes over the (fractioned) training set", gt=0,
                                 le=1000, whole_as_int=True)
    optimizer: SearchValue = _param(str, "adamw", "optimizer name", one_of=OPTIMIZERS)
    momentum: SearchValue = _param(float, 0.9, "momentum (sgd, rmsprop only)", ge=0, le=0.999)
    adam_beta2: SearchValue = _param(float, 0.999, "second-moment decay (adamw, adam, adabelief)",
                                     gt=0, le=0.99999)
    lr_schedule: SearchValue = _param(str, "cosine", "learning-rate schedule", one_of=SCHEDULES)
    warmup_ratio: SearchValue = _param(float, 0.03, "fraction of steps spent warming up", ge=0,
                                       le=0.5)
    weight_decay: SearchValue = _param(float, 0.0, "L2 / decoupled weight decay", ge=0, le=1)
    l1_penalty: SearchValue = _param(float, 0.0, "L1 penalty on adapter weights", ge=0)
    lora_dropout: SearchValue = _param(float, 0.05, "dropout on the LoRA input", ge=0, le=0.9)
    lora_r: SearchValue = _param(int, 16, "LoRA rank", ge=1, le=4096)
    lora_alpha: SearchValue = _param(int, 16, "LoRA alpha (scale = alpha / r)", ge=1, le=65536)
    lora_targets: SearchValue = _param(str, "all_linear",
                                       "name of a module set in model.lora_target_modules")
    early_stopping_patience: SearchValue = _param(int, 0,
                                                  "evaluations without improvement before "
                                                  "stopping (0: off)", ge=0, le=10**6)
    train_fraction: SearchValue = _param(float, 1.0, "fraction of the training set used", gt=0,
                                         le=1)
    max_grad_norm: SearchValue = _param(float, 1.0, "gradient clipping norm (0: off)", ge=0)
    label_smoothing: SearchValue = _param(float, 0.0, "label smoothing (classification)", ge=0,
                                          le=0.5)
    token_dropout: SearchValue = _param(float, 0.0,
                                        "probability of replacing an input token by <unk>",
                                        ge=0, le=0.5)
    seed: SearchValue = _param(int, 0, "training seed (adapter init, data order)", ge=0,
                               le=2**32 - 1)  # numpy's limit


# --------------------------------------------------------------------------- sections


def _default_targets() -> dict[str, tuple[str, ...]]:
    return {
        "attention": GEMMA2_ATTENTION,
        "all_linear": GEMMA2_ATTENTION + GEMMA2_MLP,
    }


@dataclass(frozen=True)
class ModelSpec:
    """The base model and how to load it."""

    name_or_path: str
    """Hub id (`google/gemma-2-9b`) or a local folder written by `save_pretrained`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local folders."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype; `auto` is bfloat16 on GPU and float32 on CPU."""
    attn_implementation: Literal["auto", "eager", "flex_attention", "flash_attention_2",
                                 "sdpa"] = "auto"
    """Attention kernel that keeps Gemma 2's attention soft-cap; `auto`: flash_attention_2
    (flash-attn >= 2.6) or flex_attention on GPU, eager on CPU. `sdpa` drops the soft-cap and
    is refused."""
    quantization: Literal["none", "4bit"] = "none"
    """`4bit`: QLoRA, the base in NF4 with bitsandbytes (GPU only), for 24-48 GB GPUs."""
    lora_target_modules: dict[str, tuple[str, ...]] = field(default_factory=_default_targets)
    """Named sets of module names LoRA may attach to; `search.lora_targets` picks one."""


@dataclass(frozen=True)
class TaskSpec:
    """What is learned and from which columns."""

    type: TaskType
    """`causal_lm` (SFT, prompt masked), `classification` or `regression`."""
    text_column: str | None = None
    """Column holding the input text (or use `prompt_template`)."""
    prompt_template: str | None = None
    """Python format string over columns, e.g. `"Review: {sentence}"`."""
    completion_column: str | None = None
    """causal_lm: column holding the completion the loss is taken on."""
    label_column: str = "label"
    """classification / regression: column holding the label or score."""
    labels: tuple[str, ...] | None = None
    """classification: label names; the column holds these names or their indices."""


@dataclass(frozen=True)
class DataSpec:
    """Where the data is and how it is cut."""

    train: str
    """Training file (.jsonl/.json/.csv/.tsv/.parquet) or a `save_to_disk` folder."""
    validation: str | None = None
    """Validation file or folder; without it `validation_fraction` of train is held out."""
    validation_fraction: float = 0.1
    """Share of the training file held out for validation when `validation` is not set."""
    max_seq_len: int = 512
    """Tokens per example after truncation."""
    max_train_examples: int | None = None
    """Use at most this many training examples (a fixed, seeded subset)."""
    max_validation_examples: int | None = None
    """Use at most this many validation examples (a fixed, seeded subset)."""
    rename_columns: dict[str, str] = field(default_factory=dict)
    """Columns to rename after reading, e.g. `{content: sentence}` (SST-2's dev file)."""
    seed: int = 0
    """Seed of the subset and split choices (the same for every trial)."""
    packing: bool = True
    """causal_lm: pack several examples into each row, with attention kept inside each
    example, so that no padding is trained on (other tasks: always false)."""
    header: bool = True
    """.csv/.tsv files: line 1 names the columns; `false`: every line is an example."""
    columns: tuple[str, ...] | None = None
    """.csv/.tsv files without a header (`header: false`): their column names, in order."""
    max_line_bytes: int = MAX_LINE_BYTES
    """Longest line a .jsonl/.csv/.tsv file may hold; a longer one is refused unread."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the search optimises."""

    metric: str = "val_loss"
    """Validation metric reported and optimised (see the task's metrics)."""
    direction: Literal["minimize", "maximize"] | None = None
    """Inferred from the metric when not set."""


@dataclass(frozen=True)
class SamplerSpec:
    """How Optuna proposes the next configuration."""

    type: Literal["tpe", "random", "gp", "cmaes"] = "tpe"
    seed: int | None = None
    """Seeds each trial's sampling from (seed, trial number): no trial, worker or restart
    repeats another's draw, and the same trial results give the same proposals on a fresh
    database. It fixes neither training randomness (`search.seed`) nor, with several
    workers, which trials have finished when one starts. None: fresh entropy per process."""
    n_startup_trials: int = 5
    """Random trials before the model-based sampler takes over (tpe, gp, cmaes)."""


@dataclass(frozen=True)
class PrunerSpec:
    """How weak trials are stopped early."""

    type: Literal["hyperband", "asha", "median", "wilcoxon", "none"] = "median"
    """Default median: in bench/search_quality.py it kept the best in 3 of 3 seeds for 40% of
    the compute; hyperband (min_resource 1, reduction_factor 3) lost it in 2 of 3."""
    min_resource: int = 1
    """hyperband / asha: evaluations before the first rung."""
    reduction_factor: int = 3
    """hyperband / asha: keep 1 / reduction_factor of trials at each rung."""
    n_startup_trials: int = 2
    """median: finished trials before pruning starts."""
    n_warmup_steps: int = 1
    """median: evaluations of a trial before it can be pruned."""
    p_threshold: float = 0.1
    """wilcoxon: p-value under which a trial is pruned."""
    pause: bool = False
    """asha: a trial reaching a rung pauses there, checkpointed, instead of being judged at
    once; a worker resumes the best paused trial of the highest rung with room (the top
    1 / reduction_factor of its results so far), else starts a new trial
    (`gemma_search.promotion`). A paused trial is never dead: a late bloomer is resumed
    once enough trials are worse at its rung."""


@dataclass(frozen=True)
class BudgetSpec:
    """How much compute the study and each trial may use."""

    max_trials: int = 20
    """Trials for the whole study (all workers together), running ones counted."""
    max_tokens_per_trial: int | None = None
    """Stop a trial after this many training tokens (the LR schedule ends there too)."""
    eval_every_tokens: int | None = None
    """Evaluate and report after every this many training tokens."""
    eval_every_steps: int | None = None
    """Or: evaluate after every this many optimizer steps."""
    max_gpu_hours: float | None = None
    """GPU-hours for the whole study (trial wall time x GPUs), running trials counted."""
    max_tokens: int | None = None
    """Training tokens for the whole study, all trials together (pruned and paused ones
    count what they trained). With `pruner.pause` it holds exactly: each run reserves the
    tokens to its next rung and stops at that reservation. Without it, a trial starts while
    the tokens trained are below it and runs to its end (each worker may pass it by one
    trial), as `max_gpu_hours` does."""


@dataclass(frozen=True)
class StorageSpec:
    """Where the study lives, and how workers prove they are alive."""

    url: str = "sqlite:///gemma_search.db"
    """SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg2://USER@HOST/DB."""
    heartbeat_interval: int = 30
    """Seconds between a running trial's heartbeats."""
    grace_period: int = 120
    """Seconds without a heartbeat after which a running trial is failed and re-queued."""
    max_retries: int = 3
    """Times a trial whose worker died or was preempted is re-queued."""
    reconnect_seconds: int = 600
    """How long a worker waits for the database to come back (restart, full server)."""


@dataclass(frozen=True)
class CheckpointSpec:
    """Where running trials save their state, so that a retry resumes instead of restarting."""

    dir: str = "gemma-search-checkpoints"
    """Folder for checkpoints; a path every worker reaches (shared disk) lets a retry on
    another machine resume. Relative paths are relative to the spec file."""
    every_steps: int | None = None
    """Save every this many optimizer steps; unset: after every evaluation."""
    keep_last: int = 2
    """Checkpoints kept per trial."""


#: Known-good configurations a study can try first (`warm_start.presets`).
PRESETS: dict[str, dict[str, Any]] = {
    # The widely used Gemma 2 LoRA recipe (QLoRA paper, Dettmers et al. 2023, and the
    # Gemma fine-tuning guides): rank 16 on every linear layer, a constant LR of 2e-4 after a
    # short warmup, tight gradient clipping.
    "gemma2-lora": {
        "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "lora_targets": "all_linear",
        "learning_rate": 2.0e-4, "optimizer": "adamw", "lr_schedule": "constant",
        "warmup_ratio": 0.03, "max_grad_norm": 0.3,
    },
}


@dataclass(frozen=True)
class WarmStartSpec:
    """Configurations tried first, before the sampler proposes its own (enqueued at create)."""

    presets: tuple[str, ...] = ()
    """Named known-good configurations, e.g. `[gemma2-lora]`; a setting this spec fixes keeps
    the spec's value, one outside its search space is left to the sampler."""
    configs: tuple[dict[str, Any], ...] = ()
    """Settings to try first, e.g. `[{learning_rate: 2.0e-4, lora_r: 16}]`; each must lie in
    the search space."""
    from_study: str | None = None
    """An earlier study in the same storage, on the same model and task: its best trials'
    settings are tried first."""
    from_study_top: int = 3
    """How many of `from_study`'s best trials to try."""


@dataclass(frozen=True)
class StudySpec:
    """One search, validated."""

    name: str
    """Study name: letters, digits, `.`, `_`, `-`, at most 128 characters, not starting with
    `.`. It names the study's folder under `checkpoints.dir`."""
    model: ModelSpec
    task: TaskSpec
    data: DataSpec
    search: SearchSpec = field(default_factory=SearchSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    checkpoints: CheckpointSpec = field(default_factory=CheckpointSpec)
    warm_start: WarmStartSpec = field(default_factory=WarmStartSpec)

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        """`minimize` or `maximize`, inferred from the metric unless set."""
        if self.objective.direction is not None:
            return self.objective.direction
        bigger_is_better = TASK_METRICS[self.task.type][self.objective.metric]
        return "maximize" if bigger_is_better else "minimize"


# --------------------------------------------------------------------------- loading

#: Keys whose values are paths; relative ones are resolved against the spec file's folder
#: (or the working directory, for `--set` overrides and shipped studies).
_PATH_KEYS = (("data", "train"), ("data", "validation"), ("model", "name_or_path"),
              ("checkpoints", "dir"))


def shipped_studies() -> dict[str, Path]:
    """The studies that ship inside the package (`gemma_search/studies/*.yaml`), by name: the
    file name without `.yaml`."""
    return {p.stem: p for p in sorted(_shipped_folder().glob("*.yaml"))}


def find_spec(spec: str | Path) -> Path:
    """The spec file `spec` names: a path, or else the name of a shipped study (`sst2_gemma2_9b`,
    no folder, no `.yaml`)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_studies()
    if str(spec) in shipped:
        return shipped[str(spec)]
    raise SpecError(f"spec file {path} does not exist; pass the path of a study YAML or the "
                    f"name of a shipped study ({', '.join(shipped)}; `gemma-search studies` "
                    "lists them)")


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """Read a YAML spec file (or a shipped study, by name), apply `key.path=value` overrides,
    validate.

    Relative paths in the file are relative to its folder. A shipped study's folder is inside
    the installed package, no place for data or checkpoints, so its relative paths are
    relative to the working directory instead, as `--set` paths are.
    """
    path = find_spec(path)
    base = path.resolve().parent
    if base == _shipped_folder().resolve():
        base = Path.cwd()
    raw = _load_yaml(_read_spec_file(path), f"spec file {path}")
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {path} must hold a mapping of sections (name, model, task, "
                        f"data, ...), not {type(raw).__name__}")
    _resolve_paths(raw, base, only_existing_for_model=True)
    raw = apply_overrides(raw, overrides)
    spec = spec_from_dict(raw)
    if not Path(spec.checkpoints.dir).is_absolute():  # the default: beside the spec file
        folder = str((base / spec.checkpoints.dir).resolve())
        spec = dataclasses.replace(spec, checkpoints=dataclasses.replace(spec.checkpoints,
                                                                         dir=folder))
    return spec


def spec_from_text(text: str) -> StudySpec:
    """Validate a spec from YAML text (as stored with a study); paths must be absolute.

    The text is read as a spec file is (size, characters, no YAML aliases): whoever can
    write to the study database must not be able to stall or crash the workers that read it.
    """
    return spec_from_dict(_load_yaml(_check_text(text, "the stored spec"), "the stored spec"))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of `raw` with each `a.b.c=value` set; the value is parsed as YAML."""
    raw = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r} must look like key.path=value, e.g. "
                            "--set search.lora_r=8")
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {key}: {part} holds a value, not a section")
            node = child
        value = _load_yaml(text, f"--set {key}") if text.strip() else None
        if tuple(parts) in _PATH_KEYS and isinstance(value, str):
            value = _resolve_one(value, Path.cwd(), only_existing=parts[0] == "model")
        node[parts[-1]] = value
    return raw


def spec_from_dict(raw: Any) -> StudySpec:
    """Validate a plain mapping into a `StudySpec` (the loader's second half)."""
    if not isinstance(raw, dict):
        raise SpecError("a study spec must be a mapping with sections name, model, task, data, "
                        "search, objective, sampler, pruner, budget, storage")
    spec = _build(StudySpec, raw, "")
    _check_rules(spec)
    if spec.task.type != "causal_lm" and spec.data.packing:
        # Only causal_lm packs: a classification spec (or its best_config.yaml) must not say
        # it does. Older stored specs say `packing: true` and load to this same spec.
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, packing=False))
    return spec


def dump_spec(spec: StudySpec) -> str:
    """The spec as YAML text that `spec_from_text` loads back to an equal spec."""
    return yaml.safe_dump(_to_plain(spec), sort_keys=False, default_flow_style=False)


def without_secrets(spec: StudySpec) -> StudySpec:
    """`spec` as it may be stored or exported: `storage.url` without its password.

    That URL is only `create`'s default storage. A stored spec is read by whoever reads the
    database, and `best_config.yaml` is a file to share; libpq finds the password left out
    in `PGPASSWORD` or `~/.pgpass`, as `gemma-search` finds a whole URL in
    `GEMMA_SEARCH_STORAGE`.
    """
    from gemma_search.storage import has_password, without_password

    url = spec.storage.url
    if not has_password(url):
        return spec
    return dataclasses.replace(spec, storage=dataclasses.replace(
        spec.storage, url=without_password(url)))


def spec_hash(spec: StudySpec) -> str:
    """sha256 of the canonical YAML dump: equal specs, equal hashes."""
    return hashlib.sha256(dump_spec(spec).encode()).hexdigest()


# --------------------------------------------------------------------------- internals


#: Largest spec file read: the shipped ones are about 3 KiB. A spec is refused before
#: it is parsed, so a huge file costs one `stat`.
MAX_SPEC_BYTES = 2**20
#: Deepest nesting of YAML collections read: a spec nests 4 levels (warm_start.configs).
MAX_YAML_DEPTH = 16
#: Longest study name. A verification companion (`NAME.verify`, gemma_search.verify) adds
#: its suffix to that; both stay far below the file system's 255 bytes per folder name.
MAX_NAME_CHARS = 128
_COMPANION_SUFFIX = ".verify"
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
#: Characters a spec file may not hold: controls other than tab and line ends.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class _Refused(yaml.YAMLError):
    """What `_SpecLoader` refuses, with where, as PyYAML's own errors say it."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors or aliases, and with a nesting limit.

    An alias (`*a`) stands for a whole node written elsewhere: nine lines of aliases of
    aliases stand for a billion strings (the "billion laughs" bomb; 342 bytes were enough
    for a MemoryError after two minutes here), which any walk over the result expands. A
    spec has no use for them, so the first anchor or alias ends the read, before anything
    is built. Deep nesting would exhaust the composer's recursion instead.
    """

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"the alias *{event.anchor} is not allowed in a spec; write the "
                           "value out in full", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused(f"the anchor &{event.anchor} is not allowed in a spec; write the "
                           "value out in full wherever it is used", event.start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _Refused(f"it nests deeper than {MAX_YAML_DEPTH} levels",
                               event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_yaml(text: str, source: str) -> Any:
    """Parse spec YAML with `_SpecLoader`; any problem is a one-line SpecError."""
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader, see above
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        if isinstance(exc, _Refused):
            raise SpecError(f"{source}{where}: {exc.problem}") from None
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise SpecError(f"{source} is not valid YAML{where}: {problem}") from None
    except (ValueError, OverflowError, RecursionError) as exc:
        # A date such as 2024-13-45, or an integer of more than 4300 digits (the rest of
        # Python's message is about its own setting, not about the spec).
        reason = first_line(exc).split(";")[0].split(" for integer string")[0]
        raise SpecError(f"{source} holds a value YAML cannot read ({reason}); correct "
                        "it") from None


def _read_spec_file(path: Path) -> str:
    """The text of a spec file: at most MAX_SPEC_BYTES, UTF-8, no control characters."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"spec file {path} cannot be read ({exc.strerror}); check its "
                        "permissions") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"spec file {path} is larger than {MAX_SPEC_BYTES} bytes (1 MiB); a "
                        "spec is a short YAML file: is this the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SpecError(f"spec file {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} "
                        f"at line {line}; save it as UTF-8") from None
    return _check_text(text, f"spec file {path}")


def _check_text(text: str, source: str) -> str:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError(f"{source} is larger than {MAX_SPEC_BYTES} bytes (1 MiB)")
    bad = _CONTROL.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise SpecError(f"{source} holds the control character U+{ord(bad.group()):04X} at "
                        f"line {line}; a spec is plain text (a binary file?)")
    return text


def _check_name(name: str, where: str) -> None:
    """Study names are identifiers: they name a folder under checkpoints.dir and are
    printed in messages, so `../x`, `/abs`, `..` and escape sequences are refused."""
    core = name.removesuffix(_COMPANION_SUFFIX)  # a companion may exceed the limit by it
    if _NAME.fullmatch(name) and 0 < len(core) <= MAX_NAME_CHARS:
        return
    shown = name if len(name) <= 60 else f"{name[:40]}... ({len(name)} characters)"
    raise SpecError(f"{where} is {shown!r} but must be letters, digits, '.', '_' or '-', at "
                    f"most {MAX_NAME_CHARS} characters, not starting with '.'; e.g. "
                    "sst2-gemma2-9b")


def _shipped_folder() -> Path:
    # pip installs the package as plain files, never zipped, so this is a real folder.
    return Path(str(resources.files("gemma_search").joinpath("studies")))


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _resolve_one(value: str, base: Path, *, only_existing: bool) -> str:
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    if only_existing and not candidate.exists():
        return value  # a hub id such as google/gemma-2-9b
    return str(candidate.resolve())


def _resolve_paths(raw: dict[str, Any], base: Path, *, only_existing_for_model: bool) -> None:
    for section, key in _PATH_KEYS:
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = _resolve_one(node[key], base,
                                     only_existing=only_existing_for_model and section == "model")


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from mapping `raw`, rejecting unknown keys by name."""
    label = path or "the spec"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{label} must be a mapping of keys, not {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(fields)}"
            raise SpecError(f"{_where(path, str(key))} is not a known key; {hint}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        where = _where(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{where} is missing; add it to the spec")
            continue
        if cls is SearchSpec:
            values[name] = _parse_search(raw[name], f.metadata, where)
        else:
            values[name] = _parse(hints[name], raw[name], where)
    return cls(**values)


def _parse(tp: Any, value: Any, where: str) -> Any:
    """Coerce `value` to annotation `tp`, or raise a SpecError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value  # checked by the rule that knows what it means (e.g. fit_to_search)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(inner[0], value, where) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise SpecError(f"{where} is {value!r} but must be one of: "
                            f"{', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise SpecError(f"{where} is {value!r} but must be a list")
        return tuple(_parse(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where} is {value!r} but must be a mapping")
        return {str(k): _parse(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp in (int, float, str, bool):
        return _scalar(tp, value, where)
    raise TypeError(f"unsupported spec annotation {tp!r} at {where}")  # a bug, not user input


def _scalar(kind: type, value: Any, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise SpecError(f"{where} is {value!r} but must be true or false")
    if kind is str:
        if isinstance(value, str) and value:
            return value
        raise SpecError(f"{where} is {value!r} but must be a non-empty string")
    if isinstance(value, bool):
        raise SpecError(f"{where} is {value!r} but must be a number")
    if kind is int:
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        raise SpecError(f"{where} is {value!r} but must be an integer")
    # float: PyYAML reads 1e-5 (no dot) as a string, so accept numeric strings.
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SpecError(f"{where} is {value!r} but must be a number") from None
    if not math.isfinite(number):
        raise SpecError(f"{where} is {value!r} but must be a finite number")
    return number


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
    if meta["one_of"] is not None and value not in meta["one_of"]:
        raise SpecError(f"{where} is {value!r} but must be one of: {', '.join(meta['one_of'])}")
    if meta["gt"] is not None and not value > meta["gt"]:
        raise SpecError(f"{where} is {value!r} but must be > {meta['gt']}")
    if meta["ge"] is not None and not value >= meta["ge"]:
        raise SpecError(f"{where} is {value!r} but must be >= {meta['ge']}")
    if meta["le"] is not None and not value <= meta["le"]:
        raise SpecError(f"{where} is {value!r} but must be <= {meta['le']}")


def _search_scalar(meta: typing.Mapping[str, Any], value: Any, where: str) -> Any:
    """A fixed value or a choice of a search field (`_param`'s kind and whole_as_int)."""
    parsed = _scalar(meta["kind"], value, where)
    if meta["whole_as_int"] and float(parsed).is_integer():
        return int(parsed)
    return parsed


def _parse_search(value: Any, meta: typing.Mapping[str, Any], where: str) -> SearchValue:
    """A search field: fixed scalar, {low, high, log, step} range, or {choices: [...]}."""
    kind = meta["kind"]
    if not isinstance(value, dict):
        fixed = _search_scalar(meta, value, where)
        _check_bounds(fixed, meta, where)
        return fixed  # type: ignore[no-any-return]
    keys = set(value)
    if "choices" in keys:
        if keys != {"choices"}:
            raise SpecError(f"{where} mixes choices with {sorted(keys - {'choices'})}; "
                            "give either {choices: [...]} or {low, high}")
        items = value["choices"]
        if not isinstance(items, list) or not items:
            raise SpecError(f"{where}.choices is {items!r} but must be a non-empty list")
        parsed = tuple(_search_scalar(meta, v, f"{where}.choices[{i}]")
                       for i, v in enumerate(items))
        for i, v in enumerate(parsed):
            _check_bounds(v, meta, f"{where}.choices[{i}]")
        if len(set(parsed)) != len(parsed):
            raise SpecError(f"{where}.choices has duplicates: {list(parsed)}")
        return Choice(parsed)
    if kind is str:
        raise SpecError(f"{where} is {value!r} but must be a value or {{choices: [...]}}")
    allowed = {"low", "high", "log", "step"}
    for key in keys - allowed:
        close = difflib.get_close_matches(str(key), allowed | {"choices"}, n=1)
        hint = f"did you mean {close[0]}?" if close else "use low, high, log, step or choices"
        raise SpecError(f"{where}.{key} is not a known key; {hint}")
    for key in ("low", "high"):
        if key not in value:
            raise SpecError(f"{where}.{key} is missing; a range needs low and high")
    low = _scalar(kind, value["low"], f"{where}.low")
    high = _scalar(kind, value["high"], f"{where}.high")
    log = _scalar(bool, value.get("log", False), f"{where}.log")
    _check_bounds(low, meta, f"{where}.low")
    _check_bounds(high, meta, f"{where}.high")
    if not low < high:
        raise SpecError(f"{where}.low is {low} but must be < high ({high}); "
                        "for a fixed value write the value alone")
    if log and low <= 0:
        raise SpecError(f"{where}.low is {low} but a log range needs low > 0")
    step = value.get("step")
    if step is not None:
        step = _scalar(kind, step, f"{where}.step")
        if step <= 0:
            raise SpecError(f"{where}.step is {step} but must be > 0")
        if log:
            raise SpecError(f"{where} sets both log and step; Optuna allows only one of them")
    if kind is int:
        return IntRange(low, high, log, step if step is not None else 1)
    return FloatRange(low, high, log, step)


def _values(value: SearchValue) -> tuple[Any, ...]:
    if isinstance(value, Choice):
        return value.choices
    if isinstance(value, FloatRange | IntRange):
        return ()
    return (value,)


def _check_rules(spec: StudySpec) -> None:
    """Rules that span keys or sections."""
    task, data, budget, search = spec.task, spec.data, spec.budget, spec.search
    _check_name(spec.name, "name")
    if spec.warm_start.from_study is not None:
        _check_name(spec.warm_start.from_study, "warm_start.from_study")
    if (task.type in ("classification", "regression") and task.text_column is None
            and task.prompt_template is None):
        raise SpecError(f"task.text_column is missing; a {task.type} task needs "
                            "task.text_column or task.prompt_template")
    if task.type == "classification" and (task.labels is None or len(task.labels) < 2):
        raise SpecError(f"task.labels is {list(task.labels or [])} but a classification task "
                        "needs at least two label names, e.g. [negative, positive]")
    if task.type == "causal_lm":
        if task.completion_column is None and task.text_column is None:
            raise SpecError("task.completion_column is missing; a causal_lm task needs "
                            "task.prompt_template + task.completion_column (prompt masked) "
                            "or task.text_column (loss on all tokens)")
        if task.completion_column is not None and task.prompt_template is None:
            raise SpecError("task.prompt_template is missing; it renders the prompt that "
                            "precedes task.completion_column")
    metrics = TASK_METRICS[task.type]
    if spec.objective.metric not in metrics:
        raise SpecError(f"objective.metric is {spec.objective.metric!r} but a {task.type} task "
                        f"reports: {', '.join(metrics)}")
    if spec.model.attn_implementation == "sdpa":
        raise SpecError("model.attn_implementation is 'sdpa', which silently drops Gemma 2's "
                        "attention soft-cap; use auto, eager, flex_attention or "
                        "flash_attention_2")
    if not 0 < data.validation_fraction < 1:
        raise SpecError(f"data.validation_fraction is {data.validation_fraction} but must be "
                        "between 0 and 1 (exclusive)")
    for key in ("max_seq_len", "max_train_examples", "max_validation_examples"):
        value = getattr(data, key)
        if value is not None and value < 2:
            raise SpecError(f"data.{key} is {value} but must be >= 2")
    _check_data_layout(data)
    if budget.max_trials < 1:
        raise SpecError(f"budget.max_trials is {budget.max_trials} but must be >= 1")
    if (budget.eval_every_tokens is None) == (budget.eval_every_steps is None):
        raise SpecError("budget.eval_every_tokens and budget.eval_every_steps: set exactly one "
                        "(evaluations happen, and are reported to the pruner, at those points)")
    for key in ("eval_every_tokens", "eval_every_steps", "max_tokens_per_trial"):
        value = getattr(budget, key)
        if value is not None and value < 1:
            raise SpecError(f"budget.{key} is {value} but must be >= 1")
    if budget.max_gpu_hours is not None and budget.max_gpu_hours <= 0:
        raise SpecError(f"budget.max_gpu_hours is {budget.max_gpu_hours} but must be > 0")
    store = spec.storage
    if store.heartbeat_interval < 1 or store.grace_period <= store.heartbeat_interval:
        raise SpecError(f"storage.grace_period is {store.grace_period} but must be > "
                        f"storage.heartbeat_interval ({store.heartbeat_interval}), which is >= 1")
    if store.max_retries < 0:
        raise SpecError(f"storage.max_retries is {store.max_retries} but must be >= 0")
    ckpt = spec.checkpoints
    if ckpt.keep_last < 1 or (ckpt.every_steps is not None and ckpt.every_steps < 1):
        raise SpecError("checkpoints.keep_last and checkpoints.every_steps must be >= 1; got "
                        f"{ckpt.keep_last} and {ckpt.every_steps}")
    if spec.pruner.pause and spec.pruner.type != "asha":
        raise SpecError(f"pruner.pause is true but pruner.type is {spec.pruner.type!r}; "
                        "pausing at rungs is asynchronous successive halving: set "
                        "pruner.type: asha, or remove pruner.pause")
    if spec.pruner.min_resource < 1 or spec.pruner.reduction_factor < 2:
        raise SpecError("pruner.min_resource must be >= 1 and pruner.reduction_factor >= 2; "
                        f"got {spec.pruner.min_resource} and {spec.pruner.reduction_factor}")
    for name in _values(search.lora_targets):
        if name not in spec.model.lora_target_modules:
            raise SpecError(f"search.lora_targets is {name!r} but model.lora_target_modules "
                            f"defines: {', '.join(spec.model.lora_target_modules)}")
    if task.type != "classification" and any(v > 0 for v in _values(search.label_smoothing)):
        raise SpecError(f"search.label_smoothing applies to classification only; remove it "
                        f"from this {task.type} spec")
    _check_sizes(spec)
    _check_warm_start(spec)


#: The largest value of each count a spec sets (and the smallest, where no other rule says).
#: Far above any real study, low enough that a typo or a hostile spec (`max_trials: 1e20`)
#: is refused at `create`, not met later as an overflowing sleep, tensor or budget.
_SIZES: dict[tuple[str, str], tuple[float, float]] = {
    # Workers also check it against the model's own context (max_position_embeddings).
    ("data", "max_seq_len"): (2, 2**20),
    ("data", "max_train_examples"): (2, 10**12),
    ("data", "max_validation_examples"): (2, 10**12),
    ("data", "max_line_bytes"): (1, 2**30),
    ("data", "seed"): (0, 2**32 - 1),  # numpy's limit
    ("budget", "max_trials"): (1, 10**6),
    ("budget", "max_tokens_per_trial"): (1, 10**13),
    ("budget", "eval_every_tokens"): (1, 10**13),
    ("budget", "eval_every_steps"): (1, 10**9),
    ("budget", "max_gpu_hours"): (0, 10**7),
    ("budget", "max_tokens"): (1, 10**15),
    ("storage", "heartbeat_interval"): (1, 86400),
    ("storage", "grace_period"): (2, 7 * 86400),
    ("storage", "max_retries"): (0, 100),
    ("storage", "reconnect_seconds"): (0, 7 * 86400),
    ("checkpoints", "every_steps"): (1, 10**9),
    ("checkpoints", "keep_last"): (1, 1000),
    ("sampler", "seed"): (0, 2**31 - 1),  # + the worker index, below numpy's 2**32
    ("sampler", "n_startup_trials"): (0, 10**6),
    ("pruner", "min_resource"): (1, 10**6),
    ("pruner", "reduction_factor"): (2, 1000),
    ("pruner", "n_startup_trials"): (0, 10**6),
    ("pruner", "n_warmup_steps"): (0, 10**6),
    ("warm_start", "from_study_top"): (1, 1000),
}


def _check_sizes(spec: StudySpec) -> None:
    for (section, key), (low, high) in _SIZES.items():
        value = getattr(getattr(spec, section), key)
        if value is not None and not low <= value <= high:
            raise SpecError(f"{section}.{key} is {value} but must be between {low} and "
                            f"{high}")


def _check_data_layout(data: DataSpec) -> None:
    """`data.header`, `data.columns` and `data.max_line_bytes` (how text files are read)."""
    if data.header and data.columns is not None:
        raise SpecError(f"data.columns is {list(data.columns)} but data.header is true, so line "
                        "1 of each .csv/.tsv file names the columns; remove data.columns, or "
                        "set data.header: false if the files have no header line")
    if not data.header:
        if data.columns is None:
            raise SpecError("data.columns is missing; with data.header: false, list the columns "
                            "of the .csv/.tsv files in order, e.g. data.columns: [label, "
                            "sentence]")
        for i, name in enumerate(data.columns):
            if name in data.columns[:i]:
                raise SpecError(f"data.columns names {name!r} twice ({list(data.columns)}); "
                                "give each column its own name")
        paths = [p for p in (data.train, data.validation) if p is not None]
        if not any(Path(p).suffix.lower() in (".csv", ".tsv") for p in paths):
            raise SpecError(f"data.header is false but no data file is .csv or .tsv "
                            f"({', '.join(paths)}); remove data.header and data.columns")
    if data.max_line_bytes < 1:
        raise SpecError(f"data.max_line_bytes is {data.max_line_bytes} but must be >= 1")


def _check_warm_start(spec: StudySpec) -> None:
    warm = spec.warm_start
    for i, name in enumerate(warm.presets):
        if name not in PRESETS:
            raise SpecError(f"warm_start.presets[{i}] is {name!r} but the known presets are: "
                            f"{', '.join(PRESETS)}")
    for i, config in enumerate(warm.configs):
        if not isinstance(config, dict) or not config:
            raise SpecError(f"warm_start.configs[{i}] is {config!r} but must be a mapping of "
                            "search settings, e.g. {learning_rate: 2.0e-4, lora_r: 16}")
        fit_to_search(spec, config, where=f"warm_start.configs[{i}]")
    if warm.from_study_top < 1:
        raise SpecError(f"warm_start.from_study_top is {warm.from_study_top} but must be >= 1")
    if warm.from_study == spec.name:
        raise SpecError(f"warm_start.from_study is {spec.name!r}, this study itself; name an "
                        "earlier study")
    enqueued = len(warm.presets) + len(warm.configs)
    if enqueued > spec.budget.max_trials:
        raise SpecError(f"warm_start lists {enqueued} configurations but budget.max_trials is "
                        f"{spec.budget.max_trials}; raise the budget or list fewer")


def fit_to_search(spec: StudySpec, settings: dict[str, Any], *, where: str | None = None
                  ) -> tuple[dict[str, Any], list[str]]:
    """The searched settings among `settings`, as the trial's params, and what was left out.

    With `where` (a spec key) every setting must fit: a SpecError names the first that does
    not. Without it, the settings that do not fit are left out, each with a note saying why
    and what the trial does instead: a setting this spec fixes keeps the spec's value; one
    outside the search space is left to the sampler; an unknown one is ignored.
    """
    fields = {f.name: f for f in dataclasses.fields(SearchSpec)}
    params: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in settings.items():
        problem, instead = None, "left to the sampler"
        if key not in fields:
            problem, instead = f"{key} is not a search setting", "ignored"
        else:
            current = getattr(spec.search, key)
            fixed = not isinstance(current, FloatRange | IntRange | Choice)
            try:
                value = _search_scalar(fields[key].metadata, value,
                                       f"{where or 'warm start'}.{key}")
            except SpecError as exc:
                problem = str(exc)
            else:
                problem = _outside(key, value, current)
                if problem is None and fixed:
                    continue  # fixed at this very value: nothing to enqueue
            if fixed and where is None:
                problem = f"{key} {value!r} is not tried"
                instead = f"this spec fixes it: kept at the spec's value {current!r}"
        if problem is None:
            params[key] = value
        elif where is not None:
            raise SpecError(f"{where}: {problem}; change it or remove it")
        else:
            notes.append(f"{problem}; {instead}")
    return params, notes


def _outside(key: str, value: Any, current: SearchValue) -> str | None:
    """Why `value` is not a value search setting `key` can take, or None."""
    if isinstance(current, FloatRange | IntRange):
        if not current.low <= value <= current.high:
            return (f"{key} {value!r} is outside search.{key} "
                    f"[{current.low}, {current.high}]")
        return None
    if isinstance(current, Choice):
        if value not in current.choices:
            return (f"{key} {value!r} is not among search.{key} choices "
                    f"{list(current.choices)}")
        return None
    if value != current:
        return f"{key} is fixed at {current!r} in this spec, not {value!r}"
    return None


def _to_plain(value: Any) -> Any:
    if isinstance(value, Choice):
        return {"choices": list(value.choices)}
    if isinstance(value, FloatRange | IntRange):
        out: dict[str, Any] = {"low": value.low, "high": value.high}
        if value.log:
            out["log"] = True
        if isinstance(value, FloatRange) and value.step is not None:
            out["step"] = value.step
        if isinstance(value, IntRange) and value.step != 1:
            out["step"] = value.step
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value
