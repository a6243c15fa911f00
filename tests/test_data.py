"""Data loading: files of every format, clear errors, prompt masking, cached tokenization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gemma_search.errors import DataError
from gemma_search.train.data import collate, load_task_data, read_splits, read_table

from .conftest import SST2


def split_args(train: Path, validation: Path | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "task": "classification", "train_path": str(train),
        "validation_path": str(validation) if validation else None,
        "validation_fraction": 0.2, "text_column": "text", "prompt_template": None,
        "completion_column": None, "label_column": "label",
    }
    args.update(kw)
    return args


def test_missing_file_names_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_table(str(tmp_path / "nope.jsonl"), "data.train")
    assert str(info.value).startswith(f"data.train file {tmp_path / 'nope.jsonl'} does not exist")
    assert "--set data.train=" in str(info.value)


def test_unparsable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": 1}\nthis is not json\n')
    with pytest.raises(DataError, match=r"data.train file .*bad.jsonl line 2 is not valid JSON"):
        read_table(str(bad), "data.train")


def test_unknown_suffix(tmp_path: Path) -> None:
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match="use .jsonl, .json, .csv, .tsv, .parquet"):
        read_table(str(odd), "data.train")


def test_missing_column_names_file_column_and_key(demo_data: tuple[Path, Path]) -> None:
    train, validation = demo_data
    with pytest.raises(DataError) as info:
        read_splits(**split_args(train, validation, text_column="sentence"))
    message = str(info.value)
    assert "has no column 'sentence' (named by task.text_column)" in message
    assert str(train) in message and "text, label" in message


def test_empty_validation_file(tmp_path: Path, demo_data: tuple[Path, Path]) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError, match="empty"):
        read_splits(**split_args(demo_data[0], empty))


def test_validation_fraction_holds_out_rows(demo_data: tuple[Path, Path]) -> None:
    train, validation = read_splits(**split_args(demo_data[0], None, max_train_examples=100))
    assert len(train) == 100
    assert len(validation) == 80  # 20% of the 400 rows


@pytest.mark.parametrize("fmt", ["csv", "parquet", "save_to_disk"])
def test_other_formats(tmp_path: Path, demo_data: tuple[Path, Path], fmt: str) -> None:
    ds = read_table(str(demo_data[0]), "data.train")
    if fmt == "csv":
        path = tmp_path / "train.csv"
        ds.to_csv(str(path), index=False)
    elif fmt == "parquet":
        path = tmp_path / "train.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    again = read_table(str(path), "data.train")
    assert again.column_names == ["text", "label"] and len(again) == len(ds)


def test_sst2_tsv_reads_with_renamed_dev_column() -> None:
    if not SST2.exists():
        pytest.skip(f"SST-2 is not at {SST2}")
    train, validation = read_splits(**split_args(
        SST2 / "train.tsv", SST2 / "dev.tsv", text_column="sentence",
        rename_columns={"content": "sentence"}, max_train_examples=500))
    assert len(validation) == 872 and len(train) == 500
    assert set(validation["label"]) == {"0", "1"}  # delimited values: the text the file holds


def test_causal_lm_masks_the_prompt(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    path = tmp_path / "sft.jsonl"
    rows = [{"q": f"what is {i} plus {i}?", "a": str(2 * i)} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_task_data(tokenizer=tok, max_seq_len=64, labels=None, **split_args(
        path, None, task="causal_lm", text_column=None, prompt_template="question: {q} answer:",
        completion_column="a", validation_fraction=0.25))
    row = data.train[0]
    prompt_len = row["labels"].count(-100)
    assert prompt_len > 0
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["input_ids"][-1] == tok.eos_token_id  # the completion ends with <eos>
    batch = collate([data.train[0], data.train[1]], "causal_lm", tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape


def test_tokenization_is_cached_across_loads(demo_data: tuple[Path, Path],
                                             tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    kwargs = split_args(*demo_data)
    first = load_task_data(tokenizer=tok, max_seq_len=32, labels=["negative", "positive"],
                           **kwargs)
    second = load_task_data(tokenizer=AutoTokenizer.from_pretrained(tiny_model), max_seq_len=32,
                            labels=["negative", "positive"], **kwargs)
    assert first.train.cache_files and first.train.cache_files == second.train.cache_files
    assert first.fingerprint == second.fingerprint


def test_unknown_label_is_a_data_error(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps({"text": "x", "label": "maybe"}) + "\n"
                            for _ in range(10)))
    # A worker reads through the same checks as `create`: the row is named before tokenizing.
    with pytest.raises(DataError, match=r"odd.jsonl line 1, column 'label': 'maybe' is neither"):
        load_task_data(tokenizer=AutoTokenizer.from_pretrained(tiny_model), max_seq_len=16,
                       labels=["negative", "positive"], **split_args(path))


def test_a_worker_reads_a_header_less_file_as_create_checked_it(tmp_path: Path,
                                                                 tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "scores.tsv"
    path.write_text("".join(f"{i / 10}\tsentence number {i}\n" for i in range(10)))
    data = load_task_data(tokenizer=AutoTokenizer.from_pretrained(tiny_model), max_seq_len=16,
                          labels=None, **split_args(
                              path, None, task="regression", text_column="sentence",
                              header=False, columns=["label", "sentence"]))
    assert len(data.train) + len(data.validation) == 10  # line 1 is an example too
    assert sorted([*data.train["labels"], *data.validation["labels"]]) == pytest.approx(
        [i / 10 for i in range(10)])


def test_an_over_long_line_is_refused_without_being_read_whole(tmp_path: Path) -> None:
    import tracemalloc

    import datasets  # noqa: F401  (imported before measuring: its import allocates a lot)

    from gemma_search.train.data import MAX_LINE_BYTES

    path = tmp_path / "huge.jsonl"
    with path.open("w") as fh:
        fh.write(json.dumps({"text": "short", "label": 1}) + "\n")
        fh.write(json.dumps({"text": "x" * (3 * MAX_LINE_BYTES), "label": 2}) + "\n")
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"huge.jsonl line 2 is longer than "
                                             rf"data.max_line_bytes \({MAX_LINE_BYTES} bytes\)"):
            read_table(str(path), "data.train")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_LINE_BYTES / 2  # read a chunk at a time, never the line


@pytest.mark.parametrize("chunk", [1, 7, 2**20])
def test_byte_checks_name_the_line_whatever_the_read_size(tmp_path: Path, chunk: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from gemma_search.train import data

    monkeypatch.setattr(data, "_CHUNK", chunk)  # the file is read this many bytes at a time
    good = json.dumps({"text": "ok", "label": 1}).encode() + b"\n"
    path = tmp_path / "train.jsonl"
    path.write_bytes(good * 3 + '{"text": "caf\xe9 x", "label": 2}\n'.encode("latin1") + good)
    with pytest.raises(DataError, match=r"line 4, column 'text': 'caf\\xe9 x' is not valid UTF-8 "
                                        r"\(byte 0xe9 at byte 14 of the line\)"):
        read_table(str(path), "data.train")
    path.write_bytes(good + '{"text": "\u20ac'.encode()[:-1])  # ends inside a character
    with pytest.raises(DataError, match=r"line 2: '{\"text\": \"\\xe2\\x82' is not valid UTF-8"):
        read_table(str(path), "data.train")
    path.write_bytes(good * 3 + b'{"text": "' + b"x" * 100 + b'"}\n' + good)
    with pytest.raises(DataError, match=r"line 4 is longer than data.max_line_bytes \(60 bytes"):
        read_table(str(path), "data.train", max_line_bytes=60)
