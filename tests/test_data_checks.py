"""`gemma-search create` checks every row before anything is stored (issue 11).

Each bad file is refused with exit code 1 and one line naming the file, the line (as an
editor numbers it), the column and the value, and nothing reaches the storage. The model
named is a hub id: `create` never loads the model, so none is needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemma_search.cli import app

ROWS = [("a fine film", 4.5), ("dull and long", 1.0), ("it was fine", 3.0)]


@pytest.fixture(autouse=True)
def _no_progress_bars() -> Iterator[None]:
    """As in a fresh `gemma-search` process, where the CLI turns them off before `datasets`
    is imported; in this test process another test may have imported it first."""
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def spec_text(train: Path, *, task: str = "regression", text_column: str = "text",
              extra_task: str = "", extra_data: str = "") -> str:
    labels = "\n  labels: [negative, positive]" if task == "classification" else ""
    return f"""
name: checks
model: {{name_or_path: google/gemma-2-9b}}
task:
  type: {task}
  text_column: {text_column}{labels}{extra_task}
data:
  train: {train}
  validation_fraction: 0.25{extra_data}
budget: {{max_trials: 2, eval_every_steps: 10}}
warm_start: {{presets: [gemma2-lora]}}
"""


def create(tmp_path: Path, train: Path, **spec: str) -> tuple[int, list[str], Path]:
    """Run `create` on a spec over `train`; the exit code, the non-blank output lines, and
    the SQLite file the study would be stored in."""
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(train, **spec))
    db = tmp_path / "study.db"
    result = CliRunner().invoke(app, ["create", str(path), "--storage", f"sqlite:///{db}"])
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()], db


def assert_refused(code: int, lines: list[str], db: Path, *fragments: str) -> None:
    """Exit code 1, one line naming all of `fragments`, no traceback, and no storage."""
    assert code == 1, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not db.exists()  # nothing stored: the data is read before the storage is opened


def csv_file(tmp_path: Path, rows: list[tuple[str, object]], *, name: str = "train.csv",
             header: str | None = "text,label") -> Path:
    path = tmp_path / name
    lines = [header] if header is not None else []
    lines += [f"{text},{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("label", ["five", "N/A", "nan", "inf", ""])
def test_a_regression_label_that_is_not_a_finite_number(tmp_path: Path, label: str) -> None:
    train = csv_file(tmp_path, [*ROWS, ("the bad one", label), *ROWS])
    code, lines, db = create(tmp_path, train)
    # Data row 4 is line 5: line 1 is the header. The value is the text the file holds.
    assert_refused(code, lines, db, f"data.train file {train} line 5, column 'label': "
                   f"{label!r} is not a finite number", "fix the value or remove the row")


def test_text_labels_on_a_regression_task(tmp_path: Path) -> None:
    train = csv_file(tmp_path, [("a fine film", "positive"), ("dull", "negative")] * 3)
    code, lines, db = create(tmp_path, train)
    assert_refused(code, lines, db, f"{train} line 2, column 'label': 'positive' is not a "
                   "finite number, but a regression label must be one")


def test_a_bad_label_in_a_jsonl_file_of_numbers(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    rows = [{"text": text, "label": label} for text, label in ROWS * 2]
    rows.insert(3, {"text": "the bad one", "label": "five"})
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, lines, db = create(tmp_path, train)
    assert_refused(code, lines, db, f"{train} line 4, column 'label': 'five' is not a finite "
                   "number")


def test_a_classification_label_outside_task_labels(tmp_path: Path) -> None:
    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\ngood\tpositive\nbad\tnegative\nhm\tmaybe\nok\t1\nno\t0\n")
    code, lines, db = create(tmp_path, train, task="classification")
    assert_refused(code, lines, db, f"{train} line 4, column 'label': 'maybe' is neither one "
                   "of task.labels (negative, positive) nor an index below 2",
                   "add it to task.labels")


def test_an_index_past_the_labels(tmp_path: Path) -> None:
    train = csv_file(tmp_path, [("good", 1), ("bad", 0), ("odd", 2), ("fine", 1)])
    code, lines, db = create(tmp_path, train, task="classification")
    assert_refused(code, lines, db, f"{train} line 4, column 'label': '2' is neither one of")


def test_empty_text(tmp_path: Path) -> None:
    train = csv_file(tmp_path, [*ROWS, ("", 2.0)])
    code, lines, db = create(tmp_path, train)
    assert_refused(code, lines, db, f"{train} line 5, column 'text': '' is empty, but "
                   "task.text_column must hold text", "fill it in or remove the row")


def test_an_empty_completion(tmp_path: Path) -> None:
    train = tmp_path / "sft.jsonl"
    rows = [{"q": f"what is {i} plus {i}?", "a": str(2 * i)} for i in range(6)]
    rows[2]["a"] = "  "
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, lines, db = create(tmp_path, train, task="causal_lm", extra_task=(
        "\n  prompt_template: 'question: {q} answer:'\n  completion_column: a"))
    assert_refused(code, lines, db, f"{train} line 3, column 'a': '  ' is empty, but "
                   "task.completion_column must hold text")


def test_a_bad_row_in_the_validation_file_names_that_file(tmp_path: Path) -> None:
    train = csv_file(tmp_path, ROWS * 2)
    validation = csv_file(tmp_path, [*ROWS, ("the bad one", "N/A")], name="dev.csv")
    code, lines, db = create(tmp_path, train, extra_data=f"\n  validation: {validation}")
    assert_refused(code, lines, db, f"data.validation file {validation} line 5, column "
                   "'label': 'N/A' is not a finite number")


def test_a_renamed_column_is_named_as_the_file_names_it(tmp_path: Path) -> None:
    train = csv_file(tmp_path, [*ROWS, ("", 1.0)], header="content,label")
    code, lines, db = create(tmp_path, train, extra_data="\n  rename_columns: {content: text}")
    assert_refused(code, lines, db, f"{train} line 5, column 'content': '' is empty")


def test_a_header_less_file_declared_as_such(tmp_path: Path) -> None:
    from gemma_search.study import load_study, split_args
    from gemma_search.train.data import read_splits

    train = tmp_path / "scores.tsv"
    train.write_text("".join(f"{label}\t{text}\n" for text, label in ROWS * 4))
    code, lines, db = create(tmp_path, train, extra_data=(
        "\n  header: false\n  columns: [label, text]"))
    assert code == 0, lines
    # Workers read the stored spec through the same path: line 1 is an example too.
    _, spec = load_study("checks", f"sqlite:///{db}")
    train_split, validation = read_splits(labels=None, **split_args(spec))
    assert len(train_split) + len(validation) == 12
    rows = [*train_split, *validation]
    assert {"label": "4.5", "text": "a fine film"} in rows


def test_a_header_less_file_not_declared(tmp_path: Path) -> None:
    train = tmp_path / "scores.tsv"
    train.write_text("".join(f"{label}\t{text}\n" for text, label in ROWS * 4))
    code, lines, db = create(tmp_path, train)
    assert_refused(code, lines, db, f"data.train file {train} has no column 'text'",
                   "its columns are: 4.5, a fine film",
                   "line 1 looks like an example, not a header (it holds '4.5')",
                   "set data.header: false and data.columns")


def test_a_header_naming_a_column_twice(tmp_path: Path) -> None:
    train = csv_file(tmp_path, ROWS, header="text,text")
    code, lines, db = create(tmp_path, train)
    assert_refused(code, lines, db, f"{train} line 1 names column 'text' twice")


def test_a_row_with_more_fields_than_columns(tmp_path: Path) -> None:
    train = csv_file(tmp_path, [*ROWS, ("one, two", 2.0)])  # an unquoted comma in the text
    code, lines, db = create(tmp_path, train)
    assert_refused(code, lines, db, f"{train} line 5 has 3 fields but line 1 names 2 "
                   "(text, label)", 'quote the value ("a, b")')


def test_an_empty_file(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("")
    code, lines, db = create(tmp_path, train)
    assert_refused(code, lines, db, f"data.train file {train} is empty")


def test_a_file_with_a_header_and_no_rows(tmp_path: Path) -> None:
    train = csv_file(tmp_path, [])
    code, lines, db = create(tmp_path, train)
    assert_refused(code, lines, db, f"data.train file {train} has a header line (text, label) "
                   "but no rows under it")


def test_invalid_utf8_in_a_jsonl_file(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    good = "".join(json.dumps({"text": t, "label": v}) + "\n" for t, v in ROWS)
    train.write_bytes(good.encode() + b'{"text": "caf\xe9 au lait", "label": 2.0}\n')
    code, lines, db = create(tmp_path, train)
    assert_refused(code, lines, db, f"{train} line 4, column 'text': 'caf\\xe9 au lait' is not "
                   "valid UTF-8 (byte 0xe9", "save the file as UTF-8")


def test_a_line_over_data_max_line_bytes(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    rows = [{"text": t, "label": v} for t, v in ROWS]
    rows.insert(1, {"text": "x" * 500, "label": 2.0})
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, lines, db = create(tmp_path, train, extra_data="\n  max_line_bytes: 200")
    assert_refused(code, lines, db, f"{train} line 2 is longer than data.max_line_bytes "
                   "(200 bytes)", "raise data.max_line_bytes")


def test_a_label_column_that_is_the_text_column(tmp_path: Path) -> None:
    train = csv_file(tmp_path, ROWS)
    code, lines, db = create(tmp_path, train, extra_task="\n  label_column: text")
    assert_refused(code, lines, db, "task.label_column is 'text', which task.text_column also "
                   "names", f"data.train file {train}: text, label")


def test_a_label_column_that_is_a_template_field(tmp_path: Path) -> None:
    train = csv_file(tmp_path, ROWS)
    code, lines, db = create(tmp_path, train, extra_task=(
        "\n  prompt_template: 'Review: {text} ({label})'"))
    assert_refused(code, lines, db, "task.label_column is 'label', which task.prompt_template "
                   "also names")


@pytest.mark.parametrize(("data", "message"), [
    ("\n  header: false", "data.columns is missing; with data.header: false"),
    ("\n  columns: [label, text]", "data.columns is ['label', 'text'] but data.header is true"),
    ("\n  header: false\n  columns: [text, text]", "data.columns names 'text' twice"),
    ("\n  header: false\n  columns: [text, '']", "data.columns[1] is '' but must be a "
                                                  "non-empty string"),
    ("\n  max_line_bytes: 0", "data.max_line_bytes is 0 but must be >= 1"),
])
def test_data_layout_keys_are_checked(tmp_path: Path, data: str, message: str) -> None:
    code, lines, db = create(tmp_path, csv_file(tmp_path, ROWS), extra_data=data)
    assert_refused(code, lines, db, message)


def test_header_false_needs_a_delimited_file(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": v}) + "\n" for t, v in ROWS))
    code, lines, db = create(tmp_path, train, extra_data=(
        "\n  header: false\n  columns: [text, label]"))
    assert_refused(code, lines, db, "data.header is false but no data file is .csv or .tsv")


def test_refused_data_leaves_no_study_in_the_storage(tmp_path: Path, storage_url: str) -> None:
    import optuna

    from gemma_search.storage import open_storage

    name = f"refused-{tmp_path.name[-16:]}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(csv_file(tmp_path, [*ROWS, ("bad", "N/A")])))
    result = CliRunner().invoke(app, ["create", str(spec), "--set", f"name={name}",
                                      "--storage", storage_url])
    assert result.exit_code == 1 and "'N/A' is not a finite number" in result.output
    if storage_url.startswith("sqlite"):
        assert not Path(storage_url.removeprefix("sqlite:///")).exists()
    else:
        names = {s.study_name for s in optuna.get_all_study_summaries(open_storage(storage_url))}
        assert name not in names


def test_good_data_is_stored_with_its_warm_start(tmp_path: Path) -> None:
    import optuna

    code, lines, db = create(tmp_path, csv_file(tmp_path, ROWS * 2))
    assert code == 0, lines
    study = optuna.load_study(study_name="checks", storage=f"sqlite:///{db}")
    assert len(study.get_trials()) == 1  # the gemma2-lora preset, queued


def test_sst2_is_checked_in_a_couple_of_seconds(tmp_path: Path) -> None:
    import time

    from .conftest import SST2

    if not SST2.exists():
        pytest.skip(f"SST-2 is not at {SST2}")
    started = time.monotonic()
    code, lines, db = create(tmp_path, SST2 / "train.tsv", task="classification",
                             text_column="sentence", extra_data=(
                                 f"\n  validation: {SST2 / 'dev.tsv'}"
                                 "\n  rename_columns: {content: sentence}"))
    elapsed = time.monotonic() - started
    assert code == 0, lines
    assert elapsed < 10  # 67k rows; about 2 s on the 2-core development machine
