"""Smoke test of bench/search_quality.py --quick: it runs end to end on real SST-2 data.

SST-2 lives outside the repository (../shared/data/sst2). Without it the test skips with a
message; in CI (`CI=true`) the data must be there, so it fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SST2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sst2() -> Path:
    if not (SST2 / "train.tsv").is_file() or not (SST2 / "dev.tsv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"SST-2 is not at {SST2} in CI: the search-quality smoke test must run")
        pytest.skip(f"SST-2 is not at {SST2}: the search-quality benchmark needs it")
    return SST2


def test_quick_run_writes_table_json_and_plot(sst2: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "search_quality.json", tmp_path / "search_quality.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "search_quality.py"), "--quick",
         "--data", str(sst2), "--work", str(tmp_path / "work"), "--out", str(out),
         "--png", str(png)],
        capture_output=True, text=True, timeout=170, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]

    result = json.loads(out.read_text())
    expected = {"tpe+median", "tpe+none", "random+none"}
    assert set(result["summary"]) == expected
    for line in ("| tpe+median |", "| tpe+none |", "| random+none |"):
        assert line in proc.stdout
    max_trials = result["scale"]["max_trials"]
    for run in result["runs"]:
        assert len(run["trials"]) == max_trials
        assert all(t["state"] in ("COMPLETE", "PRUNED") for t in run["trials"])
        assert run["total_tokens"] > 0
        assert all(t["tokens"] > 0 for t in run["trials"])
        assert run["best_val_loss"] is not None and run["best_val_loss"] > 0
        assert 0 <= run["best_accuracy"] <= 1
        tokens = [p[0] for p in run["curve"]]
        assert tokens == sorted(tokens) and tokens[-1] <= run["total_tokens"]
    assert png.stat().st_size > 0
