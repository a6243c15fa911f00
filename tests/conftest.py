"""Shared fixtures: a tiny Gemma 2 built in code, generated data, SQLite and PostgreSQL URLs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PG_ENV = "GEMMA_SEARCH_TEST_DATABASE_URL"
REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from gemma_search.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("data"), n_train=400, n_validation=80)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Gemma 2 and its tokenizer, saved with save_pretrained."""
    from gemma_search.demo import demo_sentences
    from gemma_search.tiny import make_tiny_model

    texts = [r["text"] for r in demo_sentences(1500, seed=0)]
    # Label words as lines of their own: byte-level BPE then learns them as single tokens,
    # as Gemma's real vocabulary has them.
    texts += ["positive", "negative", "question: what is two plus two? answer: four"] * 100
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-gemma2", texts)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards.

    Without GEMMA_SEARCH_TEST_DATABASE_URL the PostgreSQL tests skip; in CI they must run.
    """
    base = os.environ.get(PG_ENV)
    if not base:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_ENV} is not set in CI: the PostgreSQL tests must run there")
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL to test against")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"gemma_search_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # unreachable server: skip locally, fail in CI
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL at {PG_ENV} is unreachable: {exc}")
    yield make_url(base).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs on SQLite and on PostgreSQL (each test gets its own names)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return str(request.getfixturevalue("postgres_url"))


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def demo_spec_text(name: str, model: Path, train: Path, validation: Path, *,
                   max_trials: int = 6, extra: str = "") -> str:
    """A small classification spec over the generated demo data."""
    return f"""
name: {name}
model:
  name_or_path: {model}
  dtype: float32
task:
  type: classification
  text_column: text
  labels: [negative, positive]
data:
  train: {train}
  validation: {validation}
  max_seq_len: 32
search:
  learning_rate: {{low: 1.0e-4, high: 3.0e-2, log: true}}
  micro_batch_size: 16
  gradient_accumulation_steps: 1
  epochs: 2
  optimizer: {{choices: [adamw, sgd]}}
  momentum: 0.9
  lora_r: {{choices: [4, 8]}}
  lora_targets: attention
sampler: {{type: tpe, seed: 0, n_startup_trials: 3}}
pruner: {{type: hyperband, min_resource: 1, reduction_factor: 3}}
budget:
  max_trials: {max_trials}
  max_tokens_per_trial: 8000
  eval_every_tokens: 1000
{extra}
"""


def finished_study(url: str, name: str, model: Path, data: tuple[Path, Path],
                   results: tuple[tuple[float, float], ...]) -> Any:
    """A gemma-search study of `demo_spec_text` with one COMPLETE trial per (learning rate,
    value) in `results`, in that order, without training."""
    from gemma_search.spec import spec_from_text
    from gemma_search.study import create_study

    study = create_study(spec_from_text(demo_spec_text(name, model, *data, max_trials=4)), url)
    for lr, value in results:
        study.enqueue_trial({"learning_rate": lr, "optimizer": "adamw", "lora_r": 4})
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True)
        trial.suggest_categorical("optimizer", ["adamw", "sgd"])
        trial.suggest_categorical("lora_r", [4, 8])
        study.tell(trial, value)
    return study
