#!/usr/bin/env python
"""Exploratory (no rule): would the second look's lesion probability pick the leading candidate
better than the detector's score? Single-center detector + the same center's fine-tuned second look
(`runs/breast_probe/F_<center>.onnx`), the agent's re-check candidates (threshold 0.1, mirrored), top 3;
share of lesion images whose leading box hits a true lesion (IoU >= 0.5), on the own val split and the
other center's train + val (never a test split).

    python docs/experiments/detector_input_size/rerank.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))


def measure(det_path: str, cls_path: str, sets: list) -> None:
    from echo_agent.detectors.onnx import OnnxDetector
    from echo_agent.detectors.region_classifier import OnnxRegionClassifier
    from echo_agent.imaging import load_image
    from echo_agent.imaging.preprocess import prepare_for_detection

    det, cls = OnnxDetector(det_path), OnnxRegionClassifier(cls_path)
    for name, images in sets:
        lesions = [im for im in images if im.label != "normal" and im.boxes]
        hits = {"detector score": 0, "second look": 0, "product": 0, "any of 3": 0}
        for im in lesions:
            prep = prepare_for_detection(load_image(im.image).array)
            top = sorted(det.detect(prep.array, score_threshold=0.1, tta=True), key=lambda d: -d.score)[:3]
            if not top:
                continue
            p_lesion = [1.0 - p["normal"] for p in cls.classify(prep.array, [d.box for d in top])]
            hit = [any(prep.to_original(d.box).iou(t) >= 0.5 for t in im.boxes) for d in top]
            hits["detector score"] += hit[0]
            hits["second look"] += hit[int(np.argmax(p_lesion))]
            hits["product"] += hit[int(np.argmax([d.score * p for d, p in zip(top, p_lesion, strict=True)]))]
            hits["any of 3"] += any(hit)
        print(f"{Path(det_path).name} on {name} ({len(lesions)} lesion images): "
              + ", ".join(f"{k} {v / len(lesions):.3f}" for k, v in hits.items()), flush=True)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from echo_agent.eval.datasets import load_split

    def pool(center: str) -> list:
        return load_split(center, "train") + load_split(center, "val")

    for seed in ("", "_s1"):
        measure(f"runs/det_acq/busi_base{seed}.onnx", "runs/breast_probe/F_busi.onnx",
                [("own val", load_split("busi", "val")), ("BrEaST train + val", pool("breast_lesions_usg"))])
        measure(f"runs/det_acq/breast_base{seed}.onnx", "runs/breast_probe/F_breast_lesions_usg.onnx",
                [("own val", load_split("breast_lesions_usg", "val")), ("BUSI train + val", pool("busi"))])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
