"""Task metrics over predicted and true class indices: accuracy, macro-F1, or any callable."""
from __future__ import annotations

from typing import Callable, Sequence, Union

MetricFn = Callable[[Sequence[int], Sequence[int]], float]


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    _check_lengths(predictions, labels)
    return sum(int(p) == int(y) for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in the labels or the predictions
    (a class never predicted nor present would be 0/0; scikit-learn's default leaves it out the same way)."""
    _check_lengths(predictions, labels)
    classes = sorted({int(y) for y in labels} | {int(p) for p in predictions})
    total = 0.0
    for c in classes:
        tp = sum(int(p) == c and int(y) == c for p, y in zip(predictions, labels))
        fp = sum(int(p) == c and int(y) != c for p, y in zip(predictions, labels))
        fn = sum(int(p) != c and int(y) == c for p, y in zip(predictions, labels))
        total += 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
    return total / len(classes)


METRICS = {"accuracy": accuracy, "macro_f1": macro_f1}


def get_metric(metric: Union[str, MetricFn], where: str = "metric") -> MetricFn:
    """A metric by name ("accuracy" | "macro_f1") or any callable (predictions, labels) -> float."""
    if callable(metric):
        return metric
    if isinstance(metric, str) and metric in METRICS:
        return METRICS[metric]
    raise ValueError(f"{where}: expected one of {sorted(METRICS)} or a callable (predictions, labels) -> float, "
                     f"got {metric!r}")


def metric_name(metric: Union[str, MetricFn]) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", type(metric).__name__)


def _check_lengths(predictions, labels) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"metric: {len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("metric: no examples")
