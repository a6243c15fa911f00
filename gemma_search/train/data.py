"""Load a study's data with `datasets`, check its columns, and tokenize it for the task.

Tokenization goes through `Dataset.map`, whose results `datasets` caches on disk by
fingerprint: the second worker of a study, and every later trial, reuse the first one's work.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_search.errors import DataError, first_line

__all__ = [
    "TaskData",
    "collate",
    "fingerprint_files",
    "load_task_data",
    "read_splits",
    "read_table",
]

_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}


@dataclass
class TaskData:
    """Tokenized train and validation splits of one study, shared by all its trials."""

    train: Any
    """`datasets.Dataset` with input_ids and labels, shuffled once with the data seed."""
    validation: Any
    task: str
    num_labels: int
    """Classes for classification, 1 for regression, 0 for causal_lm."""
    pad_token_id: int
    unk_token_id: int
    fingerprint: str
    """sha256 of the data files' bytes and the cut settings (for provenance)."""
    max_seq_len: int | None = None
    """Tokens per example after truncation: the row length packed examples fill."""
    packing: bool = False
    """causal_lm: pack several examples per training row (`train.packing`)."""

    @property
    def avg_train_tokens(self) -> float:
        """Mean tokens per training example (sizes the LR schedule under a token budget)."""
        lengths = self.train["length"]
        return float(sum(lengths)) / max(len(lengths), 1)


def read_table(path: str, key: str, *, split: str = "train", cache_dir: str | None = None) -> Any:
    """Read one data file (or `save_to_disk` folder) into a `datasets.Dataset`.

    `key` is the spec key that named the file, so errors can point at it.
    """
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"{key} file {p} does not exist; fix {key} in the spec or pass "
                        f"--set {key}=PATH")
    if p.is_dir():
        try:
            loaded = datasets.load_from_disk(str(p))
        except Exception as exc:  # datasets raises FileNotFoundError or its own errors
            raise DataError(f"{key} folder {p} is not a datasets.save_to_disk folder: "
                            f"{first_line(exc)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{key} folder {p} has splits {list(loaded)} but no {split!r}")
            return loaded[split]
        return loaded
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"{key} file {p} has suffix {p.suffix!r}; use .jsonl, .json, .csv, .tsv, "
                        ".parquet or a save_to_disk folder")
    kwargs: dict[str, Any] = {}
    if fmt == "tsv":
        import csv

        # GLUE-style TSVs hold bare quotes inside sentences: never treat them as quoting.
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
        fmt = "csv"
    try:
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train", cache_dir=cache_dir,
                                   **kwargs)
    except Exception as exc:  # pyarrow / pandas / json errors all mean "cannot parse"
        raise DataError(f"{key} file {p} cannot be parsed as {p.suffix.lstrip('.')}: "
                        f"{first_line(exc)}") from None
    if len(ds) == 0:
        raise DataError(f"{key} file {p} holds no rows")
    return ds


def fingerprint_files(paths: Sequence[str | None], extra: str = "") -> str:
    """sha256 over the bytes of the given files (folders: every file in them, sorted)."""
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        if path is None:
            continue
        p = Path(path)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            digest.update(f.name.encode())
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def read_splits(
    *,
    task: str,
    train_path: str,
    validation_path: str | None,
    validation_fraction: float,
    text_column: str | None,
    prompt_template: str | None,
    completion_column: str | None,
    label_column: str,
    max_train_examples: int | None = None,
    max_validation_examples: int | None = None,
    rename_columns: dict[str, str] | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Read, check and cut the raw train and validation splits (no tokenizer needed).

    `gemma-search create` calls this to refuse bad data before anything is stored.
    """
    rename = rename_columns or {}
    train = _renamed(read_table(train_path, "data.train"), rename)
    if validation_path is not None:
        validation = _renamed(read_table(validation_path, "data.validation",
                                         split="validation"), rename)
    else:
        parts = train.train_test_split(test_size=validation_fraction, seed=seed)
        train, validation = parts["train"], parts["test"]
    needed = _required_columns(task, text_column, prompt_template, completion_column,
                               label_column)
    for split_name, ds, path in (("data.train", train, train_path),
                                 ("data.validation", validation, validation_path or train_path)):
        for column, spec_key in needed:
            if column not in ds.column_names:
                raise DataError(f"{split_name} file {path} has no column {column!r} "
                                f"(named by {spec_key}); its columns are: "
                                f"{', '.join(ds.column_names)}")
    train = train.shuffle(seed=seed)
    if max_train_examples is not None:
        train = train.select(range(min(max_train_examples, len(train))))
    if max_validation_examples is not None:
        validation = validation.shuffle(seed=seed)
        validation = validation.select(range(min(max_validation_examples, len(validation))))
    if len(validation) == 0:
        raise DataError(f"the validation split of {validation_path or train_path} is empty; "
                        "set data.validation to a file with rows or raise "
                        "data.validation_fraction")
    if len(train) == 0:
        raise DataError(f"the training split of {train_path} is empty after the validation "
                        "hold-out; add rows or lower data.validation_fraction")
    return train, validation


def load_task_data(*, tokenizer: Any, max_seq_len: int, labels: Sequence[str] | None,
                   packing: bool = False, **split_args: Any) -> TaskData:
    """Read the splits (`read_splits` arguments) and tokenize them for the task."""
    train, validation = read_splits(**split_args)
    task = split_args["task"]
    train_path, validation_path = split_args["train_path"], split_args["validation_path"]
    label_list = list(labels) if labels is not None else None
    fn = _make_tokenize(tokenizer, task, max_seq_len, split_args["text_column"],
                        split_args["prompt_template"], split_args["completion_column"],
                        split_args["label_column"], label_list)
    train_tok = _tokenize(train, fn, train_path)
    val_tok = _tokenize(validation, fn, validation_path or train_path)
    if len(val_tok) == 0 or len(train_tok) == 0:
        raise DataError(f"no example of {train_path} keeps a completion token within "
                        f"data.max_seq_len={max_seq_len}; raise data.max_seq_len")
    num_labels = len(label_list) if task == "classification" and label_list else (
        1 if task == "regression" else 0)
    cut = (task, max_seq_len, split_args.get("max_train_examples"),
           split_args.get("max_validation_examples"), split_args.get("seed"))
    return TaskData(
        train=train_tok,
        validation=val_tok,
        task=task,
        num_labels=num_labels,
        pad_token_id=int(tokenizer.pad_token_id),
        unk_token_id=int(tokenizer.unk_token_id if tokenizer.unk_token_id is not None
                         else tokenizer.pad_token_id),
        fingerprint=fingerprint_files([train_path, validation_path], repr(cut)),
        max_seq_len=max_seq_len,
        packing=packing and task == "causal_lm",
    )


def collate(rows: list[dict[str, Any]], task: str, pad_token_id: int) -> dict[str, Any]:
    """Right-pad a list of tokenized rows into tensors."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if task == "causal_lm":
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"], dtype=torch.long)
        batch["labels"] = labels
    elif task == "classification":
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    else:
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float32)
    return batch


# --------------------------------------------------------------------------- internals



def _renamed(ds: Any, rename: dict[str, str]) -> Any:
    mapping = {old: new for old, new in rename.items() if old in ds.column_names}
    return ds.rename_columns(mapping) if mapping else ds


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _required_columns(task: str, text_column: str | None, prompt_template: str | None,
                      completion_column: str | None, label_column: str) -> list[tuple[str, str]]:
    needed: list[tuple[str, str]] = []
    if prompt_template is not None:
        needed += [(c, "task.prompt_template") for c in _template_fields(prompt_template)]
    elif text_column is not None:
        needed.append((text_column, "task.text_column"))
    if task == "causal_lm" and completion_column is not None:
        needed.append((completion_column, "task.completion_column"))
    if task in ("classification", "regression"):
        needed.append((label_column, "task.label_column"))
    return needed


def _make_tokenize(tokenizer: Any, task: str, max_len: int, text_column: str | None,
                   prompt_template: str | None, completion_column: str | None,
                   label_column: str, labels: list[str] | None) -> Any:
    eos = tokenizer.eos_token_id

    def render(batch: dict[str, list[Any]], i: int) -> str:
        if prompt_template is not None:
            return prompt_template.format(**{k: v[i] for k, v in batch.items()})
        return str(batch[text_column][i])  # type: ignore[index]

    def label_id(value: Any) -> int:
        assert labels is not None
        if isinstance(value, str) and value in labels:
            return labels.index(value)
        try:
            index = int(value)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(labels):
            raise DataError(f"label {value!r} in column {label_column!r} is neither one of "
                            f"task.labels {labels} nor an index below {len(labels)}")
        return index

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        n = len(next(iter(batch.values())))
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": []}
        for i in range(n):
            if task == "causal_lm" and completion_column is not None:
                prompt = tokenizer(render(batch, i))["input_ids"]
                completion = tokenizer(str(batch[completion_column][i]),
                                       add_special_tokens=False)["input_ids"] + [eos]
                ids = (prompt + completion)[:max_len]
                target = ([-100] * len(prompt) + completion)[:max_len]
                if all(t == -100 for t in target):
                    continue  # the prompt fills the window: nothing to learn from
            elif task == "causal_lm":
                ids = (tokenizer(render(batch, i))["input_ids"] + [eos])[:max_len]
                target = list(ids)
            else:
                ids = tokenizer(render(batch, i), truncation=True, max_length=max_len)[
                    "input_ids"]
                raw = batch[label_column][i]
                if task == "classification":
                    target = label_id(raw)  # type: ignore[assignment]
                else:
                    try:
                        target = float(raw)  # type: ignore[assignment]
                    except (TypeError, ValueError):
                        raise DataError(f"label {raw!r} in column {label_column!r} is not a "
                                        "number; a regression task needs numeric labels") from None
            out["input_ids"].append(ids)
            out["labels"].append(target)
            out["length"].append(len(ids))
        return out

    return tokenize


def _tokenize(ds: Any, fn: Any, path: str) -> Any:
    # `map` caches its result by the fingerprint of (data, function, arguments).
    return ds.map(fn, batched=True, remove_columns=ds.column_names,
                  desc=f"tokenizing {Path(path).name}")
