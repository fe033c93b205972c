#!/usr/bin/env python
"""Exploratory: the packaged breast detector on the pooled val split and the BUSI-only seeds on BUSI
val, by threshold: lesion images without a box / false boxes / normal images with a box.

    python docs/experiments/detector_second_opinion/val_normals.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import second_opinion as so  # noqa: E402


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from echo_agent.eval.datasets import load_split
    from echo_agent.organs import get_organ

    organ = get_organ("breast")
    val = {c: load_split(c, "val") for c in ("busi", "breast_lesions_usg")}
    sets = [("packaged", "echo_agent/assets/weights/breast_lite.onnx", val["busi"] + val["breast_lesions_usg"])]
    sets += [(f"busi-only seed {k}", p, val["busi"]) for k, p in enumerate(so.SEEDS["busi"])]
    for name, path, images in sets:
        runs = so.detections(path, images, organ)
        counts = [so.count(images, [b[s >= t] for b, s in runs], organ.normal_label) for t in so.THRESHOLDS[:4]]
        normals = sum(im.label == organ.normal_label for im in images)
        print(f"{name}: {len(images)} images, {normals} normal; " + ", ".join(
            f"{t:g}: {c['lesion_images_without_box']}/{c['false_boxes']}/{c['normal_images_with_box']}"
            for t, c in zip(so.THRESHOLDS, counts)) + "  (no box / false boxes / normal boxed)")


if __name__ == "__main__":
    main()
