"""gemma-search as a real package: the wheel, installed (not editable) in a fresh virtualenv,
runs `db upgrade`, the demo, `create` of a shipped study and `doctor` from an empty folder,
with no source checkout in reach. Migrations and shipped studies are package data.

The fresh virtualenv reuses the test environment's dependencies through a .pth file (one
path line: the .pth files there, among them this checkout's editable install, are not read),
so only the wheel itself is installed, with no download.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO, SST2


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path

    def run(self, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The installed `gemma-search`, in `cwd`, with no storage and no PYTHONPATH set."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("GEMMA_SEARCH_STORAGE", "GEMMA_SEARCH_STORAGE_FILE", "PYTHONPATH")}
        return subprocess.run([str(self.venv / "bin" / "gemma-search"), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("package")
    # 1. The wheel, built from a copy of what it is made of, so the checkout gets no build/
    #    or egg-info; with the installed setuptools (a dev extra), no download.
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "gemma_search", src / "gemma_search",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.db"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(root / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (root / "dist").glob("gemma_search-*.whl")
    # 2. A fresh virtualenv that sees the test environment's packages, after its own.
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "test-environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    # 3. The wheel alone. --ignore-installed: pip sees the editable gemma-search through the
    #    .pth and must neither count it as installed nor try to uninstall it.
    subprocess.run([str(python), "-m", *pip[2:], "install", "--no-deps", "--no-index",
                    "--ignore-installed", str(wheel)], check=True, timeout=300)
    yield Installed(wheel=wheel, venv=venv)


@pytest.fixture
def sst2() -> Path:
    if not (SST2 / "train.tsv").is_file() or not (SST2 / "dev.tsv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"SST-2 is not at {SST2} in CI: the shipped-study test must run")
        pytest.skip(f"SST-2 is not at {SST2}")
    return SST2


def test_the_wheel_carries_migrations_and_studies_and_no_tests(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for name in ("gemma_search/migrations/env.py", "gemma_search/migrations/script.py.mako",
                 "gemma_search/migrations/README.md",
                 "gemma_search/migrations/versions/0001_gs_tables.py",
                 "gemma_search/studies/demo_tiny.yaml",
                 "gemma_search/studies/sst2_gemma2_9b.yaml", "gemma_search/doctor.py"):
        assert name in names, name
    versions = {p.name for p in (REPO / "gemma_search/migrations/versions").glob("*.py")}
    assert {n.rsplit("/", 1)[1] for n in names if "/migrations/versions/" in n} == versions
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


def test_the_installed_package_is_not_the_checkout(installed: Installed, tmp_path: Path
                                                   ) -> None:
    out = subprocess.run([str(installed.venv / "bin" / "python"), "-c",
                          "import gemma_search, gemma_search.db as db; "
                          "print(gemma_search.__file__); print(db.MIGRATIONS)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    package, migrations = (Path(line) for line in out.stdout.splitlines())
    assert package.is_relative_to(installed.venv), package
    assert migrations.is_relative_to(installed.venv) and (migrations / "env.py").is_file()
    assert not package.is_relative_to(REPO)


@pytest.mark.slow
def test_from_an_empty_folder_upgrade_demo_and_doctor(installed: Installed,
                                                      tmp_path: Path) -> None:
    proc = installed.run("db", "upgrade", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sqlite:///gemma_search.db: Optuna schema at " in proc.stdout
    assert proc.stdout.rstrip().endswith("gemma-search tables at 0001"), proc.stdout

    proc = installed.run("demo", "--trials", "2", "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    export = tmp_path / "demo-run" / "export"
    for name in ("best_config.yaml", "training_args.json", "lora_config.json",
                 "provenance.json", "leaderboard.csv"):
        assert (export / name).is_file(), name
    assert (tmp_path / "demo-run" / "demo.db").is_file()
    assert not (tmp_path / "studies").exists()

    # doctor needs no tests folder: the demo's study, its tiny model, on this CPU.
    proc = installed.run("doctor", "--storage", "sqlite:///demo-run/demo.db", "--study",
                         "demo-tiny", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no check failed; CUDA is absent" in proc.stdout
    model = next(line for line in proc.stdout.splitlines() if line.startswith("model "))
    assert model.split()[1] == "ok", model


def test_a_shipped_study_by_name_from_an_empty_folder(installed: Installed, tmp_path: Path,
                                                      sst2: Path) -> None:
    proc = installed.run("create", "sst2_gemma2_9b", "--set",
                         f"data.train={sst2 / 'train.tsv'}", "--set",
                         f"data.validation={sst2 / 'dev.tsv'}", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    shipped = installed.venv.glob("lib/python*/site-packages/gemma_search/studies/"
                                  "sst2_gemma2_9b.yaml")
    assert f"the shipped study {next(shipped)}" in out
    # The spec's storage is the default file, in this folder, which `launch` finds alone.
    assert (tmp_path / "gemma_search.db").is_file()
    assert "start workers with `gemma-search launch sst2-gemma2-9b`" in out
    proc = installed.run("status", "sst2-gemma2-9b", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and '"study": "sst2-gemma2-9b"' in proc.stdout, proc.stderr
