"""Agreement statistics used to validate the captioner against radiologists (no sklearn needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Confusion counts, rows = ``y_true`` label, columns = ``y_pred`` label (others ignored)."""
    index = {lab: i for i, lab in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        if t in index and p in index:
            m[index[t], index[p]] += 1
    return m


def cohen_kappa(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Cohen's kappa (unweighted) between two raters.

    >>> cohen_kappa(["a", "a", "b", "b"], ["a", "a", "b", "b"])
    1.0
    >>> cohen_kappa(["a", "b", "a", "b"], ["a", "a", "b", "b"])
    0.0
    """
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred))
    m = confusion(y_true, y_pred, labels).astype(np.float64)
    n = m.sum()
    if n == 0:
        return float("nan")
    po = np.trace(m) / n
    pe = float((m.sum(axis=1) * m.sum(axis=0)).sum()) / (n * n)
    if pe >= 1.0:
        return 1.0 if po >= 1.0 else 0.0
    return float((po - pe) / (1.0 - pe))


def format_confusion(m: np.ndarray, labels: Sequence[str]) -> str:
    """A plain-text table (rows: reference, columns: captioner)."""
    short = [lab[:12] for lab in labels]
    width = max(12, max(len(s) for s in short))
    head = "ref \\ pred".ljust(width) + " " + " ".join(s.rjust(width) for s in short)
    lines = [head]
    for i, s in enumerate(short):
        lines.append(s.ljust(width) + " " + " ".join(str(int(v)).rjust(width) for v in m[i]))
    return "\n".join(lines)
