#!/usr/bin/env python
"""Recalibrate an organ's detector for a new center from a few labelled images of that center.

    python tools/recalibrate_detector.py --organ breast --manifest my_center/calibration.csv --out my_center_breast.onnx
    echo-agent eval my_center/test.csv --out runs/eval/my_center --organ breast --detector my_center_breast.onnx --fusion heuristic

The calibration images (manifest columns as for ``echo-agent eval``; rows with ``split=test`` are
refused: calibrate on images you will not test on) run through the agent's detection path; the
threshold with the best localization F1@0.5 on them is mapped onto the agent's operating threshold
(0.25) by one logit shift of the class scores, written into a copy of the ONNX model (boxes
untouched; the shift and the images' count are recorded in its metadata). The copy has its own
weights version, so the packaged learned fusion refuses it: evaluate with ``--fusion heuristic`` or
refit a fusion for it (``tools/train_policy.py --manifest ... --detector my_center_breast.onnx``).
A few dozen images with lesion boxes are enough to place a threshold; with fewer than 10 it refuses.
See echo_agent/training/recalibrate.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIN_IMAGES = 10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organ", required=True)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="labelled images of the new center (no split=test rows)")
    source.add_argument("--center", help="a staged center, with --split (never test)")
    ap.add_argument("--split", default="val", help="with --center: train, val or train+val")
    ap.add_argument("--weights", type=Path, default=None, help="ONNX detector to recalibrate (default: the organ's packaged one)")
    ap.add_argument("--operating-threshold", type=float, default=0.25)
    ap.add_argument("--out", type=Path, required=True, help="the recalibrated ONNX model (never overwritten)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from echo_agent.detectors import load_detector
    from echo_agent.errors import EchoError
    from echo_agent.organs import get_organ
    from echo_agent.training.recalibrate import (
        choose_threshold,
        localization_by_threshold,
        logit_shift,
        shift_onnx_scores,
    )

    try:
        spec = get_organ(args.organ)
        images = _images(args, ap)
        weights = args.weights or spec.resolve_weights()
        if weights is None or Path(weights).suffix != ".onnx":
            ap.error(f"recalibration rewrites an ONNX model; {weights} is not one")
        if args.out.exists():
            ap.error(f"{args.out} exists; choose another file name")
        det = load_detector(Path(weights), labels=spec.detector_labels)
        print(f"running {det.name} on {len(images)} calibration image(s) of {spec.name}")
        before = localization_by_threshold(spec, det, images)
        t = choose_threshold(before)
        shift = logit_shift(t, args.operating_threshold)
        shift_onnx_scores(weights, args.out, shift, record={
            "threshold": t, "operating_threshold": args.operating_threshold, "n_images": len(images),
            "calibration": str(args.manifest or f"{args.center}:{args.split}"),
            "loc_f1_at_threshold": before[t]["f1"],
        })
        after = localization_by_threshold(spec, load_detector(args.out, labels=spec.detector_labels), images,
                                          thresholds=(args.operating_threshold,))[args.operating_threshold]
    except EchoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    op = min(before, key=lambda x: abs(x - args.operating_threshold))
    print(json.dumps({
        "best_threshold": t, "logit_shift": round(shift, 4), "n_images": len(images),
        "loc_f1_at_operating_threshold_before": before[op]["f1"], "recall_before": before[op]["recall"],
        "loc_f1_at_operating_threshold_after": after["f1"], "recall_after": after["recall"],
        "written": str(args.out),
    }, indent=1))
    return 0


def _images(args: argparse.Namespace, ap: argparse.ArgumentParser) -> list:
    if args.manifest is not None:
        from echo_agent.errors import ManifestError
        from echo_agent.eval.manifest import load_development_rows

        try:
            images = load_development_rows(args.manifest, args.organ, purpose="calibrate")
        except ManifestError as exc:
            ap.error(str(exc))
    else:
        from echo_agent.eval.datasets import load_split

        if "test" in args.split.split("+"):
            ap.error("--split test is refused: calibrate on images you will not test on")
        images = [im for im in load_split(args.center, args.split) if im.organ == args.organ]
    if len(images) < MIN_IMAGES:
        ap.error(f"{len(images)} {args.organ} image(s); recalibration needs at least {MIN_IMAGES}")
    return images


if __name__ == "__main__":
    raise SystemExit(main())
