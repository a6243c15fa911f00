"""Smoke test of bench/search_quality.py --quick: it runs end to end on real SST-2 data,
pretrains its base (bench/pretrain_base.py) once, reuses it, and reports its linear probe.

SST-2 lives outside the repository (../shared/data/sst2). Without it the test skips with a
message; in CI (`CI=true`) the data must be there, so it fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="module")
def quick_run(sst2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `--quick` run (it pretrains its base in its own --work), shared by the tests."""
    tmp = tmp_path_factory.mktemp("search_quality")
    out, png = tmp / "search_quality.json", tmp / "search_quality.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "search_quality.py"), "--quick",
         "--data", str(sst2), "--work", str(tmp / "work"), "--out", str(out),
         "--png", str(png)],
        capture_output=True, text=True, timeout=170, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"proc": proc, "out": out, "png": png, "work": tmp / "work" / "quick"}


@pytest.fixture(scope="module")
def pretrain_base() -> Any:
    sys.path.insert(0, str(REPO / "bench"))
    import pretrain_base

    return pretrain_base


def test_quick_run_writes_table_json_and_plot(quick_run: dict[str, Any]) -> None:
    proc, out, png = quick_run["proc"], quick_run["out"], quick_run["png"]
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
    # How early evaluations foretell the last: for the strategies that prune nothing, a
    # rank correlation per evaluation before the last, and a table of them on stdout.
    assert set(result["correlations"]) <= {"tpe+none", "random+none"}
    for row in result["correlations"].values():  # None: every loss tied at that evaluation
        assert row and all(v is None or -1 <= v <= 1 for v in row)
    if result["correlations"]:
        assert "| rank correlation with the final value, at evaluation | 1 |" in proc.stdout
    assert png.stat().st_size > 0


def test_quick_run_searches_on_a_pretrained_base_with_its_probe(
        quick_run: dict[str, Any]) -> None:
    result = json.loads(quick_run["out"].read_text())
    base = result["base"]
    assert base["kind"] == "pretrained"
    assert base["pretrain"]["reused"] is False  # a fresh --work: this run trained it
    assert base["pretrain"]["tokens_trained"] > 0
    assert 0 < base["probe_random_dev_accuracy"] < 1
    assert 0 < base["probe_pretrained_dev_accuracy"] < 1
    assert base["probe_dev_accuracy"] == base["probe_pretrained_dev_accuracy"]
    assert "pretrained base" in quick_run["proc"].stdout
    # the studies ran on that base, not on the random model: their stored specs name it
    from gemma_search import db

    assert Path(base["path"]).parent == quick_run["work"]
    studies = quick_run["work"] / f"runs-{Path(base['path']).name}" / "studies"
    for run in result["runs"]:
        name = f"sq-{run['strategy'].replace('+', '-')}-s{run['seed']}"
        stored = db.load_study_spec(db.make_engine(f"sqlite:///{studies / name}.db"), name)
        assert stored is not None and f"name_or_path: {base['path']}\n" in stored[0]


def test_pretrained_base_is_cached_and_reused(quick_run: dict[str, Any], sst2: Path,
                                              pretrain_base: Any, tmp_path: Path) -> None:
    pb, work = pretrain_base, quick_run["work"]
    base = json.loads(quick_run["out"].read_text())["base"]
    weights = Path(base["path"]) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    random_base = next(p for p in work.iterdir() if p.name.startswith("tiny-gemma2-")
                       and "-pretrained-" not in p.name)

    logged: list[str] = []
    again = pb.ensure_base(random_base, sst2, work, pb.QUICK_PRETRAIN, pb.QUICK_PROBE,
                           log=logged.append)
    assert again["reused"] is True and logged == []  # no pretraining, no probe re-run
    assert again["path"] == base["path"] and weights.stat().st_mtime_ns == mtime
    assert again["probe"]["pretrained"]["dev_accuracy"] == \
        base["probe_pretrained_dev_accuracy"]

    # the cache key follows the settings and the data
    key = pb.cache_key(random_base, sst2, pb.QUICK_PRETRAIN)
    assert key == again["key"]
    changed = pb.PretrainSettings(**{**pb.QUICK_PRETRAIN.__dict__,
                                     "steps": pb.QUICK_PRETRAIN.steps + 1})
    assert pb.cache_key(random_base, sst2, changed) != key
    for name, text in (("a", "label\tsentence\n1\tgood\n"), ("b", "label\tsentence\n0\tbad\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.tsv").write_text(text)
    assert pb.cache_key(random_base, tmp_path / "a", pb.QUICK_PRETRAIN) != \
        pb.cache_key(random_base, tmp_path / "b", pb.QUICK_PRETRAIN)


def test_docs_section_names_the_base_and_its_probe(quick_run: dict[str, Any]) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import search_quality

    result = json.loads(quick_run["out"].read_text())
    result["summary"] = search_quality.summarise(result["runs"])
    base = result["base"]
    text = search_quality.docs_section(result, quick_run["png"])
    assert "**pretrained**" in text and "bench/pretrain_base.py" in text
    assert f"{base['probe_random_dev_accuracy']:.1%}" in text
    assert f"{base['probe_pretrained_dev_accuracy']:.1%}" in text
    random = {**base, "kind": "random", "probe_pretrained_dev_accuracy": None,
              "pretrain": None}
    text = search_quality.docs_section({**result, "base": random}, quick_run["png"])
    assert "**random**" in text and f"{base['probe_random_dev_accuracy']:.1%}" in text
