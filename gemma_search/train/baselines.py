"""What a trial must beat to have learnt anything: the untrained start and a trivial predictor.

- The untrained start: the model as every trial starts it, evaluated before the first step.
  Fresh LoRA adapters add nothing yet (their B matrix starts at zero), so this is the base
  model with the head every trial starts from (classification / regression: the seeded
  `score` head).
- The trivial predictor, fitted on the training split, never looking at the text: the
  majority class (classification; its val_loss predicts the training class frequencies), the
  training mean (regression), or the training target tokens' frequencies (causal_lm: a
  unigram model with add-one smoothing over the vocabulary).

Both are measured on the validation split with the task's own metrics, so every metric a
study can optimise has its two baselines.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from gemma_search.train.data import TaskData
from gemma_search.train.model import BaseModel

__all__ = ["trivial_baseline", "untrained_baseline"]


def untrained_baseline(base: BaseModel, data: TaskData) -> dict[str, float]:
    """The task's validation metrics of the resident model as a trial starts it."""
    from accelerate import Accelerator

    from gemma_search.train.engine import evaluate

    cuda = base.device.type == "cuda"
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    return evaluate(base.model, data, base.device, accelerator)


def trivial_baseline(data: TaskData, vocab_size: int,
                     label_names: Sequence[str] | None = None) -> tuple[str, dict[str, float]]:
    """(what the predictor is, its validation metrics)."""
    import numpy as np

    from gemma_search.train.metrics import classification_metrics, regression_metrics

    train, validation = data.train["labels"], data.validation["labels"]
    if data.task == "classification":
        counts = Counter(int(y) for y in train)
        majority = counts.most_common(1)[0][0]
        y = np.asarray(validation, dtype=np.int64)
        prior = {c: counts[c] / len(train) for c in range(data.num_labels)}
        # An unseen class would be infinitely surprising; it cannot be in a sane split.
        nll = -sum(math.log(max(prior[int(c)], 1e-12)) for c in y) / max(len(y), 1)
        metrics = classification_metrics(np.full_like(y, majority), y, data.num_labels)
        name = label_names[majority] if label_names else majority
        return f"majority class {name!r}", {"val_loss": nll, **metrics}
    if data.task == "regression":
        mean = float(np.mean(np.asarray(train, dtype=np.float64)))
        y = np.asarray(validation, dtype=np.float64)
        predictions = np.full_like(y, mean)
        metrics = regression_metrics(predictions, y)
        return f"training mean {mean:.4g}", {"val_loss": float(np.mean((y - mean) ** 2)),
                                             **metrics}
    counts = Counter(t for row in train for t in _targets(row))
    total = sum(counts.values())
    nll, n = 0.0, 0
    for row in validation:
        for t in _targets(row):
            nll -= math.log((counts[t] + 1) / (total + vocab_size))
            n += 1
    val_loss = nll / max(n, 1)
    return "training token frequencies (unigram)", {
        "val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}


def _targets(labels: list[int]) -> list[int]:
    """A causal_lm row's target tokens: labels after the first (nothing predicts token 0)."""
    return [t for t in labels[1:] if t != -100]
