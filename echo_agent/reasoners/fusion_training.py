"""Training the learned fusion from real runs (``tools/train_policy.py`` is a thin CLI over this).

1. :func:`collect_runs` runs the real agent (embedded policy, real tools, the transparent heuristic
   fusion) on manifest images and keeps each run's typed evidence, so the features the fusion is
   trained on are exactly the ones it sees at inference.
2. :func:`fit_fusion` standardises the features, picks the L2 strength by grouped cross-validation
   (groups = patient / near-duplicate group / clip, never images), fits the final model, fits the
   temperature on out-of-fold logits, and returns :class:`FusionParams` ready to save as JSON.

Out-of-fold discipline: the images given here must not have been used to train the detector whose
candidates they contain (use the detector's held-out split), or the fusion learns to trust
optimistic scores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..organs import get_organ
from ..schemas import ClinicalContext, parse_evidence
from .learned_fusion import FusionParams, fit_logistic, fit_temperature, fusion_features, softmax


@dataclass
class RunRecord:
    """One image's evidence and truth, as collected for fusion training."""

    key: str
    group: str
    organ: str
    label: str
    width: int
    height: int
    evidence: list[dict[str, Any]]
    clinical: dict[str, Any] | None

    def features(self) -> dict[str, float]:
        spec = get_organ(self.organ)
        ev = [parse_evidence(e) for e in self.evidence]
        clin = ClinicalContext.model_validate(self.clinical) if self.clinical else None
        return fusion_features(spec, ev, clin, (self.width, self.height))

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def collect_runs(images: Sequence[Any], *, agent: Any = None, progress: Callable[[int, int], None] | None = None) -> list[RunRecord]:
    """Run the agent on manifest images (``ManifestImage``) and keep evidence + truth."""
    from ..agent import EchoAgent
    from .fusion import HeuristicFusion

    agent = agent or EchoAgent(fusion=HeuristicFusion())
    out: list[RunRecord] = []
    for i, im in enumerate(images):
        ctx = {k: v for k, v in (("age", im.age), ("symptoms", im.symptoms)) if v is not None} or None
        inp = agent.prepare_input(im.image, organ=im.organ, context=ctx)
        state = agent.graph.invoke(inp)
        ref = state["image"]
        out.append(RunRecord(
            key=im.key, group=im.group or im.patient_id or im.key, organ=im.organ, label=im.label,
            width=int(ref["width"]), height=int(ref["height"]), evidence=state.get("evidence") or [],
            clinical=inp.get("clinical"),
        ))
        if progress is not None:
            progress(i + 1, len(images))
    return out


def _group_folds(groups: Sequence[str], k: int, seed: int) -> list[np.ndarray]:
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    fold_of = {uniq[j]: i % k for i, j in enumerate(order)}
    g = np.array([fold_of[x] for x in groups])
    return [np.where(g == f)[0] for f in range(k)]


def fit_fusion(
    records: Sequence[RunRecord],
    *,
    organ: str,
    l2_grid: Sequence[float] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0),
    folds: int = 5,
    seed: int = 0,
    indeterminate_below: float = 0.5,
    balance: bool = True,
    notes: dict[str, Any] | None = None,
) -> FusionParams:
    """Fit the fusion for one organ (see module docstring)."""
    spec = get_organ(organ)
    recs = [r for r in records if r.organ == organ]
    if len(recs) < 10:
        raise ValueError(f"need at least 10 {organ} runs to fit a fusion, got {len(recs)}")
    labels = list(spec.image_labels)
    feats = [r.features() for r in recs]
    names = sorted({n for f in feats for n in f})
    X = np.array([[f.get(n, 0.0) for n in names] for f in feats], dtype=np.float64)
    y = np.array([labels.index(r.label) for r in recs])
    mean, std = X.mean(0), X.std(0)
    std[std < 1e-6] = 1.0
    Xs = (X - mean) / std
    counts = np.bincount(y, minlength=len(labels)).astype(float)
    sw = (len(y) / (len(labels) * np.maximum(counts, 1)))[y] if balance else np.ones(len(y))
    fold_idx = _group_folds([r.group for r in recs], min(folds, len({r.group for r in recs})), seed)

    def oof_logits(l2: float) -> np.ndarray:
        out = np.zeros((len(y), len(labels)))
        for te in fold_idx:
            tr = np.setdiff1d(np.arange(len(y)), te)
            W, b = fit_logistic(Xs[tr], y[tr], len(labels), l2=l2, sample_weight=sw[tr])
            out[te] = Xs[te] @ W.T + b
        return out

    def nll(logits: np.ndarray) -> float:
        P = softmax(logits)
        return float(-(sw * np.log(np.clip(P[np.arange(len(y)), y], 1e-12, None))).sum() / sw.sum())

    scores = {l2: nll(oof_logits(l2)) for l2 in l2_grid}
    best_l2 = min(scores, key=scores.__getitem__)
    oof = oof_logits(best_l2)
    temperature = fit_temperature(oof, y)
    W, b = fit_logistic(Xs, y, len(labels), l2=best_l2, sample_weight=sw)
    oof_acc = float((oof.argmax(1) == y).mean())
    detectors = sorted({e.get("detector") for r in recs for e in r.evidence if e.get("kind") == "detections"} - {None})
    per_class = {lbl: float((oof.argmax(1)[y == i] == i).mean()) if (y == i).any() else None for i, lbl in enumerate(labels)}
    training = {
        "n": len(y), "class_counts": {lbl: int(c) for lbl, c in zip(labels, counts)},
        "l2": best_l2, "cv_nll": {str(k): round(v, 4) for k, v in scores.items()},
        "oof_accuracy": round(oof_acc, 4), "oof_per_class_recall": per_class,
        "folds": len(fold_idx), "seed": seed, "balanced": balance, "detectors": detectors,
        "date": time.strftime("%Y-%m-%d"), **(notes or {}),
    }
    return FusionParams(
        organ=organ, labels=labels, feature_names=names, mean=mean.tolist(), std=std.tolist(),
        weights=W.tolist(), bias=b.tolist(), temperature=temperature,
        indeterminate_below=indeterminate_below, training=training,
    )
