#!/usr/bin/env python
"""Afterwards (exploratory): localization F1 / recall by score threshold of the four base detectors
(seeds 0 and 1, each center alone) on their own val split and on the other center's train + val.

    python docs/experiments/detector_acquisition/threshold_curves.py   # about 3 min
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from echo_agent.detectors.onnx import OnnxDetector  # noqa: E402
from echo_agent.eval.datasets import load_split  # noqa: E402
from echo_agent.eval.sweep import threshold_sweep  # noqa: E402
from echo_agent.organs import get_organ  # noqa: E402

RUNS = Path("runs/det_acq")
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35)
DIRECTIONS = (("busi", "breast_lesions_usg", "busi"), ("breast_lesions_usg", "busi", "breast"))


def main() -> None:
    organ = get_organ("breast")
    for center, other, stem in DIRECTIONS:
        sets = {"own val": load_split(center, "val"),
                "other center": [im for s in ("train", "val") for im in load_split(other, s)]}
        for seed, suffix in ((0, ""), (1, "_s1")):
            detector = OnnxDetector(RUNS / f"{stem}_base{suffix}.onnx")
            for name, images in sets.items():
                sweep = threshold_sweep(organ, detector, images, THRESHOLDS)
                row = " ".join(f"{t:g}: {sweep[t]['f1']:.3f}/{sweep[t]['recall']:.2f}" for t in THRESHOLDS)
                print(f"{center}-only seed {seed} {name:12s} F1/recall  {row}", flush=True)


if __name__ == "__main__":
    main()
