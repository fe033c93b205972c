#!/usr/bin/env python
"""Single-center breast detectors with every image put on its training center's brightness
(PREREGISTRATION.md in this folder).

    python docs/experiments/detector_intensity_norm/intensity_probe.py \
        --busi-only s0=runs/det_acq/busi_base.onnx s1=runs/det_acq/busi_base_s1.onnx s2=runs/det_swa2/busi_base_s2.onnx \
        --breast-only s0=runs/det_acq/breast_base.onnx s1=runs/det_acq/breast_base_s1.onnx s2=runs/det_swa2/breast_base_s2.onnx \
        --out results/eval/detector_intensity_norm

Arms: plain, and matched (the prepared image times ``T / p99``; ``p99`` the image's 99th-percentile
grey level over its non-zero pixels, i.e. inside the field of view the preprocessing keeps; ``T``
the median of that over the training center's train split). Numbers by
``../detector_acquisition/cross_center.py:measure``; the reading of PREREGISTRATION.md is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "detector_acquisition"))
sys.path.insert(0, str(HERE.parents[2]))

from cross_center import OTHER, _named, measure  # noqa: E402


def p99(image: np.ndarray) -> float:
    g = image[..., 0] if image.ndim == 3 else image
    inside = g[g > 0]
    return float(np.percentile(inside, 99)) if inside.size else 0.0


def matched(image: np.ndarray, target: float) -> np.ndarray:
    level = p99(image)
    if level <= 0:
        return image
    return np.clip(image.astype(np.float32) * (target / level), 0, 255).astype(np.uint8)


class Matched:
    """A detector whose input image is first put on a brightness level (``matched``)."""

    def __init__(self, inner, target: float) -> None:  # noqa: ANN001 - a Detector
        self._inner, self._target = inner, target

    def detect(self, image: np.ndarray, **kw):  # noqa: ANN003, ANN201 - the Detector protocol's
        return self._inner.detect(matched(image, self._target), **kw)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._inner, name)


def train_level(center: str) -> float:
    from echo_agent.eval.datasets import load_split
    from echo_agent.imaging import load_image
    from echo_agent.imaging.preprocess import prepare_for_detection

    return float(np.median([p99(prepare_for_detection(load_image(im.image).array).array)
                            for im in load_split(center, "train")]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--busi-only", nargs="+", required=True, metavar="NAME=ONNX")
    ap.add_argument("--breast-only", nargs="+", required=True, metavar="NAME=ONNX")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from echo_agent.eval.datasets import load_split
    from echo_agent.organs import get_organ

    organ = get_organ("breast")
    t0 = time.monotonic()
    result: dict = {"levels": {}, "runs": {}}
    lines = []
    for center, arms in (("busi", _named(args.busi_only)), ("breast_lesions_usg", _named(args.breast_only))):
        level = train_level(center)
        result["levels"][center] = level
        lines.append(f"{center}: train-split median p99 {level:.1f}")
        own = load_split(center, "val")
        other = load_split(OTHER[center], "train+val")
        for name, path in arms.items():
            for arm, wrap in (("plain", None), ("matched", lambda d, t=level: Matched(d, t))):
                key = f"{center}_only/{name}/{arm}"
                r = {"own_val": measure(path, own, organ, wrap), "other": measure(path, other, organ, wrap)}
                result["runs"][key] = r
                o, x = r["own_val"]["at_0.25"], r["other"]["at_0.25"]
                lines.append(f"{key:36s} own val F1 {o['f1']:.3f}  other F1 {x['f1']:.3f} (R {x['recall']:.3f}, "
                             f"P {x['precision']:.3f}), lesion images without a box "
                             f"{r['other']['lesion_images_without_box']}/{r['other']['n_lesion_images']}")
                print(lines[-1], flush=True)
    # the reading fixed in PREREGISTRATION.md
    fewer, ok = 0, True
    for center, arms in (("busi", _named(args.busi_only)), ("breast_lesions_usg", _named(args.breast_only))):
        d_other, d_own = [], []
        for name in arms:
            p, m = result["runs"][f"{center}_only/{name}/plain"], result["runs"][f"{center}_only/{name}/matched"]
            fewer += m["other"]["lesion_images_without_box"] < p["other"]["lesion_images_without_box"]
            d_other.append(m["other"]["at_0.25"]["f1"] - p["other"]["at_0.25"]["f1"])
            d_own.append(m["own_val"]["at_0.25"]["f1"] - p["own_val"]["at_0.25"]["f1"])
        lines.append(f"{center}-only: other-center F1 change {np.mean(d_other):+.3f} (each {', '.join(f'{v:+.3f}' for v in d_other)}), "
                     f"own val F1 change {np.mean(d_own):+.3f}")
        ok &= np.mean(d_other) >= 0.02 and np.mean(d_own) >= -0.01
    ok &= fewer >= 5
    lines.append(f"runs with fewer foreign lesions without a box: {fewer} of 6")
    lines.append("reading: " + ("brightness is a cause worth a training-time experiment" if ok
                                else "brightness ruled out as the cause of the foreign misses at this scale"))
    print("\n".join(lines[-4:]))
    result["seconds"] = round(time.monotonic() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "intensity_probe.txt").write_text("\n".join(lines) + "\n")
    (args.out / "intensity_probe.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
