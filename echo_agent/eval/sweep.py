"""A detector's metrics at several score thresholds, through the agent's own detection path.

The images run once at the lowest threshold through :func:`echo_agent.tools.toolkit.run_detector`
(preprocessing, mapping back to the original image, the organ's class merging); each threshold then
keeps the candidates at or above it. Used to pick or check operating thresholds: detector training
reports (``tools/train_detector.py``, ``tools/train_lite_detector.py``) and per-center
recalibration (:mod:`echo_agent.training.recalibrate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def threshold_sweep(organ: Any, detector: Any, images: Sequence[Any], thresholds: Sequence[float], *,
                    lesion_only: bool = False) -> dict[float, dict[str, float | None]]:
    """Per threshold: localization F1@0.5 / precision / recall, grounded F1, and detector-only
    accuracy (image label = the top box's, ``normal`` when none) of ``detector`` on manifest ``images``.

    ``lesion_only``: the detector has one class-agnostic ``lesion`` class (a class-design
    experiment); a kept box then counts as the right lesion label for accuracy.
    """
    from ..imaging import load_image
    from ..tools.toolkit import run_detector
    from .metrics import PredictedBox, ScoredImage, detection_score

    if not images:
        raise ValueError("no images to sweep thresholds on")
    lowest = min(thresholds)
    raw = [run_detector(organ, load_image(im.image).array, detector=detector, score_threshold=lowest) for im in images]
    out: dict[float, dict[str, float | None]] = {}
    for t in thresholds:
        scored = []
        correct = 0
        for im, dets in zip(images, raw, strict=True):
            kept = tuple(PredictedBox(box=d.box, label=organ.image_label_for(d.label), score=float(d.score))
                         for d in dets if d.score >= t)
            pred = max(kept, key=lambda p: p.score).label if kept else organ.normal_label
            if lesion_only and kept:
                pred = im.label if im.label != organ.normal_label else "lesion"
            correct += pred == im.label
            scored.append(ScoredImage(key=im.key, true_label=im.label, true_boxes=im.boxes, pred_label=pred,
                                      pred_boxes=kept))
        loc = detection_score(scored, normal_label=organ.normal_label)
        grd = detection_score(scored, grounded=True, normal_label=organ.normal_label)
        out[t] = {"f1": loc.f1, "precision": loc.precision, "recall": loc.recall, "grounded_f1": grd.f1,
                  "accuracy": correct / len(images)}
    return out


__all__ = ["threshold_sweep"]
