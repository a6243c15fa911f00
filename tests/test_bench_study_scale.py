"""`bench/study_scale.py`: a small run of the benchmark on SQLite, not a measurement; and its
fast fill, which must write what Optuna's `add_trials` writes."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "study_scale.py"


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("study_scale", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fast_fill_writes_what_optuna_writes(tmp_path: Path) -> None:
    import optuna

    from gemma_search.storage import open_storage
    from gemma_search.study import create_study

    b = bench()
    url = f"sqlite:///{tmp_path / 'fill.db'}"
    spec = b.bench_spec("by-optuna", 30)
    trials = b.synthetic_trials(spec, 30, seed=3)
    states = {t.state.name for t in trials}
    assert {"COMPLETE", "PRUNED"} <= states, states
    assert all(len(t.intermediate_values) == b.STEPS for t in trials
               if t.state.name == "COMPLETE")
    create_study(spec, url).add_trials(trials)
    bulk = create_study(b.bench_spec("by-rows", 30), url)
    # Two batches, the second numbered after the first, as add_trials numbers them.
    storage = open_storage(url)
    b.add_trials_bulk(storage, bulk._study_id, trials[:17])
    b.add_trials_bulk(storage, bulk._study_id, trials[17:])
    b.check_fill(url, "by-rows", trials)
    by_optuna = optuna.load_study(study_name="by-optuna", storage=url).get_trials()
    by_rows = optuna.load_study(study_name="by-rows", storage=url).get_trials()
    assert [b.trial_facts(t) for t in by_rows] == [b.trial_facts(t) for t in by_optuna]
    assert [t.number for t in by_rows] == list(range(30))


def test_bench_prints_every_row_with_numbers_and_writes_its_docs_section(
        tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nearlier text\n")
    out = tmp_path / "samples.json"
    cmd = [sys.executable, str(SCRIPT), "--trials", "30", "--small", "10", "--rounds", "1",
           "--url", f"sqlite:///{tmp_path / 'db' / 'scale.db'}", "--write-docs", "--docs",
           str(docs), "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    b = bench()
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| seconds") and "30 trials" in rows[0]
    labels = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in rows[1:]}
    # Every row but the worker's (--worker), the small study's size in its label.
    assert list(labels) == [label.format(small=10) for key, label in b.ROWS.items()
                            if key not in b.WORKER_ROWS]
    for label, cell in labels.items():
        assert re.fullmatch(r"\d+\.\d\d( / \d+\.\d\d| MB) \|", cell), (label, cell)
    samples = json.loads(out.read_text())["samples"]["30"]
    assert all(len(samples[key]) == 1 for key in b.ROWS if key not in b.WORKER_ROWS)
    assert min(samples["report"]) > 0 and samples["dash_mb"][0] > 0
    assert samples["dash_mb"][0] < samples["dash_json_mb"][0] / 3  # gzip, as to a browser

    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nearlier text\n\n" + b.HEADING + "\n\n" + b.BEGIN)
    assert text.rstrip().endswith(b.END)
    assert rows[0] in text and "commit" in text and "Load average" in text
    # Written again, the section is replaced, not added.
    b.write_docs(docs, "again")
    again = docs.read_text()
    assert again.count(b.BEGIN) == 1 and again.count(b.HEADING) == 1
    assert f"{b.BEGIN}\nagain\n{b.END}" in again and rows[0] not in again

    # --reuse keeps the studies that hold their trials: nothing is written again.
    run = subprocess.run([*cmd[:-5], "--reuse", "--rounds", "0"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stderr.count("reusing") == 3, run.stderr


@pytest.mark.slow
def test_bench_times_a_worker_and_leaves_the_study_as_it_was(tmp_path: Path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path / 'scale.db'}"
    run = subprocess.run([sys.executable, str(SCRIPT), "--trials", "20", "--small", "5",
                          "--rounds", "1", "--url", url, "--worker", "--workdir",
                          str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    b = bench()
    for key in ("worker_ready", "worker_claim", "worker_eval"):
        label = b.ROWS[key]
        line = next(line for line in run.stdout.splitlines() if line.startswith(f"| {label}"))
        assert re.fullmatch(r"\| .* \| \d+\.\d\d / \d+\.\d\d \|", line), line
    study = optuna.load_study(study_name="scale-20", storage=b.size_url(url, "20"))
    assert len(study.trials) == 20 and "baselines" not in study.user_attrs
    assert not (tmp_path / "work" / "checkpoints" / "scale-20").exists()
