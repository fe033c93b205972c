#!/usr/bin/env python
"""Lesion images a single-center breast detector leaves without a box at the operating threshold, by
lesion size, on the other center's development images (train + val; never a test split).

    python docs/experiments/detector_input_size/miss_by_size.py \
        --busi-only base=runs/det_acq/busi_base.onnx r320=runs/det_size/busi_320.onnx \
        --breast-only base=runs/det_acq/breast_base.onnx r320=runs/det_size/breast_320.onnx

Size of a lesion image: the square root of its largest true box's area over the image area.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "docs" / "experiments" / "detector_acquisition"))

BINS = (0.0, 0.15, 0.30, 0.45, 1.01)


def main(argv: list[str] | None = None) -> int:
    from cross_center import OTHER, _named

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--busi-only", nargs="+", default=[], metavar="NAME=ONNX")
    ap.add_argument("--breast-only", nargs="+", default=[], metavar="NAME=ONNX")
    ap.add_argument("--threshold", type=float, default=0.25)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from echo_agent.detectors.onnx import OnnxDetector
    from echo_agent.eval.datasets import load_split
    from echo_agent.imaging import load_image
    from echo_agent.organs import get_organ
    from echo_agent.tools.toolkit import run_detector

    organ = get_organ("breast")
    for center, arms in (("busi", _named(args.busi_only)), ("breast_lesions_usg", _named(args.breast_only))):
        lesions = [im for s in ("train", "val") for im in load_split(OTHER[center], s)
                   if im.label != organ.normal_label and im.boxes]
        arrays = [load_image(im.image).array for im in lesions]
        sizes = np.array([
            np.sqrt(max((b.x2 - b.x1) * (b.y2 - b.y1) for b in im.boxes) / (a.shape[0] * a.shape[1]))
            for im, a in zip(lesions, arrays, strict=True)])
        for name, path in arms.items():
            det = OnnxDetector(path)
            missed = np.array([not run_detector(organ, a, detector=det, score_threshold=args.threshold) for a in arrays])
            cells = []
            for lo, hi in zip(BINS[:-1], BINS[1:], strict=True):
                inside = (sizes >= lo) & (sizes < hi)
                cells.append(f"{lo:.2f}-{min(hi, 1.0):.2f}: {int(missed[inside].sum())}/{int(inside.sum())}")
            print(f"{center}_only/{name:8s} → {OTHER[center]}: without a box {int(missed.sum())}/{len(lesions)}; "
                  + "; ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
