"""`gemma-search doctor` on CPU: the CLI against SQLite and the tiny Gemma 2, and the GPU
branches (kernels, memory plan) through a described card, since CI has none."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemma_search.cli import app
from gemma_search.doctor import Card, Cuda, failures, memory_check, run_checks
from gemma_search.spec import spec_from_text
from gemma_search.study import create_study

from .conftest import demo_spec_text

runner = CliRunner()
GiB = 2**30
H200 = Cuda(torch_version="2.11.0+cu130", cuda_version="13.0",
            cards=(Card(0, "NVIDIA H200", 130 * GiB, 140 * GiB),))


@pytest.fixture(autouse=True)
def no_storage_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE", raising=False)
    monkeypatch.delenv("GEMMA_SEARCH_STORAGE_FILE", raising=False)
    monkeypatch.chdir(tmp_path)  # no default gemma_search.db here


@pytest.fixture
def study_url(tmp_path: Path, tiny_model: Path, demo_data: tuple[Path, Path]) -> str:
    url = f"sqlite:///{tmp_path / 'doctor.db'}"
    create_study(spec_from_text(demo_spec_text("doc", tiny_model, *demo_data)), url)
    return url


def _rows(output: str) -> dict[str, tuple[str, str]]:
    """check name -> (result, detail), read from the table's columns."""
    header, *lines = output.splitlines()
    result_at, detail_at = header.index("result"), header.index("detail")
    rows = {}
    for line in lines:
        result = line[result_at:detail_at].strip()
        if result not in ("ok", "absent", "skipped", "failed"):
            break  # the summary line after the table
        rows[line[:result_at].strip()] = (result, line[detail_at:])
    return rows


def test_on_cpu_with_nothing_set_cuda_is_absent_and_nothing_fails(tmp_path: Path) -> None:
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert rows["CUDA"][0] == "absent" and "CPU build" in rows["CUDA"][1]
    assert rows["attention"] == ("ok", "auto -> eager on CPU")
    assert rows["storage"][0] == rows["model"][0] == rows["memory plan"][0] == "skipped"
    assert "no check failed; CUDA is absent; skipped (not failures): " in result.output
    assert not (tmp_path / "gemma_search.db").exists()  # doctor creates no database


def test_a_study_in_sqlite_with_the_tiny_model(study_url: str, tiny_model: Path) -> None:
    result = runner.invoke(app, ["doctor", "--storage", study_url, "--study", "doc"])
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert rows["storage"][0] == "ok" and "tables at 0001 (head)" in rows["storage"][1]
    assert "study 'doc' found" in rows["storage"][1]
    assert rows["model"][0] == "ok"
    assert rows["model"][1].startswith(f"{tiny_model}: gemma2, 2 layers, vocabulary ")
    assert rows["memory plan"] == ("skipped", "no CUDA: CPU trials plan no device memory")


def test_failures_are_one_line_each_and_exit_1(study_url: str) -> None:
    result = runner.invoke(app, ["doctor", "--storage", study_url, "--study", "nope",
                                 "--require-gpu"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.output
    assert errors[0].startswith("error: CUDA: torch ") and "CPU build" in errors[0]
    assert "holds no study 'nope' created by gemma-search" in errors[1]
    assert "2 of 7 checks failed" in result.output


def test_storage_password_is_never_printed() -> None:
    url = "postgresql+psycopg2://gemma:s3cret-pw@127.0.0.1:1/gemma_search"
    result = runner.invoke(app, ["doctor", "--storage", url])
    assert result.exit_code == 1
    assert "s3cret-pw" not in result.output
    assert "error: storage: storage postgresql+psycopg2://gemma:***@127.0.0.1:1/" in result.output


def test_a_database_without_our_tables_says_run_db_upgrade(tmp_path: Path) -> None:
    import sqlite3

    sqlite3.connect(tmp_path / "empty.db").close()
    checks = run_checks(storage=f"sqlite:///{tmp_path / 'empty.db'}", study=None)
    assert failures(checks) == [f"storage: sqlite:///{tmp_path / 'empty.db'} has no "
                                "gemma-search tables; run `gemma-search db upgrade`"]


def test_a_study_needs_a_storage() -> None:
    result = runner.invoke(app, ["doctor", "--study", "doc"])
    assert result.exit_code == 1
    assert "error: storage: --study doc needs the storage that holds it" in result.output


def test_an_unreadable_storage_file_is_a_failed_row_not_an_abort(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMMA_SEARCH_STORAGE_FILE", str(tmp_path / "missing"))
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1
    assert _rows(result.output)["model"][0] == "skipped"  # the table is still there
    assert f"error: storage: GEMMA_SEARCH_STORAGE_FILE names {tmp_path / 'missing'}" in (
        result.output)


def test_a_card_that_cannot_be_queried_fails_cuda() -> None:
    broken = Cuda("2.11.0+cu130", "13.0", error="card 1 cannot be queried: CUDA error: ECC")
    checks = {c.name: c for c in run_checks(storage=None, study=None, cuda=broken)}
    assert checks["CUDA"].status == "failed" and "ECC" in checks["CUDA"].detail
    assert checks["Liger Kernel"].status in ("ok", "skipped")  # as on a machine with no CUDA


def test_on_a_gpu_the_kernels_are_needed_and_the_plan_is_made(study_url: str) -> None:
    """The GPU branch, from a described H200: the `gpu` extra is not installed here, so the
    two kernel checks fail with the install command; the tiny model's plan fits."""
    checks = {c.name: c for c in run_checks(storage=study_url, study="doc", cuda=H200)}
    assert checks["CUDA"].status == "ok" and "1 card" in checks["CUDA"].detail
    assert checks["GPU 0"].detail == "NVIDIA H200: 130.0 GiB free of 140.0 GiB"
    assert checks["attention"].detail.startswith("auto -> ")
    for name in ("Liger Kernel", "bitsandbytes"):
        if checks[name].status != "ok":  # a CPU machine without the gpu extra
            assert checks[name].status == "failed"
            assert "pip install 'gemma-search[gpu]'" in checks[name].detail
    plan = checks["memory plan"]
    assert plan.status == "ok" and plan.detail.startswith("GPU 0 (130.0 GiB free): micro-batch 16")


def test_memory_plan_of_9b_shapes_on_a_small_and_a_large_card(tiny_model: Path,
                                                             demo_data: tuple[Path, Path]
                                                             ) -> None:
    spec = spec_from_text(demo_spec_text("doc", tiny_model, *demo_data).replace(
        "dtype: float32", "dtype: auto"))
    config = {"hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
              "vocab_size": 256000, "sliding_window": 4096}
    small = memory_check(spec, config, Card(3, "24 GB card", 16 * GiB, 24 * GiB),
                         attention="eager", fused_kernels=True)
    assert small.status == "failed"
    assert small.detail.startswith("GPU 3 (16.0 GiB free): even micro-batch 1")
    assert "QLoRA" in small.detail
    large = memory_check(spec, config, Card(0, "H200", 130 * GiB, 140 * GiB),
                         attention="flex_attention", fused_kernels=True)
    assert large.status == "ok", large.detail
    assert large.detail.startswith("GPU 0 (130.0 GiB free): micro-batch 16 needs ~")
