#!/usr/bin/env python
"""Detector-only numbers of single-center breast detectors on their own val split and on the other
center's development images (train + val; never a test split), at the agent's operating threshold.

    python docs/experiments/detector_acquisition/cross_center.py \
        --busi-only base=runs/det_acq/busi_base.onnx acq=runs/det_acq/busi_acq.onnx \
        --breast-only base=runs/det_acq/breast_base.onnx acq=runs/det_acq/breast_acq.onnx \
        --out results/eval/detector_acquisition/cross_center.json

Each image goes through the agent's detection path (``echo_agent.eval.sweep.threshold_sweep``:
preprocessing, boxes mapped back to the original pixels, the organ's class merging). Reported per
detector and image set: localization F1@0.5 / precision / recall at 0.25, lesion images with no box
at 0.25, and the same F1 at 0.1 (where the agent's re-check looks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

OTHER = {"busi": "breast_lesions_usg", "breast_lesions_usg": "busi"}


def _named(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"expected NAME=PATH, got {item!r}")
        out[name] = Path(path)
    return out


def measure(detector_path: Path, images: list, organ, wrap=None) -> dict:  # noqa: ANN001 - manifest rows, OrganSpec, callable
    """``wrap(detector)``, when given, returns the detector actually measured (e.g. one that changes its input)."""
    from echo_agent.detectors.onnx import OnnxDetector
    from echo_agent.eval.sweep import threshold_sweep
    from echo_agent.imaging import load_image
    from echo_agent.tools.toolkit import run_detector

    det = OnnxDetector(detector_path)  # one instance: the second pass below is answered from its output cache
    if wrap is not None:
        det = wrap(det)
    sweep = threshold_sweep(organ, det, images, (0.1, 0.25))
    lesions = [im for im in images if im.label != organ.normal_label]
    # lesion images the detector alone reads normal: no box at the operating threshold
    no_box = sum(not run_detector(organ, load_image(im.image).array, detector=det, score_threshold=0.25) for im in lesions)
    return {"n_images": len(images), "n_lesion_images": len(lesions), "lesion_images_without_box": no_box,
            **{f"at_{t:g}": {k: (None if v is None else round(float(v), 4)) for k, v in m.items()}
               for t, m in sweep.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--busi-only", nargs="+", default=[], metavar="NAME=ONNX")
    ap.add_argument("--breast-only", nargs="+", default=[], metavar="NAME=ONNX")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from echo_agent.eval.datasets import load_split
    from echo_agent.organs import get_organ

    organ = get_organ("breast")
    t0 = time.monotonic()
    result: dict = {}
    for center, arms in (("busi", _named(args.busi_only)), ("breast_lesions_usg", _named(args.breast_only))):
        own = load_split(center, "val")
        other = load_split(OTHER[center], "train+val")
        for name, path in arms.items():
            key = f"{center}_only/{name}"
            result[key] = {"detector": str(path), "own_val": measure(path, own, organ),
                           "other_center_train_val": measure(path, other, organ)}
            o, x = result[key]["own_val"]["at_0.25"], result[key]["other_center_train_val"]["at_0.25"]
            print(f"{key:32s} own val F1 {o['f1']:.3f} (R {o['recall']:.3f})  other center F1 {x['f1']:.3f} "
                  f"(R {x['recall']:.3f}, P {x['precision']:.3f}), lesion images without a box "
                  f"{result[key]['other_center_train_val']['lesion_images_without_box']}"
                  f"/{result[key]['other_center_train_val']['n_lesion_images']}", flush=True)
    result["seconds"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
