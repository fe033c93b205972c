#!/usr/bin/env python
"""A second detector consulted where the first finds nothing: the union of two seeds' boxes against
each detector alone at a threshold of matched cost, on the other center's development images.

    python docs/experiments/detector_second_opinion/second_opinion.py --out results/eval/detector_second_opinion/pairs.json

Every image goes once per detector through the agent's detection path (``run_detector``, boxes kept
down to 0.1); the rest is counting (``PREREGISTRATION.md`` in this folder has the rule). Never reads
a test split.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "docs" / "experiments" / "detector_acquisition"))
from cross_center import OTHER  # noqa: E402

SEEDS = {
    "busi": ["runs/det_acq/busi_base.onnx", "runs/det_acq/busi_base_s1.onnx", "runs/det_swa2/busi_base_s2.onnx"],
    "breast_lesions_usg": ["runs/det_acq/breast_base.onnx", "runs/det_acq/breast_base_s1.onnx",
                           "runs/det_swa2/breast_base_s2.onnx"],
}
THRESHOLDS = (0.25, 0.225, 0.2, 0.175, 0.15, 0.125, 0.1)
OPERATING = 0.25


def detections(path: str, images: list, organ) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    """Per image: boxes ``(N, 4)`` and scores ``(N,)`` at >= 0.1 through the agent's detection path."""
    from echo_agent.detectors.onnx import OnnxDetector
    from echo_agent.imaging import load_image
    from echo_agent.tools.toolkit import run_detector

    det = OnnxDetector(REPO / path)
    out = []
    for im in images:
        ds = run_detector(organ, load_image(im.image).array, detector=det, score_threshold=min(THRESHOLDS))
        out.append((np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in ds], float).reshape(-1, 4),
                    np.array([d.score for d in ds], float)))
    return out


def count(images: list, boxes: list[np.ndarray], normal: str) -> dict[str, int]:
    """Lesion images without a box, false boxes (no lesion at IoU >= 0.5), normal images with a box."""
    from echo_agent.detectors.postprocess import box_iou

    no_box = false = normal_boxed = 0
    for im, b in zip(images, boxes, strict=True):
        truth = np.array([[t.x1, t.y1, t.x2, t.y2] for t in im.boxes], float).reshape(-1, 4)
        if im.label == normal:
            normal_boxed += len(b) > 0
        elif len(b) == 0:
            no_box += 1
        false += int((~(box_iou(b, truth) >= 0.5).any(axis=1)).sum())
    return {"lesion_images_without_box": no_box, "false_boxes": false, "normal_images_with_box": normal_boxed}


def union(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], t: float) -> np.ndarray:
    from echo_agent.detectors.postprocess import nms

    boxes = np.concatenate([a[0][a[1] >= t], b[0][b[1] >= t]])
    scores = np.concatenate([a[1][a[1] >= t], b[1][b[1] >= t]])
    return boxes[nms(boxes, scores, 0.5)] if len(boxes) else boxes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from echo_agent.eval.datasets import load_split
    from echo_agent.organs import get_organ

    organ = get_organ("breast")
    t0 = time.monotonic()
    result: dict = {}
    for center, paths in SEEDS.items():
        images = load_split(OTHER[center], "train+val")
        runs = [detections(p, images, organ) for p in paths]
        alone = [{f"{t:g}": count(images, [b[s >= t] for b, s in r], organ.normal_label) for t in THRESHOLDS} for r in runs]
        pairs = []
        for i, j in itertools.combinations(range(len(paths)), 2):
            u = count(images, [union(a, b, OPERATING) for a, b in zip(runs[i], runs[j], strict=True)], organ.normal_label)
            members = []
            for k in (i, j):
                t = next((t for t in THRESHOLDS if alone[k][f"{t:g}"]["false_boxes"] >= u["false_boxes"]), THRESHOLDS[-1])
                members.append({"seed": k, "matched_threshold": t, **alone[k][f"{t:g}"]})
            fewer = all(u["lesion_images_without_box"] < m["lesion_images_without_box"] for m in members)
            pairs.append({"seeds": [i, j], "union_at_0.25": u, "members_at_matched_cost": members,
                          "union_fewer_than_both": fewer})
            print(f"{center}-only seeds {i}+{j}: union no box {u['lesion_images_without_box']}, false "
                  f"{u['false_boxes']}, normal boxed {u['normal_images_with_box']} | "
                  + " | ".join(f"seed {m['seed']} at {m['matched_threshold']:g}: no box {m['lesion_images_without_box']}, "
                               f"false {m['false_boxes']}, normal boxed {m['normal_images_with_box']}" for m in members)
                  + f" -> {'fewer' if fewer else 'not fewer'}", flush=True)
        lesions = sum(im.label != organ.normal_label for im in images)
        result[f"{center}_only"] = {"other_center_images": len(images), "lesion_images": lesions, "detectors": paths,
                                    "alone": alone, "pairs": pairs,
                                    "pairs_where_union_is_fewer": sum(p["union_fewer_than_both"] for p in pairs)}
        for k, a in enumerate(alone):
            print(f"{center}-only seed {k} alone: " + ", ".join(
                f"{t}: {c['lesion_images_without_box']}/{c['false_boxes']}/{c['normal_images_with_box']}" for t, c in a.items())
                  + f"  (no box / false boxes / normal boxed; {lesions} lesion images)", flush=True)
    ok = all(v["pairs_where_union_is_fewer"] >= 2 for v in result.values())
    result["worth_building"] = ok
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(f"worth building (both directions, >= 2 of 3 pairs): {ok}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
