"""Load a study's data with `datasets`, check every row, and tokenize it for the task.

`gemma-search create` reads the data through `read_splits` before anything is stored, and
workers read it through the same function, so they train on exactly the rows that were
checked. Bad data is refused with one line that names the file, the line (as an editor
numbers it), the column and the value (issue 11): a regression label that is not a finite
number, a classification label outside `task.labels`, empty text, bytes that are not UTF-8,
a line longer than `data.max_line_bytes`. Lines are measured, and UTF-8 checked, a chunk at
a time before any parser reads the file, so a 200 MB line is refused without being held.

Delimited files are read with every value as the text the file holds (no "N/A" turned into
a missing value), so a message shows the value the user wrote.

Tokenization goes through `Dataset.map`, whose results `datasets` caches on disk by
fingerprint: the second worker of a study, and every later trial, reuse the first one's work.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_search.errors import DataError, first_line

__all__ = [
    "MAX_LINE_BYTES",
    "TaskData",
    "collate",
    "fingerprint_files",
    "load_task_data",
    "read_arguments",
    "read_splits",
    "read_table",
]

#: Longest line a text data file may hold (`data.max_line_bytes`): far above any example a
#: tokenizer truncates to `max_seq_len`, far below a line that would exhaust a worker's memory.
MAX_LINE_BYTES = 8 * 2**20

_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
_CHUNK = 2**20
_CHECK_BATCH = 2**16
_SHOWN_CHARS = 60


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


def read_table(path: str, key: str, *, split: str = "train", header: bool = True,
               columns: Sequence[str] | None = None, max_line_bytes: int = MAX_LINE_BYTES,
               cache_dir: str | None = None) -> Any:
    """Read one data file (or `save_to_disk` folder) into a `datasets.Dataset`.

    `key` is the spec key that named the file, so errors can point at it. `header` and
    `columns` say how a .csv/.tsv file is laid out (`data.header`, `data.columns`).
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
    if fmt != "parquet":
        # A .json array is one document: datasets reads it whole, so lines mean nothing there.
        _check_bytes(p, key, None if _is_json_array(p) else max_line_bytes)
    if fmt in ("csv", "tsv"):
        names = _delimited_columns(p, key, header, columns)
        kwargs = {**read_arguments(str(p), header=header, columns=columns)["kwargs"],
                  "column_names": names,
                  "features": datasets.Features({n: datasets.Value("string") for n in names})}
        fmt = "csv"
    # datasets logs a parse failure before raising it; the DataError below says it in one line.
    library_log = logging.getLogger("datasets")
    level = library_log.level
    library_log.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train", cache_dir=cache_dir,
                                   **kwargs)
    except Exception as exc:  # pyarrow / pandas / json errors all mean "cannot parse"
        if fmt == "json":
            _explain_json(p, key)  # raises a DataError naming the line, when it finds one
        raise DataError(f"{key} file {p} cannot be parsed as {p.suffix.lstrip('.')}: "
                        f"{first_line(exc)}") from None
    finally:
        library_log.setLevel(level)
    if len(ds) == 0:
        raise DataError(f"{key} file {p} holds no rows; add examples to it")
    return ds


def read_arguments(path: str, *, header: bool = True,
                   columns: Sequence[str] | None = None) -> dict[str, Any]:
    """How `read_table` has `datasets` read a file, as plain JSON for export's data.json:
    `{"builder", "kwargs", "strings"}`. With `strings`, every column of a .csv/.tsv is read
    as the text the file holds (pandas would turn "N/A", "nan" or an empty cell into a
    missing value, and a message could not show what the user wrote); the column names are
    `kwargs["column_names"]`, or the file's first line when it is a header."""
    p = Path(path)
    if p.is_dir():
        return {"builder": "load_from_disk", "kwargs": {}, "strings": False}
    fmt = _FORMATS.get(p.suffix.lower(), p.suffix.lower().lstrip("."))
    if fmt not in ("csv", "tsv"):
        return {"builder": fmt, "kwargs": {}, "strings": False}
    kwargs: dict[str, Any] = {"header": 0 if header else None, "na_filter": False,
                              **_dialect(p)}
    if not header:
        kwargs["column_names"] = list(columns or ())
    return {"builder": "csv", "kwargs": kwargs, "strings": True}


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
    labels: Sequence[str] | None = None,
    max_train_examples: int | None = None,
    max_validation_examples: int | None = None,
    rename_columns: dict[str, str] | None = None,
    seed: int = 0,
    header: bool = True,
    columns: Sequence[str] | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> tuple[Any, Any]:
    """Read, check and cut the raw train and validation splits (no tokenizer needed).

    Every row of both files is checked, so whatever rows a trial samples are good.
    `gemma-search create` calls this to refuse bad data before anything is stored.
    """
    needed = _required_columns(task, text_column, prompt_template, completion_column,
                               label_column)
    reading: dict[str, Any] = {
        "rename": rename_columns or {}, "needed": needed, "task": task,
        "labels": list(labels) if labels is not None else None, "header": header,
        "columns": columns, "max_line_bytes": max_line_bytes}
    train = _read_checked(train_path, "data.train", "train", **reading)
    if validation_path is not None:
        validation = _read_checked(validation_path, "data.validation", "validation",
                                   **reading)
    else:
        try:
            parts = train.train_test_split(test_size=validation_fraction, seed=seed)
        except ValueError:  # datasets: "the resulting train set will be empty"
            raise DataError(f"data.train file {train_path} has {len(train)} row(s): holding "
                            f"out data.validation_fraction={validation_fraction} of them for "
                            "validation leaves none to train on; add rows, lower "
                            "data.validation_fraction or set data.validation") from None
        train, validation = parts["train"], parts["test"]
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
    train, validation = read_splits(labels=labels, **split_args)
    task = split_args["task"]
    train_path, validation_path = split_args["train_path"], split_args["validation_path"]
    label_list = list(labels) if labels is not None else None

    def tokenize(ds: Any, path: str, key: str) -> Any:
        fn = _make_tokenize(tokenizer, task, max_seq_len, split_args["text_column"],
                            split_args["prompt_template"], split_args["completion_column"],
                            split_args["label_column"], label_list, f"{key} file {path}")
        # `map` caches its result by the fingerprint of (data, function, arguments).
        return ds.map(fn, batched=True, remove_columns=ds.column_names,
                      desc=f"tokenizing {Path(path).name}")

    train_tok = tokenize(train, train_path, "data.train")
    val_tok = (tokenize(validation, validation_path, "data.validation") if validation_path
               else tokenize(validation, train_path, "data.train"))
    if len(val_tok) == 0 or len(train_tok) == 0:
        raise DataError(f"no example of {train_path} keeps a completion token within "
                        f"data.max_seq_len={max_seq_len}; raise data.max_seq_len")
    num_labels = len(label_list) if task == "classification" and label_list else (
        1 if task == "regression" else 0)
    cut: tuple[Any, ...] = (task, max_seq_len, split_args.get("max_train_examples"),
                            split_args.get("max_validation_examples"), split_args.get("seed"))
    if not split_args.get("header", True):  # other rows: header-less files read line 1 too
        cut += (tuple(split_args.get("columns") or ()),)
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


# --------------------------------------------------------------------------- reading checks


def _check_bytes(path: Path, key: str, max_line_bytes: int | None) -> None:
    """Refuse an empty file, a line over `max_line_bytes`, or bytes that are not UTF-8.

    Reads 1 MiB at a time, so memory stays bounded whatever the file holds: a single 200 MB
    line once passed `create` and then got a worker killed for memory (issue 11).
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, length, offset, line_start, blank = 1, 0, 0, 0, True
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            if max_line_bytes is not None:
                long = _first_long_line(chunk, length, max_line_bytes)
                if long is not None:
                    raise DataError(f"{key} file {path} line {line + long} is longer than "
                                    f"data.max_line_bytes ({max_line_bytes} bytes), so it is "
                                    "not read; shorten or remove that row, or raise "
                                    "data.max_line_bytes")
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = exc.start - pending  # in this chunk; < 0: in the previous one
                before = chunk.count(b"\n", 0, max(at, 0))
                start = (offset + chunk.rfind(b"\n", 0, at) + 1 if before else line_start)
                _not_utf8(path, key, line + before, start, offset + at, max_line_bytes)
            blank = blank and not chunk.strip()
            newlines = chunk.count(b"\n")
            if newlines:
                last = chunk.rfind(b"\n")
                length, line_start = len(chunk) - last - 1, offset + last + 1
            else:
                length += len(chunk)
            line += newlines
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:  # the file ends inside a multi-byte character
        _not_utf8(path, key, line, line_start, offset - len(decoder.getstate()[0]),
                  max_line_bytes)
    if blank:
        raise DataError(f"{key} file {path} is empty; put the examples in it, or point {key} "
                        "at the file that holds them")


def _first_long_line(chunk: bytes, carried: int, limit: int) -> int | None:
    """Index among the lines `chunk` touches of the first longer than `limit` bytes;
    `carried` bytes of its first line came in earlier chunks."""
    if carried + len(chunk) <= limit:
        return None  # no line here can be longer (the common case: one comparison)
    start, index = 0, 0
    while True:
        end = chunk.find(b"\n", start)
        stop = len(chunk) if end < 0 else end
        if carried + stop - start > limit:
            return index
        if end < 0:
            return None
        carried, start, index = 0, end + 1, index + 1


def _not_utf8(path: Path, key: str, line: int, line_start: int, at: int,
              max_line_bytes: int | None) -> None:
    """Raise the DataError for a byte at file offset `at` (on `line`) that is not UTF-8."""
    column, value = None, None
    first = max(line_start, at - 20)
    with path.open("rb") as fh:
        fh.seek(first)
        around = fh.read(at - first + 20)  # 20 bytes either side, within the line
        if max_line_bytes is not None:  # the line's length is bounded: find its column
            fh.seek(line_start)
            column, value = _value_holding_bad_bytes(path, fh.readline(max_line_bytes + 1),
                                                     line)
    pos, bad = at - line_start, around[at - first]
    if value is None:
        value = around.split(b"\n")[0]
    shown = value.rstrip(b"\r").decode("utf-8", "backslashreplace")
    where = f"line {line}" + (f", column {column!r}" if column else "")
    raise DataError(f"{key} file {path} {where}: '{shown}' is not valid UTF-8 (byte "
                    f"0x{bad:02x} at byte {pos + 1} of the line); save the file as UTF-8, "
                    "e.g. `iconv -f latin1 -t utf-8`") from None


def _value_holding_bad_bytes(path: Path, raw: bytes, line: int
                             ) -> tuple[str | None, bytes | None]:
    """Best effort: the column, and its value's bytes, that hold line `raw`'s bad bytes."""
    text = raw.decode("utf-8", "surrogateescape")

    def bad(value: Any) -> bool:
        return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)

    def as_bytes(value: str) -> bytes:
        return value.encode("utf-8", "surrogateescape")

    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            record = json.loads(text)
            if isinstance(record, dict):
                found = next(((str(k), v) for k, v in record.items() if bad(v)), None)
                if found is not None:
                    return found[0], as_bytes(found[1])
        elif suffix in (".csv", ".tsv") and line > 1:
            fields = next(csv.reader([text], **_dialect(path)))
            with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
                names = next(csv.reader(fh, **_dialect(path)))
            index = next((i for i, v in enumerate(fields) if bad(v)), None)
            if index is not None and index < len(names):
                return names[index], as_bytes(fields[index])
    except (ValueError, csv.Error, StopIteration):
        pass
    return None, None


def _dialect(path: Path) -> dict[str, Any]:
    if path.suffix.lower() == ".tsv":
        # GLUE-style TSVs hold bare quotes inside sentences: never treat them as quoting.
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    return {"delimiter": ",", "quoting": csv.QUOTE_MINIMAL}


def _is_json_array(path: Path) -> bool:
    if path.suffix.lower() != ".json":
        return False
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n")
    return head.startswith(b"[")


def _delimited_columns(path: Path, key: str, header: bool,
                       columns: Sequence[str] | None) -> list[str]:
    """The column names of a .csv/.tsv file, after checking its records.

    Refuses a header naming a column twice, a file with a header line and no rows, and a
    record with more fields than there are columns: pandas would shift such a record into
    an index column or stop with its own words.
    """
    # A quoted .csv value may span lines; Python's default cap (128 KiB) is no limit of ours.
    csv.field_size_limit(max(csv.field_size_limit(), path.stat().st_size))
    names: list[str] | None = None if header else list(columns or ())
    rows, previous = 0, 0
    with path.open(encoding="utf-8-sig", newline="") as fh:  # a BOM is not part of a name
        reader = csv.reader(fh, **_dialect(path))
        try:
            for record in reader:
                start, previous = previous + 1, reader.line_num
                if not record:
                    continue  # a blank line: pandas skips it too
                if names is None:
                    names = _header_names(path, key, record, start)
                    continue
                rows += 1
                if len(record) > len(names):
                    named_by = f"line 1 names {len(names)}" if header else (
                        f"data.columns names {len(names)}")
                    raise DataError(
                        f"{key} file {path} line {start} has {len(record)} fields but "
                        f"{named_by} ({', '.join(names)}); a value holding the delimiter "
                        f"splits in two: {_delimiter_fix(path)}, or remove the row")
        except csv.Error as exc:
            raise DataError(f"{key} file {path} line {reader.line_num} cannot be parsed as "
                            f"{path.suffix.lstrip('.')}: {exc}; fix or remove that row") from None
    if names is None:
        raise DataError(f"{key} file {path} is empty; put the examples in it, or point {key} "
                        "at the file that holds them")
    if rows == 0:
        if header:
            raise DataError(f"{key} file {path} has a header line ({', '.join(names)}) but no "
                            "rows under it; add the examples, or if that line is an example, "
                            "set data.header: false and data.columns")
        raise DataError(f"{key} file {path} holds no rows; add examples to it")
    return names


def _header_names(path: Path, key: str, record: list[str], line: int) -> list[str]:
    # pandas names an unnamed column "Unnamed: i"; keep its names for files read before.
    names = [cell if cell else f"Unnamed: {i}" for i, cell in enumerate(record)]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{key} file {path} line {line} names column {name!r} twice; a "
                            "header names each column once: rename one, or if that line is "
                            "an example, set data.header: false and data.columns")
        seen.add(name)
    return names


def _delimiter_fix(path: Path) -> str:
    if path.suffix.lower() == ".tsv":
        return "remove the tab from the value"
    return 'quote the value ("a, b")'


def _explain_json(path: Path, key: str) -> None:
    """After `datasets` failed on a JSON file: raise a DataError naming the line at fault,
    if a plain read finds one (a line that is not JSON, not an object, or a column whose
    values change kind)."""
    records: Any
    if _is_json_array(path):
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig"))
        except ValueError as exc:
            raise DataError(f"{key} file {path} is not valid JSON: {exc}; fix it, or write "
                            "one JSON object per line (.jsonl)") from None
        if not isinstance(records, list):
            return
        where = "record"
        numbered: Any = enumerate(records, 1)
    else:
        where = "line"
        numbered = _json_lines(path, key)
    kinds: dict[str, tuple[str, int]] = {}
    for number, record in numbered:
        if not isinstance(record, dict):
            raise DataError(f"{key} file {path} {where} {number} holds {_json_kind(record)}, "
                            'not an object of columns like {"text": ..., "label": ...}; fix '
                            "or remove it")
        for column, value in record.items():
            kind = _json_kind(value)
            if kind == "null":
                continue
            first, first_number = kinds.setdefault(str(column), (kind, number))
            if kind != first:
                raise DataError(f"{key} file {path} {where} {number}, column {column!r}: "
                                f"{_show(value)} is {kind} where {where} {first_number} holds "
                                f"{first}; a column holds one kind of value: fix the value "
                                "or remove the row")


def _json_lines(path: Path, key: str) -> Any:
    with path.open("rb") as fh:  # every line is within data.max_line_bytes by now
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw)
            except ValueError as exc:
                raise DataError(f"{key} file {path} line {number} is not valid JSON ({exc}); "
                                "fix or remove that line") from None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


# --------------------------------------------------------------------------- row checks


def _read_checked(path: str, key: str, split: str, *, rename: dict[str, str],
                  needed: list[tuple[str, str, str]], task: str, labels: list[str] | None,
                  header: bool, columns: Sequence[str] | None, max_line_bytes: int) -> Any:
    """`read_table`, renamed, with the task's columns present and every row's values valid."""
    ds = read_table(path, key, split=split, header=header, columns=columns,
                    max_line_bytes=max_line_bytes)
    file_names = list(ds.column_names)
    ds = _renamed(ds, rename)
    for column, spec_key, _ in needed:
        if column not in ds.column_names:
            raise DataError(f"{key} file {path} has no column {column!r} (named by "
                            f"{spec_key}); its columns are: {', '.join(ds.column_names)}"
                            f"{_header_hint(path, header, file_names, labels)}")
    _check_leaks(path, key, needed, ds.column_names)
    in_file = {new: old for old, new in rename.items() if old in file_names}
    for column, spec_key, rule in needed:
        index = 0
        for batch in ds.select_columns([column]).iter(batch_size=_CHECK_BATCH):
            for value in batch[column]:
                problem = _problem(rule, value, spec_key, task, labels)
                if problem is not None:
                    raise DataError(f"{key} file {path} {_place(Path(path), header, index)}, "
                                    f"column {in_file.get(column, column)!r}: {problem}")
                index += 1
    return ds


def _renamed(ds: Any, rename: dict[str, str]) -> Any:
    mapping = {old: new for old, new in rename.items() if old in ds.column_names}
    return ds.rename_columns(mapping) if mapping else ds


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _required_columns(task: str, text_column: str | None, prompt_template: str | None,
                      completion_column: str | None, label_column: str
                      ) -> list[tuple[str, str, str]]:
    """(column, spec key, rule) for each column the task reads; rules: text (non-empty),
    field (a template field: present, may be empty), label, number."""
    needed: list[tuple[str, str, str]] = []
    if prompt_template is not None:
        needed += [(c, "task.prompt_template", "field")
                   for c in dict.fromkeys(_template_fields(prompt_template))]
    elif text_column is not None:
        needed.append((text_column, "task.text_column", "text"))
    if task == "causal_lm" and completion_column is not None:
        needed.append((completion_column, "task.completion_column", "text"))
    if task == "classification":
        needed.append((label_column, "task.label_column", "label"))
    elif task == "regression":
        needed.append((label_column, "task.label_column", "number"))
    return needed


def _check_leaks(path: str, key: str, needed: list[tuple[str, str, str]],
                 names: list[str]) -> None:
    """Refuse a target column the model also reads: it would learn to copy its input."""
    inputs = {column: spec_key for column, spec_key, rule in needed
              if spec_key in ("task.text_column", "task.prompt_template")}
    for column, spec_key, _ in needed:
        if spec_key in ("task.label_column", "task.completion_column") and column in inputs:
            raise DataError(f"{spec_key} is {column!r}, which {inputs[column]} also names: the "
                            "model would read the answer in its input; name the column that "
                            f"holds the {'label' if 'label' in spec_key else 'completion'} "
                            f"(the columns of {key} file {path}: {', '.join(names)})")


def _header_hint(path: str, header: bool, names: list[str],
                 labels: list[str] | None) -> str:
    """For a delimited file whose required column is missing: say so when line 1 looks
    like data (a number, a label, a sentence), the mark of a file without a header."""
    if not header or Path(path).suffix.lower() not in (".csv", ".tsv"):
        return ""
    looks_like_data = next((n for n in names if _number(n) is not None
                            or (labels is not None and n in labels)
                            or (" " in n.strip() and len(n) > 30)), None)
    if looks_like_data is None:
        return ("; if line 1 is an example rather than a header, set data.header: false and "
                "data.columns: [names in file order]")
    return (f"; line 1 looks like an example, not a header (it holds {_show(looks_like_data)}): "
            "if the file has no header line, set data.header: false and data.columns: "
            "[names in file order]")


def _problem(rule: str, value: Any, spec_key: str, task: str,
             labels: list[str] | None) -> str | None:
    """What is wrong with one value under `rule`, with the fix; None when it is fine."""
    if rule == "text":
        if value is None or not str(value).strip():
            return (f"{_show(value)} is empty, but {spec_key} must hold text for every "
                    f"example; fill it in or remove the row")
    elif rule == "field":
        if value is None:
            return (f"{_show(value)} has no value, but {spec_key} uses this column; give it "
                    "one (empty text is fine) or remove the row")
    elif rule == "number":
        if _number(value) is None:
            return (f"{_show(value)} is not a finite number, but a {task} label must be one "
                    "(e.g. 3.5); fix the value or remove the row")
    elif rule == "label" and labels is not None and _label_index(value, labels) is None:
        return (f"{_show(value)} is neither one of task.labels ({', '.join(labels)}) nor an "
                f"index below {len(labels)}; fix the value, remove the row, or add it to "
                "task.labels")
    return None


def _number(value: Any) -> float | None:
    """A regression label as a finite float; None for text, booleans, nan and inf."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)  # "N/A" and "" fail here; "nan" and "inf" parse
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _label_index(value: Any, labels: list[str]) -> int | None:
    """A classification label as its index: a name in `labels`, or an index below their
    count (an integer, or its digits as text)."""
    if isinstance(value, str):
        if value in labels:
            return labels.index(value)
        text = value.strip()
        index = int(text) if text.isdigit() else -1
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    else:
        return None
    return index if 0 <= index < len(labels) else None


def _show(value: Any) -> str:
    """A value as the file wrote it, on one line and short."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 4] + "...'"


def _place(path: Path, header: bool, index: int) -> str:
    """Where row `index` (0-based, in file order) is, as an editor shows it: its line."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        records, previous = -1 if header else 0, 0
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, **_dialect(path))
            for record in reader:
                start, previous = previous + 1, reader.line_num
                if not record:
                    continue
                if records == index:
                    return f"line {start}"
                records += 1
    elif suffix == ".jsonl" or (suffix == ".json" and not _is_json_array(path)):
        records = 0
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue  # pyarrow skips blank lines
                if records == index:
                    return f"line {number}"
                records += 1
    elif suffix == ".json":
        return f"record {index + 1}"
    return f"row {index + 1}"


# --------------------------------------------------------------------------- tokenization


def _make_tokenize(tokenizer: Any, task: str, max_len: int, text_column: str | None,
                   prompt_template: str | None, completion_column: str | None,
                   label_column: str, labels: list[str] | None, source: str) -> Any:
    """The batched `map` function for one split; `source` ("data.train file PATH") names it
    in errors. `read_splits` checked every value first, so these errors should not fire."""
    eos = tokenizer.eos_token_id

    def render(batch: dict[str, list[Any]], i: int) -> str:
        if prompt_template is not None:
            return prompt_template.format(**{k: v[i] for k, v in batch.items()})
        return str(batch[text_column][i])  # type: ignore[index]

    rule = "label" if task == "classification" else "number"

    def target_of(raw: Any) -> int | float:
        value: int | float | None
        if task == "classification":
            assert labels is not None
            value = _label_index(raw, labels)
        else:
            value = _number(raw)
        if value is None:
            problem = _problem(rule, raw, "task.label_column", task, labels)
            raise DataError(f"{source}, column {label_column!r}: {problem}")
        return value

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        n = len(next(iter(batch.values())))
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": []}
        for i in range(n):
            target: Any
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
                target = target_of(batch[label_column][i])
            out["input_ids"].append(ids)
            out["labels"].append(target)
            out["length"].append(len(ids))
        return out

    return tokenize
