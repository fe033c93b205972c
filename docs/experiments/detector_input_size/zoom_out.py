#!/usr/bin/env python
"""Exploratory (no rule): do the lesions a single-center breast detector leaves without a box at the
other center come back when its prepared view is zoomed out (padded with black around it), and how
many normal images get a box that way? Other center's train + val only (never a test split).

    python docs/experiments/detector_input_size/zoom_out.py runs/det_acq/busi_base.onnx runs/det_acq/breast_base.onnx
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))


def boxes_at(det, prep, factor: float, threshold: float) -> list:  # noqa: ANN001 - detector, PreparedImage
    """The detector's boxes (original pixels, best first) on ``prep`` zoomed out by ``factor``."""
    from echo_agent.schemas import Box

    a = prep.array
    h, w = a.shape[:2]
    oy = ox = 0
    if factor != 1.0:
        hh, ww = int(h * factor), int(w * factor)
        oy, ox = (hh - h) // 2, (ww - w) // 2
        canvas = np.zeros((hh, ww, 3), np.uint8)
        canvas[oy:oy + h, ox:ox + w] = a
        a = canvas
    out = sorted(det.detect(a, score_threshold=threshold), key=lambda d: -d.score)
    return [prep.to_original(Box(x1=d.box.x1 - ox, y1=d.box.y1 - oy, x2=d.box.x2 - ox, y2=d.box.y2 - oy).clip(w, h))
            for d in out]


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from echo_agent.detectors.onnx import OnnxDetector
    from echo_agent.eval.datasets import load_split
    from echo_agent.imaging import load_image
    from echo_agent.imaging.preprocess import prepare_for_detection

    for path, other in ((argv[0], "breast_lesions_usg"), (argv[1], "busi")):
        det = OnnxDetector(path)
        images = [im for s in ("train", "val") for im in load_split(other, s)]
        lesions = [im for im in images if im.label != "normal" and im.boxes]
        normals = [im for im in images if im.label == "normal"]
        prepared = {im.key: prepare_for_detection(load_image(im.image).array) for im in lesions + normals}
        # lesion images without a box as the detector sees them (zoom 1.0), found once for every zoom
        missed_at_1 = {im.key for im in lesions if not boxes_at(det, prepared[im.key], 1.0, 0.25)}
        for factor in (1.0, 1.5, 2.0):
            top_hits = recovered = 0
            for im in lesions:
                found = boxes_at(det, prepared[im.key], factor, 0.25)
                top_hits += any(found[0].iou(t) >= 0.5 for t in im.boxes) if found else 0
                if im.key in missed_at_1:
                    recovered += any(b.iou(t) >= 0.5 for b in found for t in im.boxes)
            normal_boxed = sum(bool(boxes_at(det, prepared[im.key], factor, 0.25)) for im in normals)
            print(f"{Path(path).name} → {other}, zoom-out {factor}: top box right {top_hits}/{len(lesions)}; "
                  f"without a box at 1.0 {len(missed_at_1)}, found by the zoom-out {recovered}; "
                  f"normal images with a box {normal_boxed}/{len(normals)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
