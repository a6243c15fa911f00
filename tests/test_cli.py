"""The CLI: bad input is one line and exit code 1, with nothing written to the storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemma_search.cli import app

from .conftest import demo_spec_text, write_spec

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output  # click mixes stderr into output


def assert_one_line_error(code: int, out: str, *fragments: str) -> None:
    assert code == 1, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: ")
    assert "Traceback" not in out
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def spec_file(tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> Path:
    return write_spec(tmp_path / "spec.yaml", demo_spec_text("cli", tiny_model, *demo_data))


def test_create_unknown_key_writes_nothing(tmp_path: Path, spec_file: Path) -> None:
    db = tmp_path / "s.db"
    code, out = run("create", str(spec_file), "--set", "search.learning_rat=0.1",
                    "--storage", f"sqlite:///{db}")
    assert_one_line_error(code, out, "search.learning_rat is not a known key",
                          "did you mean learning_rate")
    assert not db.exists()


def test_create_bad_range_and_log_range(tmp_path: Path, spec_file: Path) -> None:
    db = tmp_path / "s.db"
    code, out = run("create", str(spec_file), "--set",
                    "search.learning_rate={low: 0.1, high: 0.01}", "--storage", f"sqlite:///{db}")
    assert_one_line_error(code, out, "search.learning_rate.low is 0.1 but must be < high (0.01)")
    code, out = run("create", str(spec_file), "--set",
                    "search.weight_decay={low: 0, high: 0.1, log: true}",
                    "--storage", f"sqlite:///{db}")
    assert_one_line_error(code, out, "log range needs low > 0")
    assert not db.exists()


def test_create_missing_and_unparsable_data(tmp_path: Path, spec_file: Path) -> None:
    db = tmp_path / "s.db"
    code, out = run("create", str(spec_file), "--set", f"data.train={tmp_path / 'no.jsonl'}",
                    "--storage", f"sqlite:///{db}")
    assert_one_line_error(code, out, f"data.train file {tmp_path / 'no.jsonl'} does not exist")
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"text,label\n\"unclosed,1\n" + b"\x00\xff" * 10)
    code, out = run("create", str(spec_file), "--set", f"data.train={broken}",
                    "--storage", f"sqlite:///{db}")
    assert code == 1 and "Traceback" not in out
    assert str(broken) in out
    assert not db.exists()


def test_create_task_columns_missing(tmp_path: Path, spec_file: Path) -> None:
    db = tmp_path / "s.db"
    code, out = run("create", str(spec_file), "--set", "task.text_column=review",
                    "--storage", f"sqlite:///{db}")
    assert_one_line_error(code, out, "has no column 'review' (named by task.text_column)")
    code, out = run("create", str(spec_file), "--set", "task.text_column=null",
                    "--storage", f"sqlite:///{db}")
    assert_one_line_error(code, out, "task.text_column is missing")
    assert not db.exists()


def test_empty_validation_split(tmp_path: Path, spec_file: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    db = tmp_path / "s.db"
    code, out = run("create", str(spec_file), "--set", f"data.validation={empty}",
                    "--storage", f"sqlite:///{db}")
    assert_one_line_error(code, out, str(empty))
    assert not db.exists()


def test_study_that_does_not_exist(tmp_path: Path, spec_file: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert run("create", str(spec_file), "--storage", url)[0] == 0
    for command in (["status", "nope"], ["export", "nope", "--out", str(tmp_path / "x")],
                    ["worker", "nope"]):
        code, out = run(*command, "--storage", url)
        assert_one_line_error(code, out, "study 'nope' does not exist", "studies there: cli")
    assert not (tmp_path / "x").exists()


def test_storage_file_that_does_not_exist(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    code, out = run("status", "any", "--storage", f"sqlite:///{db}")
    assert_one_line_error(code, out, "does not exist")
    assert not db.exists()


def test_storage_that_cannot_connect_hides_the_password(spec_file: Path) -> None:
    url = "postgresql+psycopg2://gemma:s3cret-pw@127.0.0.1:1/gemma"
    code, out = run("create", str(spec_file), "--storage", url)
    assert_one_line_error(code, out, "cannot connect to storage",
                          "postgresql+psycopg2://gemma:***@127.0.0.1:1/gemma")
    assert "s3cret-pw" not in out
    code, out = run("status", "cli", "--storage", url)
    assert_one_line_error(code, out, "cannot connect to storage")
    assert "s3cret-pw" not in out


def test_create_is_idempotent_but_refuses_a_changed_spec(tmp_path: Path,
                                                         spec_file: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert run("create", str(spec_file), "--storage", url)[0] == 0
    assert run("create", str(spec_file), "--storage", url)[0] == 0
    code, out = run("create", str(spec_file), "--set", "search.lora_r=32", "--storage", url)
    assert_one_line_error(code, out, "already exists", "different spec")


def test_status_of_a_fresh_study(tmp_path: Path, spec_file: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    run("create", str(spec_file), "--storage", url)
    code, out = run("status", "cli", "--storage", url, "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["study"] == "cli" and summary["max_trials"] == 6
    assert summary["best"] is None and summary["budget_used"] == 0
    code, out = run("export", "cli", "--out", str(tmp_path / "e"), "--storage", url)
    assert_one_line_error(code, out, "no completed trial yet")


def test_make_tiny_model_command(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(["a small corpus of words to train on"] * 40))
    code, out = run("make-tiny-model", str(tmp_path / "m"), "--text", str(text))
    assert code == 0, out
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert config.model_type == "gemma2"
    assert config.attn_logit_softcapping == 50.0 and config.final_logit_softcapping == 30.0
    assert config.num_hidden_layers == 2


def test_bad_input_leaves_the_storage_untouched(tmp_path: Path, spec_file: Path,
                                                storage_url: str) -> None:
    import optuna

    from gemma_search.storage import open_storage

    name = f"untouched-{tmp_path.name[-16:]}"
    for bad in ([f"data.train={tmp_path / 'no.jsonl'}"], ["task.text_column=review"],
                ["search.lora_r={low: 8, high: 4}"]):
        code, out = run("create", str(spec_file), "--set", f"name={name}", "--set", bad[0],
                        "--storage", storage_url)
        assert code == 1 and "Traceback" not in out
    if storage_url.startswith("sqlite"):
        assert not Path(storage_url.removeprefix("sqlite:///")).exists()
    else:
        names = {s.study_name for s in optuna.get_all_study_summaries(open_storage(storage_url))}
        assert name not in names


def test_db_upgrade_downgrade_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code, out = run("db", "upgrade", "--storage", url)
    assert code == 0 and "gemma-search tables at 0001" in out, out
    assert run("db", "current", "--storage", url)[1].strip().startswith("0001")
    code, out = run("db", "downgrade", "--storage", url)
    assert code == 0 and "tables at base" in out, out
    from sqlalchemy import create_engine, inspect

    tables = set(inspect(create_engine(url)).get_table_names())
    assert "trials" in tables and not any(t.startswith("gs_") for t in tables)


def _next_line(out: str) -> str:
    """`create`'s line that says how to start the workers."""
    lines = [line for line in out.splitlines() if "start workers with `" in line]
    assert len(lines) == 1, out
    return lines[0]


def _next_command(out: str) -> str:
    """The command `create` says starts the workers (in backticks)."""
    return _next_line(out).split("`")[1]


def test_create_names_the_storage_launch_needs(tmp_path: Path, spec_file: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE", raising=False)
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'from-spec.db'}"
    code, out = run("create", str(spec_file), "--set", f"storage.url={url}")
    assert code == 0, out
    command = _next_command(out)
    assert command == f"gemma-search launch cli --storage {url}"
    # The printed storage is the study's: `status` with it finds the study.
    argv = command.split()[1:]
    argv[0] = "status"
    code, out = run(*argv)
    assert code == 0 and "study cli" in out, out
    # The storage `launch` finds by itself (the variable, the default): nothing to add.
    monkeypatch.setenv("GEMMA_SEARCH_STORAGE", url)
    code, out = run("create", str(spec_file), "--set", f"storage.url={url}")
    assert code == 0 and _next_command(out) == "gemma-search launch cli", out
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE")
    code, out = run("create", str(spec_file), "--set", "name=by-default",
                    "--storage", "sqlite:///gemma_search.db")
    assert code == 0 and _next_command(out) == "gemma-search launch by-default", out


def test_create_prints_the_launch_command_without_the_password(
        spec_file: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.engine import make_url

    monkeypatch.delenv("GEMMA_SEARCH_STORAGE", raising=False)
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE_FILE", raising=False)
    # The test server trusts local connections, so any password is accepted.
    url = make_url(postgres_url).set(password="s3cret-pw").render_as_string(
        hide_password=False)
    code, out = run("create", str(spec_file), "--set", "name=pw-launch",
                    "--set", f"storage.url={url}")
    assert code == 0, out
    assert "s3cret-pw" not in out
    shown = make_url(url).render_as_string(hide_password=True)
    assert ":***@" in shown
    assert _next_command(out) == f"gemma-search launch pw-launch --storage {shown}"
    assert "password in place of ***" in _next_line(out)


def test_studies_lists_prints_and_copies_the_shipped_studies(tmp_path: Path) -> None:
    from gemma_search.spec import shipped_studies

    shipped = shipped_studies()
    code, out = run("studies")
    assert code == 0, out
    for name, path in shipped.items():
        assert name in out and str(path) in out
    assert "sentiment classification on SST-2" in out  # what it is: its first line
    code, out = run("studies", "sst2_gemma2_9b")
    assert code == 0 and out == shipped["sst2_gemma2_9b"].read_text()
    code, out = run("studies", "sst2_gemma2_9b", "--copy", str(tmp_path / "mine"))
    copied = tmp_path / "mine" / "sst2_gemma2_9b.yaml"
    assert code == 0 and str(copied) in out and f"gemma-search create {copied}" in out, out
    assert copied.read_text() == shipped["sst2_gemma2_9b"].read_text()
    code, out = run("studies", "sst2_gemma2_9b", "--copy", str(tmp_path / "mine"))
    assert_one_line_error(code, out, f"{copied} already exists")
    code, out = run("studies", "sst3")
    assert_one_line_error(code, out, "'sst3' is not a shipped study", "sst2_gemma2_9b")


def test_create_again_after_an_upgrade_reuses_the_study(tmp_path: Path,
                                                         spec_file: Path) -> None:
    """A study whose spec an earlier version stored as `epochs: 2.0` and `packing: true` is
    the same study: `create` (as compose runs it on every `up`) reuses it."""
    from sqlalchemy import update

    from gemma_search import db
    from gemma_search.spec import dump_spec, load_spec

    url = f"sqlite:///{tmp_path / 's.db'}"
    assert run("create", str(spec_file), "--storage", url)[0] == 0
    text = dump_spec(load_spec(spec_file))
    assert "epochs: 2\n" in text and "packing: false" in text
    old = text.replace("epochs: 2\n", "epochs: 2.0\n").replace("packing: false",
                                                                 "packing: true")
    engine = db.make_engine(url)
    with db.session_scope(engine) as session:
        session.execute(update(db.GsStudy).where(db.GsStudy.study_name == "cli")
                        .values(spec_text=old, spec_hash="written-by-an-earlier-version"))
    engine.dispose()
    code, out = run("create", str(spec_file), "--storage", url)
    assert code == 0, out
    code, out = run("create", str(spec_file), "--set", "search.epochs=3", "--storage", url)
    assert_one_line_error(code, out, "already exists", "different spec")


def test_best_config_shows_whole_epochs_and_no_packing_for_classification(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    from .conftest import finished_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    finished_study(url, "best", tiny_model, demo_data, ((1e-3, 0.5), (4e-3, 0.3)))
    code, out = run("export", "best", "--out", str(tmp_path / "e"), "--storage", url)
    assert code == 0, out
    best = (tmp_path / "e" / "best_config.yaml").read_text()
    assert "  epochs: 2\n" in best and "  packing: false\n" in best
    args = json.loads((tmp_path / "e" / "training_args.json").read_text())
    assert args["num_train_epochs"] == 2
