#!/usr/bin/env python
"""Quantize an organ's ONNX detector or second-look classifier to 8 bits, calibrated on train images.

    python tools/quantize_models.py --organ breast --model detector --out /tmp/q/breast_lite_int8.onnx
    python tools/quantize_models.py --organ breast --model classifier --method percentile --out /tmp/q/breast_cls_int8.onnx
    python tools/quantize_models.py --organ kidney --model classifier --source my_kidney.onnx --out /tmp/q/k.onnx

The source defaults to the organ's packaged model (its fp32 original where the packaged one is
already 8-bit, e.g. kidney's second look). Calibration inputs come from a seeded sample of
``--images`` train-split images of the organ's centers (``--centers``; default: every registered
center of the organ), through the runtime's preprocessing: the detector's letterbox of each image
and its mirror; the classifier's crops of the whole image and of every ground-truth box.
Writes the model and ``<out>.json`` (the report: source digest, method, inputs, sizes, and the
agreement with the source on the calibration inputs). See ``echo_agent.training.quantize``.

Needs the ``train`` extra (``onnx``). The output runs in the light runtime.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from echo_agent.training.quantize import METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--organ", required=True)
    ap.add_argument("--model", required=True, choices=("detector", "classifier"))
    ap.add_argument("--out", required=True, type=Path, help="output .onnx (a <out>.json report is written beside it)")
    ap.add_argument("--source", type=Path, default=None, help="fp32 model (default: the organ's packaged one)")
    ap.add_argument("--method", default="minmax", choices=METHODS, help="calibration method")
    ap.add_argument("--images", type=int, default=128, help="train images to calibrate on (seeded sample)")
    ap.add_argument("--centers", nargs="+", default=None, help="centers (default: every center of the organ)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--op-types", default=None,
                    help="comma-separated operator types to quantize, or 'all' (default: Conv,MatMul,Gemm for a "
                         "detector, all for a classifier)")
    ap.add_argument("--float-first", type=int, default=None,
                    help="keep the first N Conv/MatMul/Gemm nodes in float (default: 0 for a detector, 3 for a classifier)")
    ap.add_argument("--float-last", type=int, default=None,
                    help="keep the last N Conv/MatMul/Gemm nodes in float (default: 0 for a detector, 1 for a classifier)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np

    from echo_agent.detectors.onnx import OnnxDetector
    from echo_agent.detectors.region_classifier import OnnxRegionClassifier
    from echo_agent.eval.datasets import center_organ, list_centers, load_split
    from echo_agent.organs import get_organ
    from echo_agent.training.quantize import (
        classifier_calibration_inputs,
        compute_nodes,
        detector_calibration_inputs,
        fp32_source,
        quantize_onnx,
    )
    from echo_agent.training.region_classifier import prepare_cases

    spec = get_organ(args.organ)
    source = args.source or (spec.resolve_weights() if args.model == "detector" else spec.resolve_classifier_weights())
    if source is None:
        ap.error(f"organ {args.organ!r} has no packaged {args.model}; pass --source")
    if args.source is None:
        source = fp32_source(source)  # a packaged 8-bit model is remade from its fp32 original
    centers = args.centers or [c for c in list_centers() if center_organ(c) == spec.name]
    if not centers:
        ap.error(f"no registered center holds {spec.name!r} images; pass --centers")
    try:
        pool = [im for c in centers for im in load_split(c, "train")]
    except FileNotFoundError as exc:
        ap.error(f"{exc} (stage the data under $ECHO_AGENT_DATA or ../shared/data)")
    if not pool:
        ap.error(f"no train images in {centers}")
    rng = random.Random(args.seed)
    chosen = sorted(rng.sample(pool, min(args.images, len(pool))), key=lambda im: im.key)
    cases = prepare_cases(chosen, spec.image_labels)
    print(f"{len(cases)} train images of {', '.join(centers)} -> calibration inputs", flush=True)

    detector = args.model == "detector"
    if detector:
        inputs = detector_calibration_inputs(OnnxDetector(source), [c.array for c in cases])
    else:
        inputs = classifier_calibration_inputs(OnnxRegionClassifier(source), [(c.array, [None, *c.boxes]) for c in cases])
    op_arg = args.op_types or ("Conv,MatMul,Gemm" if detector else "all")
    op_types = None if op_arg == "all" else [t.strip() for t in op_arg.split(",") if t.strip()]
    first = args.float_first if args.float_first is not None else (0 if detector else 3)
    last = args.float_last if args.float_last is not None else (0 if detector else 1)
    nodes = compute_nodes(source)
    keep = nodes[:first] + (nodes[len(nodes) - last:] if last else [])
    report = quantize_onnx(source, args.out, inputs, method=args.method, op_types=op_types, exclude_nodes=keep,
                           overwrite=args.overwrite).to_dict()

    # How far the quantized network's raw outputs are from the source's on the calibration inputs.
    from echo_agent.detectors.onnx import inference_session

    a, b = (inference_session(Path(p), threads=2) for p in (source, args.out))
    name = a.get_inputs()[0].name
    diffs = [np.abs(a.run(None, {name: x})[0] - b.run(None, {name: x})[0]) for x in inputs[:: max(1, len(inputs) // 64)]]
    report.update(organ=spec.name, model=args.model, centers=centers, images=len(cases), seed=args.seed,
                  calibration_abs_diff_median=float(np.median([d.mean() for d in diffs])),
                  calibration_abs_diff_max=float(max(d.max() for d in diffs)))
    Path(str(args.out) + ".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
