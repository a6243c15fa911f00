"""`bench/throughput.py --tiny`: a CPU smoke test of the benchmark, not a measurement."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_bench_runs_both_sides_on_the_same_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("throughput", REPO / "bench" / "throughput.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throughput", bench)  # dataclasses look themselves up
    spec.loader.exec_module(bench)
    out = tmp_path / "throughput.json"
    assert bench.main(["--tiny", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    plain, engine = report["rows"]
    assert plain["attention"] == "eager" and plain["checkpointing"] is True
    assert engine["attention"] != "sdpa" and engine["loss"] == "chunked"
    assert plain["tokens_per_s"] > 0 and engine["tokens_per_s"] > 0
    assert engine["switch_s"] is not None and engine["switch_s"] >= 0
    assert report["speedup"] == pytest.approx(engine["tokens_per_s"] / plain["tokens_per_s"],
                                              rel=1e-3)
    table = capsys.readouterr().out
    assert "| gemma-search engine | 8 |" in table and "engine / plain:" in table
