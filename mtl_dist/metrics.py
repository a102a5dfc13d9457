"""Per-task classification metrics, computed on rank 0 with scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from mtl_dist.data import IGNORE_INDEX


def task_metrics(
    preds: np.ndarray, labels: np.ndarray, names: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 (over all classes), per-class report and confusion matrix.

    Rows whose label is missing (``IGNORE_INDEX``) are left out. Classes absent from both
    predictions and labels still count in the macro average (as F1 0), so the figure is
    comparable across splits.
    """
    keep = labels != IGNORE_INDEX
    preds, labels = preds[keep], labels[keep]
    ids = list(range(len(names)))
    if len(labels) == 0:
        return {"accuracy": float("nan"), "f1_macro": float("nan"), "support": 0}
    report = classification_report(
        labels, preds, labels=ids, target_names=names, output_dict=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1_macro": float(
            f1_score(labels, preds, labels=ids, average="macro", zero_division=0)
        ),
        "support": int(len(labels)),
        "per_class": {n: {k: float(v) for k, v in report[n].items()} for n in names},
        "confusion_matrix": confusion_matrix(labels, preds, labels=ids).tolist(),
    }


def summary_line(metrics: dict[str, dict[str, Any]]) -> str:
    """``domain acc 0.9133 f1 0.9120 | sentiment acc ...`` for the log."""
    return " | ".join(
        f"{task} acc {m['accuracy']:.4f} f1 {m['f1_macro']:.4f}"
        for task, m in metrics.items()
    )
