#!/usr/bin/env python
"""Write several second-look region classifiers as one: the mean of their calibrated log-probabilities.

    python tools/pool_classifiers.py probe.onnx segmenter.onnx --output pooled.onnx
    python tools/pool_classifiers.py segmenter.onnx --mirror --output mirrored.onnx

The members must share labels, input size, crop margin and input scaling (they see one crop); each
keeps its own temperature. The pooled file is an ordinary region classifier (point an organ's
``classifier_weights`` or ``--classifier`` at it); a fusion fitted on another classifier's runs steps
aside for it until refitted (``tools/train_policy.py --for-classifier pooled.onnx``).
See ``echo_agent.training.classifier_pool``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("members", nargs="+", type=Path, help="region classifier .onnx files (two or more)")
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--mirror", action="store_true",
                    help="also ask each member about the horizontally mirrored crop (one member: its mirror average)")
    args = ap.parse_args(argv)
    if args.output.resolve() in {m.resolve() for m in args.members}:
        ap.error("--output must not be one of the members (it would be overwritten)")
    missing = [str(m) for m in args.members if not m.is_file()]
    if missing:
        ap.error(f"no such file: {', '.join(missing)}")
    from echo_agent.training.classifier_pool import pool_region_classifiers

    try:
        out = pool_region_classifiers(args.members, args.output, mirror=args.mirror)
    except ValueError as exc:
        ap.error(str(exc))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): the log-linear pool of {len(args.members)} classifiers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
