#!/usr/bin/env python
"""Context for the re-check veto at another center (reported, decides nothing): for each single-center
breast detector, the other center's train + val images whose first look (0.25) is empty, and how many of
them the whole-image re-check (test-time augmentation at 0.1, as the embedded policy runs it) gives a
candidate at 0.25 / 0.225 / 0.2 — lesion images (which the re-check veto could keep from a normal
reading) and normal images (which it could no longer read normal).

    python docs/experiments/veto_recheck/foreign_recheck.py > results/eval/veto_recheck/foreign_recheck.txt
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "docs" / "experiments" / "detector_second_opinion"))
from second_opinion import OTHER, SEEDS  # noqa: E402

THRESHOLDS = (0.25, 0.225, 0.2)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from echo_agent.detectors.onnx import OnnxDetector
    from echo_agent.eval.datasets import load_split
    from echo_agent.imaging import load_image
    from echo_agent.organs import get_organ
    from echo_agent.tools.toolkit import run_detector

    organ = get_organ("breast")
    for center, paths in SEEDS.items():
        images = load_split(OTHER[center], "train+val")
        for seed, path in enumerate(paths):
            det = OnnxDetector(REPO / path)
            counts = {kind: {"empty": 0, **{t: 0 for t in THRESHOLDS}} for kind in ("lesion", "normal")}
            for im in images:
                pixels = load_image(im.image).array
                if run_detector(organ, pixels, detector=det, score_threshold=0.25):
                    continue
                kind = "normal" if im.label == organ.normal_label else "lesion"
                counts[kind]["empty"] += 1
                top = max((d.score for d in run_detector(organ, pixels, detector=det, score_threshold=0.1, tta=True)),
                          default=0.0)
                for t in THRESHOLDS:
                    counts[kind][t] += top >= t
            n = {k: sum((im.label == organ.normal_label) == (k == "normal") for im in images) for k in counts}
            print(f"{center}-only seed {seed} on {OTHER[center]} train+val: " + "; ".join(
                f"{k} images {n[k]}, first look empty {c['empty']}, re-check candidate at "
                + " / ".join(f"{t:g}: {c[t]}" for t in THRESHOLDS) for k, c in counts.items()), flush=True)


if __name__ == "__main__":
    main()
