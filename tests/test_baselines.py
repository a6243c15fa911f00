"""Baselines beside every result: the untrained start and the trivial predictor, measured once
per study, shown by status, report and provenance.json, and a study that learns nothing is
flagged."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from gemma_search.baselines import BASELINES_ATTR, compare_to_baselines
from gemma_search.spec import spec_from_text
from gemma_search.train.baselines import trivial_baseline
from gemma_search.train.data import TaskData


def _task_data(task: str, train: list, validation: list, num_labels: int = 0) -> TaskData:
    import datasets

    def split(labels: list) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"input_ids": [[1, 2]] * len(labels),
                                           "labels": labels, "length": [2] * len(labels)})

    return TaskData(train=split(train), validation=split(validation), task=task,
                    num_labels=num_labels, pad_token_id=0, unk_token_id=0, fingerprint="x")


def test_trivial_predictors_by_hand() -> None:
    # classification: 3 of 4 training labels are 1, so the predictor says 1 with p = 0.75
    what, m = trivial_baseline(_task_data("classification", [1, 1, 1, 0], [1, 0], 2), 10,
                               ["neg", "pos"])
    assert what == "majority class 'pos'"
    assert m["accuracy"] == 0.5
    assert m["val_loss"] == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2)
    # regression: the training mean, 2.0
    what, m = trivial_baseline(_task_data("regression", [1.0, 3.0], [2.0, 4.0]), 10)
    assert what == "training mean 2"
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 4) / 2))
    assert m["pearson"] == 0.0  # a constant prediction correlates with nothing
    # causal_lm: target tokens 5, 5, 6 (position 0 and -100 are not targets), vocabulary 10
    what, m = trivial_baseline(_task_data("causal_lm", [[9, 5, 5], [9, -100, 6]],
                                          [[9, 5], [9, 7]]), 10)
    p5, p7 = (2 + 1) / (3 + 10), (0 + 1) / (3 + 10)
    assert m["val_loss"] == pytest.approx(-(math.log(p5) + math.log(p7)) / 2)
    assert m["perplexity"] == pytest.approx(math.exp(m["val_loss"]))


def _spec(metric: str):
    return spec_from_text(f"""
name: s
model: {{name_or_path: /m}}
task: {{type: regression, text_column: t, label_column: y}}
data: {{train: /d/train.jsonl}}
objective: {{metric: {metric}}}
budget: {{eval_every_steps: 1}}
""")


def test_a_best_that_does_not_beat_a_baseline_is_flagged() -> None:
    recorded = {"untrained": {"rmse": 2.0, "pearson": 0.05},
                "trivial": {"rmse": 1.5, "pearson": 0.0}, "trivial_predictor": "training mean 2.5"}
    worse = compare_to_baselines(_spec("rmse"), recorded, 1.7)
    assert worse is not None
    assert (worse["beats_untrained"], worse["beats_trivial"]) == (True, False)
    assert "does not beat the trivial predictor" in worse["line"]
    assert "(training mean 2.5)" in worse["line"]
    better = compare_to_baselines(_spec("pearson"), recorded, 0.4)
    assert better is not None and better["beats_trivial"] and "beats both" in better["line"]
    assert compare_to_baselines(_spec("rmse"), None, 1.0) is None  # not measured yet


@pytest.mark.slow
def test_a_study_that_learns_nothing_says_so(tmp_path: Path, tiny_model: Path,
                                             demo_data: tuple[Path, Path]) -> None:
    """A learning rate of 1e-9 trains nothing: the trial scores its untrained start, which
    the first worker measured, and status, report and export flag it."""
    from typer.testing import CliRunner

    from gemma_search.cli import app
    from gemma_search.export import export_study
    from gemma_search.report import write_report
    from gemma_search.study import create_study, load_study
    from gemma_search.worker import run_worker

    rng = random.Random(1)
    files = []
    for path in demo_data:
        rows = [json.loads(line) for line in path.read_text().splitlines()][:120]
        out = tmp_path / f"{path.stem}.jsonl"
        out.write_text("".join(json.dumps(
            {"t": r["text"], "y": (4.0 if r["label"] == "positive" else 1.0)
             + rng.uniform(-1, 1)}) + "\n" for r in rows))
        files.append(out)
    spec = spec_from_text(f"""
name: learns-nothing
model: {{name_or_path: {tiny_model}, dtype: float32}}
task: {{type: regression, text_column: t, label_column: y}}
data: {{train: {files[0]}, validation: {files[1]}, max_seq_len: 32}}
search: {{learning_rate: 1.0e-9, micro_batch_size: 8, gradient_accumulation_steps: 1,
          lora_targets: attention, lora_r: 4}}
objective: {{metric: rmse}}
pruner: {{type: none}}
budget: {{max_trials: 1, max_tokens_per_trial: 1200, eval_every_tokens: 600}}
checkpoints: {{dir: {tmp_path / 'ckpt'}}}
""")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    create_study(spec, url)
    run_worker(spec.name, url)
    study, _ = load_study(spec.name, url)
    recorded = study.user_attrs[BASELINES_ATTR]
    # Nothing trained, so the trial's value is the untrained start's (LoRA's B starts at 0).
    assert study.best_value == pytest.approx(recorded["untrained"]["rmse"], rel=1e-4)
    assert recorded["trivial"]["rmse"] < recorded["untrained"]["rmse"]  # a random head

    shown = CliRunner().invoke(app, ["status", spec.name, "--storage", url])
    assert shown.exit_code == 0, shown.output
    said = " ".join(shown.output.split())
    assert "does not beat the untrained start nor the trivial predictor" in said
    assert "trivial predictor (training mean" in said
    status = json.loads(CliRunner().invoke(app, ["status", spec.name, "--storage", url,
                                                 "--json"]).output)
    assert status["baselines"]["beats_trivial"] is False

    provenance = json.loads(export_study(spec.name, url, tmp_path / "export")[
        "provenance.json"].read_text())
    assert provenance["baselines"]["beats_trivial"] is False
    assert provenance["baselines"]["trivial"] == pytest.approx(recorded["trivial"]["rmse"])
    html = write_report(spec.name, url, tmp_path / "report")["report.html"].read_text()
    assert "class='warning'" in html and "untrained start" in html
