"""Competition metrics: a scikit-learn score for OOF predictions, a torchmetrics twin for validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss


def multiclass_log_loss(target: np.ndarray, proba: np.ndarray) -> float:
    # probabilities read back from CSV sum to 1 only up to float32 rounding, which scikit-learn warns about
    proba = proba / proba.sum(axis=1, keepdims=True)
    return float(log_loss(target, proba, labels=np.arange(proba.shape[1])))


@dataclass(frozen=True)
class Metric:
    name: str
    mode: str  # "max" or "min": which direction is better
    score: Callable[[np.ndarray, np.ndarray], float]  # (true class indices, probabilities) -> score
    # torchmetrics class and arguments for validation; None: the metric is the validation loss itself
    torchmetric: Optional[tuple[str, dict]]

    @property
    def monitor(self) -> str:
        """The validation value Lightning's checkpoint and early stopping watch."""
        return f"val/{self.name}" if self.torchmetric else "val/loss"

    def build_torchmetric(self, num_classes: int):
        import torchmetrics.classification

        class_name, arguments = self.torchmetric
        return getattr(torchmetrics.classification, class_name)(num_classes=num_classes, **arguments)


METRICS = {
    "accuracy": Metric(
        "accuracy", "max", lambda y, p: float(accuracy_score(y, p.argmax(1))),
        ("MulticlassAccuracy", {"average": "micro"}),
    ),
    "macro_f1": Metric(
        "macro_f1", "max", lambda y, p: float(f1_score(y, p.argmax(1), average="macro", zero_division=0)),
        ("MulticlassF1Score", {"average": "macro"}),
    ),
    # validation loss is plain cross-entropy, which is the log-loss
    "logloss": Metric("logloss", "min", multiclass_log_loss, None),
}
