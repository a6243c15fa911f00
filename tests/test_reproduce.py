"""An exported trial, re-trained by the exported reproduce.py in plain transformers + peft
(+ TRL), scores what the study recorded for it: one test per task, on the tiny Gemma 2."""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gemma_search.export import export_study
from gemma_search.spec import load_spec
from gemma_search.study import create_study
from gemma_search.worker import run_worker

#: The study's value and reproduce.py's best agree this closely (relative).
TOLERANCE = 1e-3

#: A search over what the export must carry: two optimizers (momentum is conditional),
#: warmup, LoRA dropout, token dropout and the L1 penalty; evaluation every ~1000 tokens
#: and a token budget that ends the trial mid-epoch.
SEARCH = """
search:
  learning_rate: {{low: 2.0e-3, high: 2.0e-2, log: true}}
  micro_batch_size: 4
  gradient_accumulation_steps: 2
  epochs: 2
  optimizer: {{choices: [adamw, sgd]}}
  momentum: 0.9
  warmup_ratio: 0.1
  weight_decay: 0.01
  lora_r: 4
  lora_dropout: 0.1
  lora_targets: {targets}
  token_dropout: {token_dropout}
  l1_penalty: 1.0e-4
sampler: {{type: random, seed: 3}}
pruner: {{type: none}}
budget: {{max_trials: 2, max_tokens_per_trial: 3000, eval_every_tokens: 700}}
"""


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def task_data(demo_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, tuple[Path, Path]]:
    """The demo reviews as three tasks: labels, a noisy score (TSV), and prompt/answer."""
    out = tmp_path_factory.mktemp("reproduce-data")
    rng = random.Random(0)
    files: dict[str, list[Path]] = {"classification": list(demo_data), "regression": [],
                                    "causal_lm": []}
    for path in demo_data:
        rows = _rows(path)[:240]
        # A score from the label plus noise, in a TSV without a header row.
        score = [(4.0 if r["label"] == "positive" else 1.0) + rng.uniform(-1, 1) for r in rows]
        lines = [f"{r['text']}\t{s:.3f}" for r, s in zip(rows, score, strict=True)]
        files["regression"].append(_write(out / f"{path.stem}.tsv", lines))
        sft = [json.dumps({"review": r["text"], "answer": r["label"]}) for r in rows]
        files["causal_lm"].append(_write(out / f"{path.stem}-sft.jsonl", sft))
    return {task: (train, validation) for task, (train, validation) in files.items()}


TASKS = {
    "classification": ("task: {type: classification, text_column: text, labels: [negative, "
                       "positive]}\nobjective: {metric: accuracy}", 32, "attention", 0.0),
    "regression": ("task: {type: regression, text_column: sentence, label_column: score}\n"
                   "objective: {metric: pearson}", 32, "attention", 0.1),
    "causal_lm": ('task: {type: causal_lm, prompt_template: "review: {review} sentiment:", '
                  "completion_column: answer}", 48, "all_linear", 0.1),
}


def _study(tmp_path: Path, model: Path, task: str, data: tuple[Path, Path]) -> tuple[str, str]:
    head, max_len, targets, token_dropout = TASKS[task]
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        f"name: reproduce-{task}\nmodel: {{name_or_path: {model}, dtype: float32}}\n{head}\n"
        f"data: {{train: {data[0]}, validation: {data[1]}, max_seq_len: {max_len}"
        + (", header: false, columns: [sentence, score]" if task == "regression" else "")
        + "}\n"
        + SEARCH.format(targets=targets, token_dropout=token_dropout)
        + f"checkpoints: {{dir: {tmp_path / 'checkpoints'}}}\n")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = load_spec(spec_file)
    create_study(spec, url)
    assert run_worker(spec.name, url) == 2
    return spec.name, url


def _reproduce(folder: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(folder / "reproduce.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "regression", "causal_lm"])
def test_reproduce_py_scores_what_the_study_recorded(task: str, tmp_path: Path,
                                                     tiny_model: Path,
                                                     task_data: dict[str, tuple[Path, Path]]
                                                     ) -> None:
    name, url = _study(tmp_path, tiny_model, task, task_data[task])
    out = tmp_path / "export"
    paths = export_study(name, url, out)
    provenance = json.loads(paths["provenance.json"].read_text())
    recorded = provenance["value"]

    result = _reproduce(out)
    assert result["metric"] == provenance["metric"]
    assert result["best"] == pytest.approx(recorded, rel=TOLERANCE), result["history"]
    # Every evaluation of the trial happened, at the exported steps.
    args = json.loads(paths["training_args.json"].read_text())
    steps = [row["step"] for row in result["history"]]
    expected = list(range(args["eval_steps"], args["max_steps"] + 1, args["eval_steps"]))
    if expected[-1] != args["max_steps"]:
        expected.append(args["max_steps"])
    assert steps == expected
    if task == "causal_lm":  # TRL's SFTTrainer above; transformers' Trainer gives the same
        plain = _reproduce(out, "--no-trl")
        assert plain["best"] == pytest.approx(recorded, rel=TOLERANCE)


def test_reproduce_py_imports_only_hugging_face_and_torch() -> None:
    import gemma_search

    source = Path(gemma_search.__file__).with_name("reproduce.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    assert imported - stdlib == {"torch", "transformers", "peft", "datasets", "trl"}
