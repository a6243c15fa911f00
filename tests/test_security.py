"""A fleet that trusts nothing it reads (issue 12): checkpoint rows, study names, secrets and
hostile specs. Each attack is made the way an attacker would make it, and the test checks
what came of it: the payload never ran, nothing was written outside its folder, no password
was printed or stored, and every refusal is one line with exit code 1."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gemma_search.cli import app
from gemma_search.errors import SpecError

from .conftest import PG_ENV, REPO, demo_spec_text, write_spec

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output  # click mixes stderr into output


def one_line_error(code: int, out: str, *fragments: str) -> str:
    assert code == 1, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: ") and "Traceback" not in out, out
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def spec_file(tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> Path:
    return write_spec(tmp_path / "spec.yaml", demo_spec_text("sec", tiny_model, *demo_data))


# --------------------------------------------------------------------------- checkpoints


class Payload:
    """Unpickling this runs `touch MARKER`: what an attacker puts in a trainer.pt."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def write_checkpoint_folder(folder: Path, trainer: Any) -> Path:
    """A checkpoint folder: a valid safetensors adapter and `trainer` as trainer.pt."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"lora_A": torch.zeros(2, 2)}, str(folder / "adapter.safetensors"))
    torch.save(trainer, folder / "trainer.pt")
    return folder


def test_a_pickled_payload_is_refused_unrun(tmp_path: Path) -> None:
    import torch

    from gemma_search.train.checkpoint import CheckpointRefused, check_checkpoint

    root = tmp_path / "ckpt" / "sec"
    marker, control = tmp_path / "ran", tmp_path / "ran-control"
    folder = write_checkpoint_folder(root / "trial-000000" / "step-00000010",
                                     {"optimizer": Payload(marker)})
    # The payload is live: the loader of the previous version (weights_only=False) runs it.
    torch.save({"optimizer": Payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    with pytest.raises(CheckpointRefused) as info:
        check_checkpoint(folder, root)
    message = str(info.value)
    assert "\n" not in message and "asks to call posix.system" in message, message
    assert not marker.exists()


def test_a_checkpoint_of_the_previous_version_is_refused(tmp_path: Path) -> None:
    import random

    import numpy as np

    from gemma_search.train.checkpoint import CheckpointRefused, check_checkpoint

    root = tmp_path / "ckpt" / "sec"
    # What save_checkpoint wrote before: numpy's state as a pickled ndarray tuple.
    old = {"optimizer": {}, "scheduler": {}, "state": {"step": 3},
           "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                   "torch": None, "cuda": None}}
    folder = write_checkpoint_folder(root / "trial-000000" / "step-00000003", old)
    with pytest.raises(CheckpointRefused, match="written by gemma-search before checkpoints "
                                                "held plain values only"):
        check_checkpoint(folder, root)


def test_a_checkpoint_outside_the_study_folder_is_refused(tmp_path: Path) -> None:
    from gemma_search.train.checkpoint import CheckpointRefused, check_checkpoint

    root = tmp_path / "ckpt" / "sec"
    elsewhere = write_checkpoint_folder(tmp_path / "elsewhere" / "step-00000001", {})
    with pytest.raises(CheckpointRefused, match="outside the study's checkpoint folder"):
        check_checkpoint(elsewhere, root)
    with pytest.raises(CheckpointRefused, match="outside the study's checkpoint folder"):
        check_checkpoint(root / ".." / ".." / "elsewhere" / "step-00000001", root)
    # A link inside the folder is followed: where it leads is what counts.
    (root / "trial-000001").mkdir(parents=True)
    (root / "trial-000001" / "step-00000001").symlink_to(elsewhere)
    with pytest.raises(CheckpointRefused, match="outside the study's checkpoint folder"):
        check_checkpoint(root / "trial-000001" / "step-00000001", root)
    # So is a link for one file of an inside folder.
    inside = root / "trial-000002" / "step-00000001"
    inside.mkdir(parents=True)
    (inside / "adapter.safetensors").symlink_to(elsewhere / "adapter.safetensors")
    (inside / "trainer.pt").symlink_to(elsewhere / "trainer.pt")
    with pytest.raises(CheckpointRefused, match="links to"):
        check_checkpoint(inside, root)


def test_a_study_folder_that_links_elsewhere_is_not_written(tmp_path: Path) -> None:
    from gemma_search.objective import checkpoint_dir
    from gemma_search.spec import spec_from_text

    spec = spec_from_text(demo_spec_text("sec", tmp_path / "m", tmp_path / "t.jsonl",
                                         tmp_path / "v.jsonl",
                                         extra=f"checkpoints: {{dir: {tmp_path / 'ckpt'}}}"))
    assert checkpoint_dir(spec, 7) == tmp_path / "ckpt" / "sec" / "trial-000007"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "ckpt" / "sec").symlink_to(tmp_path / "outside")
    with pytest.raises(SpecError, match="not a folder of checkpoints.dir"):
        checkpoint_dir(spec, 7)


def test_a_retry_refuses_a_hostile_row_and_starts_from_step_0(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    """A `gs_checkpoints` row of the trial a retry continues points at a payload inside the
    study's folder, then at a real checkpoint outside it: the retry refuses both, says so in
    the log and in `resume_refused`, and trains from step 0; the payload never runs."""
    from optuna.trial import TrialState, create_trial

    from gemma_search import db
    from gemma_search.objective import Objective, study_checkpoint_dir
    from gemma_search.spec import spec_from_text
    from gemma_search.study import create_study
    from gemma_search.worker import load_resources

    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = spec_from_text(demo_spec_text(
        "sec", tiny_model, *demo_data, extra=f"checkpoints: {{dir: {tmp_path / 'ckpt'}}}"
    ).replace("max_tokens_per_trial: 8000", "max_tokens_per_trial: 1000"))
    study = create_study(spec, url)
    engine = db.make_engine(url)
    base, data = load_resources(spec)
    marker = tmp_path / "ran"
    hostile = write_checkpoint_folder(study_checkpoint_dir(spec) / "trial-000090" /
                                      "step-00000050", {"optimizer": Payload(marker)})
    outside = write_checkpoint_folder(tmp_path / "outside" / "step-00000050", {})
    params = {"learning_rate": 1e-3, "optimizer": "adamw", "lora_r": 4}
    for number, folder in ((90, hostile), (91, outside)):
        db.record_checkpoint(engine, spec.name, number, 50, 4000, str(folder))
        study.add_trial(create_trial(state=TrialState.WAITING, system_attrs={
            "fixed_params": params, "retry_history": [number]}))
    caplog.set_level(logging.WARNING, logger="gemma_search.objective")
    for expected in ("asks to call posix.system", "outside the study's checkpoint folder"):
        trial = study.ask()
        value = Objective(spec, base, data, engine)(trial)
        study.tell(trial, value)
        attrs = study.trials[trial.number].user_attrs
        assert attrs["resumed_from_step"] == 0
        assert "resumed_from_trial" not in attrs
        refused = attrs["resume_refused"]
        assert expected in refused and refused.endswith("starting from step 0"), refused
        assert refused in caplog.text
    assert not marker.exists()
    engine.dispose()


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["../../tmp/escape", "/abs/path", "..", ".hidden", "a/b",
                                  "x" * 300, "x" * 10_000, "tab\there", "é"],
                         ids=["dotdot", "absolute", "parent", "dot", "slash", "300", "10000",
                              "tab", "unicode"])
def test_study_names_are_identifiers(tmp_path: Path, spec_file: Path, name: str) -> None:
    db = tmp_path / "s.db"
    code, out = run("create", str(spec_file), "--set", f"name={json.dumps(name)}",
                    "--storage", f"sqlite:///{db}")
    line = one_line_error(code, out, "name is ", "must be letters, digits, '.', '_' or '-', at "
                          "most 128 characters")
    assert len(line) < 300
    assert not db.exists()
    assert not (tmp_path / "tmp").exists() and not Path("/abs").exists()


def test_the_longest_name_and_its_companion(tmp_path: Path, spec_file: Path) -> None:
    from gemma_search.spec import spec_from_text
    from gemma_search.verify import COMPANION_SUFFIX

    name = "n" * 128
    url = f"sqlite:///{tmp_path / 's.db'}"
    code, out = run("create", str(spec_file), "--set", f"name={name}", "--storage", url)
    assert code == 0, out
    assert COMPANION_SUFFIX == ".verify"  # the name rule lets a companion add it
    text = demo_spec_text(name + COMPANION_SUFFIX, tmp_path, tmp_path, tmp_path)
    assert spec_from_text(text).name == name + COMPANION_SUFFIX


def test_escape_sequences_in_a_spec_are_shown_escaped(tmp_path: Path, spec_file: Path) -> None:
    db = tmp_path / "s.db"
    text = spec_file.read_text().replace("name: sec", 'name: "\\e[2J\\e[31mowned"')
    hostile = write_spec(tmp_path / "ansi.yaml", text)
    code, out = run("create", str(hostile), "--storage", f"sqlite:///{db}")
    one_line_error(code, out, "name is '\\x1b[2J\\x1b[31mowned'")
    assert "\x1b" not in out
    # Any user text in any error: here a file name, which is not quoted with repr.
    code, out = run("create", str(tmp_path / "no\x1b[2Jsuch.yaml"), "--storage",
                    f"sqlite:///{db}")
    one_line_error(code, out, "no\\x1b[2Jsuch.yaml")
    assert "\x1b" not in out
    assert not db.exists()


def test_export_does_not_write_through_a_link_out_of_its_folder(
        tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> None:
    from .conftest import finished_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    finished_study(url, "sec", tiny_model, demo_data, ((1e-3, 0.5),))
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = tmp_path / "export"
    out.mkdir()
    (out / "provenance.json").symlink_to(target)
    code, output = run("export", "sec", "--storage", url, "--out", str(out))
    one_line_error(code, output, f"{out / 'provenance.json'} links to {target}, outside the "
                   "export folder")
    assert target.read_text() == "keep me\n"


# --------------------------------------------------------------------------- hostile specs

#: 342 bytes that stand for 9**9 (387 million) strings once the aliases are expanded; the
#: previous loader took two minutes to a MemoryError.
ALIAS_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_an_alias_bomb_is_refused_before_expansion(tmp_path: Path) -> None:
    bomb = write_spec(tmp_path / "bomb.yaml", ALIAS_BOMB)
    assert bomb.stat().st_size == 342
    db = tmp_path / "s.db"
    started = time.perf_counter()
    code, out = run("create", str(bomb), "--storage", f"sqlite:///{db}")
    took = time.perf_counter() - started
    one_line_error(code, out, "line 1: the anchor &a is not allowed in a spec")
    assert took < 2.0, took  # measured: 0.21 s for the whole command, 1 ms to refuse
    assert not db.exists()
    # An alias without its anchor here, as --set values are read the same way.
    code, out = run("create", str(bomb), "--set", "search.lora_r=*a",
                    "--storage", f"sqlite:///{db}")
    assert code == 1 and "Traceback" not in out


def test_aliases_and_deep_nesting_in_the_stored_spec_are_refused() -> None:
    from gemma_search.spec import spec_from_text

    with pytest.raises(SpecError, match="anchor &a is not allowed"):
        spec_from_text(ALIAS_BOMB)
    with pytest.raises(SpecError, match="nests deeper than 16 levels"):
        spec_from_text("name: " + "[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize("content, fragment", [
    (b"name: sec\n\xff\xfe garbage\n", "is not UTF-8 text: byte 0xff at line 2"),
    (bytes(range(256)) * 4, "is not UTF-8 text"),
    (b"name: sec\x00\x01\x02\n", "holds the control character U+0000 at line 1"),
    (b"name: sec\n" + b"#" * (1 << 20), "is larger than 1048576 bytes (1 MiB)"),
    (b"name: [" + b"[" * 5000 + b"]" * 5001 + b"\n", "nests deeper than 16 levels"),
    (b"name: " + b"9" * 5000 + b"\n", "holds a value YAML cannot read"),
    (b"name: 2024-13-45\n", "holds a value YAML cannot read (month must be in 1..12)"),
], ids=["latin1", "binary", "nul", "huge", "deep", "bigint", "date"])
def test_hostile_spec_files_are_one_line(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    db = tmp_path / "s.db"
    code, out = run("create", str(path), "--storage", f"sqlite:///{db}")
    one_line_error(code, out, f"spec file {path}", fragment)
    assert not db.exists()


@pytest.mark.parametrize("override, fragment", [
    ("data.max_seq_len=1.0e+12", "data.max_seq_len is 1000000000000 but must be between 2 "
                                 "and 1048576"),
    ("budget.max_trials=1.0e+20", "budget.max_trials is 100000000000000000000 but must be "
                                  "between 1 and 1000000"),
    ("budget.max_tokens_per_trial=1.0e+15", "budget.max_tokens_per_trial is"),
    ("budget.eval_every_tokens=1.0e+15", "budget.eval_every_tokens is"),
    ("search.micro_batch_size=100000", "search.micro_batch_size is 100000 but must be <= 4096"),
    ("search.gradient_accumulation_steps={low: 1, high: 100000}",
     "search.gradient_accumulation_steps.high is 100000 but must be <= 4096"),
    ("search.lora_r={choices: [8, 1000000]}", "search.lora_r.choices[1] is 1000000"),
    ("search.epochs=1.0e+9", "search.epochs is 1000000000 but must be <= 1000"),
    ("storage.grace_period=1.0e+12", "storage.grace_period is"),
    ("checkpoints.keep_last=1000000", "checkpoints.keep_last is"),
])
def test_numbers_have_upper_bounds(tmp_path: Path, spec_file: Path, override: str,
                                   fragment: str) -> None:
    db = tmp_path / "s.db"
    code, out = run("create", str(spec_file), "--set", override, "--storage", f"sqlite:///{db}")
    one_line_error(code, out, fragment)
    assert not db.exists()


def test_a_one_row_training_file_without_validation(tmp_path: Path, spec_file: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a fine film", "label": "positive"}\n')
    db = tmp_path / "s.db"
    code, out = run("create", str(spec_file), "--set", f"data.train={one}",
                    "--set", "data.validation=null", "--storage", f"sqlite:///{db}")
    one_line_error(code, out, f"data.train file {one} has 1 row(s)", "leaves none to train on")
    assert not db.exists()


def test_max_seq_len_beyond_the_model_stops_the_worker(tmp_path: Path,
                                                       spec_file: Path) -> None:
    """The spec's bound cannot know the model: the worker checks its context at start."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    code, out = run("create", str(spec_file), "--set", "data.max_seq_len=4096",
                    "--storage", url)
    assert code == 0, out
    result = runner.invoke(app, ["worker", "sec", "--storage", url])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 3 and len(lines) == 1, result.output
    assert lines[0].startswith("error: data.max_seq_len is 4096 but model ")
    assert "reads at most 1024 tokens (max_position_embeddings)" in lines[0]


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("url, secret", [
    ("postgresql+psycopg2://gs:hunter2@db:5432/gs", "hunter2"),
    ("postgresql+psycopg2://gs@db/gs?password=hunter2&sslmode=require", "hunter2"),
    ("postgresql+psycopg2://gs@db/gs?sslpassword=hunter2", "hunter2"),
    ("postgresql+psycopg2://gs@db/gs?PassFile=/home/gs/hunter2", "/home/gs/hunter2"),
    ("postgresql+psycopg2://gs:hunter2@db:notaport/gs", "hunter2"),
    ("postgresql+psycopg2://gs:hun@ter2@db/gs", "ter2"),
    ("postgresql+psycopg2://gs:hunter%2F2@db/gs", "hunter/2"),
    ("not a url hunter2", "hunter2"),
], ids=["userinfo", "query", "sslpassword", "passfile", "badport", "at", "escaped",
        "garbage"])
def test_redaction_masks_every_secret(url: str, secret: str) -> None:
    from urllib.parse import quote

    from gemma_search.storage import has_password, redact, redact_text, without_password

    for form in (secret, quote(secret, safe="")):
        assert form not in redact(url)
        assert form not in redact_text(f"driver says: {url} failed", url)
        if "://" in url:  # a part a driver may quote alone; garbage has no known parts
            assert form not in redact_text(f"driver says: {form} failed", url)
    if "PassFile" not in url:  # a passfile names where the password is: kept in the URL
        assert has_password(url) == (url != "not a url hunter2")
        assert secret not in without_password(url)
    assert redact("postgresql+psycopg2://gs@db/gs?password=x&sslmode=require") == (
        "postgresql+psycopg2://gs@db/gs?password=***&sslmode=require")
    assert redact("postgresql+psycopg2://gs:x@db:notaport/gs") == "postgresql+psycopg2://***"
    assert without_password("postgresql+psycopg2://gs:x@db/gs?password=y&sslmode=require") == (
        "postgresql+psycopg2://gs@db/gs?sslmode=require")


def test_a_malformed_port_is_one_line(spec_file: Path) -> None:
    url = "postgresql+psycopg2://gs:S3cr3t-port@127.0.0.1:notaport/gs"
    for command in (["create", str(spec_file)], ["status", "sec"], ["db", "current"],
                    ["worker", "sec"]):
        code, out = run(*command, "--storage", url)
        assert "S3cr3t-port" not in out, out
        if command[0] == "worker":  # it warns first about the password on its command line
            warning, out = out.split("\n", 1)
            assert warning.startswith("warning: --storage holds a password"), warning
        one_line_error(code, out, "not a SQLAlchemy URL", "postgresql+psycopg2://***")


@pytest.fixture
def secret_db() -> Iterator[tuple[str, str, str]]:
    """A PostgreSQL role with a password and a database it owns: (password, URL with the
    password as user-info, URL with it as ?password=). The test server trusts 127.0.0.1, so
    any password connects; what matters is where the password shows."""
    base = os.environ.get(PG_ENV)
    if not base:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_ENV} is not set in CI: the PostgreSQL tests must run there")
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL to test against")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    tag = uuid.uuid4().hex[:8]
    role, database, password = f"gs_secret_test_{tag}", f"gs_secret_{tag}", f"S3cr3t-{tag}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        conn.execute(text(f'CREATE DATABASE "{database}" OWNER {role}'))
    plain = make_url(base).set(username=role, password=None, database=database)
    userinfo = plain.set(password=password).render_as_string(hide_password=False)
    query = plain.update_query_dict({"password": password}).render_as_string(
        hide_password=False)
    try:
        yield password, userinfo, query
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


def dashboard_first_lines(study: str, url: str) -> str:
    """`gemma-search dashboard` in a process until it prints where to open it; its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gemma_search", "dashboard", study,
                             "--storage", url, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    seen: list[str] = []
    opened = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "open http" in line:
                opened.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert opened.wait(60), "".join(seen)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=10)
    return "".join(seen)


def all_rows(url: str) -> str:
    """Every row of every table of the database, as text."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            # Each value whole: str(row) shortens long ones (a stored spec).
            return "\n".join(" | ".join(map(str, row))
                             for table in inspect(conn).get_table_names()
                             for row in conn.execute(text(f'SELECT * FROM "{table}"')))
    finally:
        engine.dispose()


def add_finished_trials(study_name: str, url: str) -> None:
    """Two complete trials and one pruned, without training (export and report need them)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    study = optuna.load_study(study_name=study_name, storage=url)
    distributions = {"learning_rate": FloatDistribution(1.0e-4, 3.0e-2, log=True),
                     "optimizer": CategoricalDistribution(["adamw", "sgd"]),
                     "lora_r": CategoricalDistribution([4, 8])}
    for number, (lr, value) in enumerate(((1e-3, 0.5), (2e-3, 0.4), (3e-3, 0.9))):
        pruned = number == 2
        study.add_trial(create_trial(
            params={"learning_rate": lr, "optimizer": "adamw", "lora_r": 4},
            distributions=distributions, intermediate_values={1: value + 0.1, 2: value},
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=None if pruned else value))


def test_the_password_shows_nowhere(tmp_path: Path, tiny_model: Path,
                                    demo_data: tuple[Path, Path],
                                    secret_db: tuple[str, str, str],
                                    monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """Every command, every file written and every row stored, with a real role's password
    given as user-info and as ?password=: the password is found nowhere."""
    from urllib.parse import quote

    password, userinfo, query = secret_db
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE", raising=False)
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE_FILE", raising=False)
    caplog.set_level(logging.DEBUG)
    spec = write_spec(tmp_path / "spec.yaml", demo_spec_text("sec", tiny_model, *demo_data))
    outputs: list[str] = []

    def command(*args: str, codes: tuple[int, ...] = (0,)) -> str:
        code, out = run(*args)
        assert code in codes, (args, out)
        outputs.append(out)
        return out

    for style, url in (("userinfo", userinfo), ("query", query)):
        name = f"sec-{style}"
        # The password reaches the spec as its storage.url: create's default storage.
        out = command("create", str(spec), "--set", f"name={name}",
                      "--set", f"storage.url={url}")
        assert "password in place of ***" in out
        add_finished_trials(name, url)
        # Again, now with the URL in --storage too: the same spec (the password is no part
        # of it), so nothing changes.
        command("create", str(spec), "--set", f"name={name}", "--set", f"storage.url={url}",
                "--storage", url)
        command("status", name, "--storage", url)
        status = json.loads(command("status", name, "--storage", url, "--json"))
        assert status
        command("export", name, "--storage", url, "--out", str(tmp_path / f"export-{style}"))
        best = (tmp_path / f"export-{style}" / "best_config.yaml").read_text()
        assert "url: postgresql+psycopg2://gs_secret_test_" in best
        command("report", name, "--storage", url, "--out", str(tmp_path / f"report-{style}"))
        command("verify", name, "--storage", url, "--no-run", "--top", "1", "--seeds", "1")
        command("db", "upgrade", "--storage", url)
        command("db", "current", "--storage", url)
        command("worker", "nope", "--storage", url, codes=(1,))  # warning + no such study
        command("launch", "nope", "--storage", url, codes=(1,))
        command("create", str(spec), "--set", f"name={name}", "--set", "search.lora_r=32",
                "--storage", url, codes=(1,))  # a different spec under a taken name
        # Unreachable: the driver's own message comes through, scrubbed.
        dead = url.replace(":5432/", ":1/")
        command("status", name, "--storage", dead, codes=(1,))
        command("create", str(spec), "--storage", dead, codes=(1,))
        outputs.append(dashboard_first_lines(name, url))
    # A worker stopped by a configuration error (exit 3) prints its one line too.
    command("create", str(spec), "--set", "name=sec-worker", "--set", "data.max_seq_len=4096",
            "--storage", userinfo)
    out = command("worker", "sec-worker", "--storage", userinfo, codes=(3,))
    assert "warning: --storage holds a password" in out

    everything = "\n".join(outputs) + caplog.text + all_rows(userinfo)
    for folder in tmp_path.glob("*-*"):
        for file in folder.rglob("*"):
            if file.is_file():
                everything += file.read_text(errors="replace")
    assert "gs_secret_test_" in everything  # the sweep saw the role: it looked in the right place
    for form in (password, quote(password, safe="")):
        assert form not in everything
    specs = all_rows(userinfo)
    assert "sec-userinfo" in specs and "sec-query" in specs and "sec-userinfo.verify" in specs
    assert re.search(r"url: postgresql\+psycopg2://gs_secret_test_\w+@", specs)
