"""`bench/throughput.py --tiny`: a CPU smoke test of the benchmark, not a measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_bench_runs_both_sides_on_the_same_model(tmp_path: Path) -> None:
    # A process of its own, as a user runs it: the benchmark sets torch's default dtype and
    # imports datasets before the CLI's quiet settings, which would leak into other tests.
    out = tmp_path / "throughput.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--tiny",
                          "--steps", "2", "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    plain, engine = report["rows"]
    assert plain["attention"] == "eager" and plain["checkpointing"] is True
    assert engine["attention"] != "sdpa" and engine["loss"] == "chunked"
    assert plain["tokens_per_s"] > 0 and engine["tokens_per_s"] > 0
    assert engine["switch_s"] is not None and engine["switch_s"] >= 0
    assert report["speedup"] == pytest.approx(engine["tokens_per_s"] / plain["tokens_per_s"],
                                              rel=1e-3)
    assert "| gemma-search engine | 8 |" in run.stdout and "engine / plain:" in run.stdout
