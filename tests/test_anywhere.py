"""Installed, gemma-search works from any folder: the demo and the shipped studies are package
data, found through the package, never through the checkout."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gemma_search.spec import shipped_studies

from .conftest import REPO, SST2


def gemma_search(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed command, run in `cwd` with no storage set in the environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GEMMA_SEARCH_STORAGE", "GEMMA_SEARCH_STORAGE_FILE")}
    return subprocess.run([sys.executable, "-m", "gemma_search", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def sst2() -> Path:
    if not (SST2 / "train.tsv").is_file() or not (SST2 / "dev.tsv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"SST-2 is not at {SST2} in CI: the shipped-study test must run")
        pytest.skip(f"SST-2 is not at {SST2}")
    return SST2


def test_a_wheel_carries_every_shipped_study() -> None:
    """setuptools puts into the wheel what `package-data` names: every shipped YAML."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["gemma_search"]
    package = REPO / "gemma_search"
    studies = [p.relative_to(package).as_posix() for p in shipped_studies().values()]
    assert len(studies) >= 4 and all(p.startswith("studies/") for p in studies)
    for study in studies:
        assert any(fnmatch.fnmatch(study, pattern) for pattern in patterns), study


@pytest.mark.slow
def test_demo_runs_from_any_folder(tmp_path: Path) -> None:
    proc = gemma_search("demo", "--trials", "2", "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    export = tmp_path / "demo-run" / "export"
    for name in ("best_config.yaml", "training_args.json", "lora_config.json",
                 "provenance.json", "leaderboard.csv"):
        assert (export / name).is_file(), name
    assert (tmp_path / "demo-run" / "demo.db").is_file()
    assert not (tmp_path / "studies").exists()


def test_a_shipped_study_by_name_from_any_folder(tmp_path: Path, sst2: Path) -> None:
    proc = gemma_search("create", "sst2_gemma2_9b", "--set", f"data.train={sst2 / 'train.tsv'}",
                        "--set", f"data.validation={sst2 / 'dev.tsv'}", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"the shipped study {shipped_studies()['sst2_gemma2_9b']}" in out
    # The spec's storage is the default file, in this folder, which `launch` finds alone.
    assert (tmp_path / "gemma_search.db").is_file()
    assert "start workers with `gemma-search launch sst2-gemma2-9b`" in out
    proc = gemma_search("status", "sst2-gemma2-9b", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and '"study": "sst2-gemma2-9b"' in proc.stdout, proc.stderr


def test_a_shipped_study_without_its_data_says_which_flag_to_pass(tmp_path: Path) -> None:
    proc = gemma_search("create", "sst2_gemma2_9b", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    # Its relative data path is relative to the folder the user is in, not the package.
    assert f"data.train file {tmp_path / 'data' / 'sst2' / 'train.tsv'} does not exist" in lines[0]
    assert "--set data.train=PATH" in lines[0]
    assert not (tmp_path / "gemma_search.db").exists()
