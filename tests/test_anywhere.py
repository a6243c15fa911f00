"""Installed, gemma-search works from any folder: the demo and the shipped studies are package
data, found through the package, never through the checkout. The installed wheel itself runs
the demo and a shipped study from an empty folder in tests/test_package.py."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from gemma_search.spec import shipped_studies

from .conftest import REPO


def gemma_search(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed command, run in `cwd` with no storage set in the environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GEMMA_SEARCH_STORAGE", "GEMMA_SEARCH_STORAGE_FILE")}
    return subprocess.run([sys.executable, "-m", "gemma_search", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_wheel_carries_every_shipped_study_and_migration() -> None:
    """setuptools puts into the wheel what `package-data` names: every shipped YAML, and
    every file of the migrations folder (Alembic reads them as files, not as modules)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["gemma_search"]
    package = REPO / "gemma_search"
    studies = [p.relative_to(package).as_posix() for p in shipped_studies().values()]
    assert len(studies) >= 4 and all(p.startswith("studies/") for p in studies)
    migrations = [p.relative_to(package).as_posix()
                  for p in (package / "migrations").rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts]
    assert "migrations/env.py" in migrations and "migrations/script.py.mako" in migrations
    for path in studies + migrations:
        assert any(fnmatch.fnmatch(path, pattern) for pattern in patterns), path


def test_a_shipped_study_without_its_data_says_which_flag_to_pass(tmp_path: Path) -> None:
    proc = gemma_search("create", "sst2_gemma2_9b", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    # Its relative data path is relative to the folder the user is in, not the package.
    assert f"data.train file {tmp_path / 'data' / 'sst2' / 'train.tsv'} does not exist" in lines[0]
    assert "--set data.train=PATH" in lines[0]
    assert not (tmp_path / "gemma_search.db").exists()
