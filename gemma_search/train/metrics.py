"""Validation metrics of each task, as plain functions over arrays."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["classification_metrics", "regression_metrics"]


def classification_metrics(preds: np.ndarray, labels: np.ndarray,
                           num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1; absent classes count 0)."""
    accuracy = float((preds == labels).mean()) if len(labels) else 0.0
    f1s = []
    for c in range(num_labels):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": accuracy, "macro_f1": float(np.mean(f1s))}


def regression_metrics(preds: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """RMSE, Pearson and Spearman; a correlation undefined for constant predictions is 0."""
    rmse = float(np.sqrt(np.mean((preds - targets) ** 2)))
    out = {"rmse": rmse, "pearson": 0.0, "spearman": 0.0}
    if len(preds) > 1 and np.ptp(preds) > 0 and np.ptp(targets) > 0:  # not constant
        pearson = float(stats.pearsonr(preds, targets)[0])
        spearman = float(stats.spearmanr(preds, targets)[0])
        out["pearson"] = pearson if math.isfinite(pearson) else 0.0
        out["spearman"] = spearman if math.isfinite(spearman) else 0.0
    return out
