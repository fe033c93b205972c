#!/usr/bin/env python
"""Refit only the temperature of a fitted fusion on labelled images, run with the models it is used with.

    python tools/recalibrate_fusion.py --organ breast --centers busi breast_lesions_usg --split val \
        --out runs/breast_recalibrated.json --runs-cache runs/runs_breast_val.jsonl

    python tools/recalibrate_fusion.py --organ breast --manifest my_center/calibration.csv --out mine.json

A fusion's weights come from many runs (``tools/train_policy.py``); its probabilities' scale depends
on the models and the images it meets. This keeps the weights and refits the one temperature on a
few dozen labelled images (``echo_agent.training.fusion_fit.recalibrate_temperature``): your own
center's, or the shipped models' own val runs when the fusion was fitted on fold models' runs. It
prints NLL, accuracy and ECE of the agent's probabilities before and after, and a grouped 3-fold
estimate of the refit against the file's temperature (fitting and scoring on the same images flatters
the refit; the folds do not). Use the result with ``echo-agent eval ... --fusion OUT`` or
``load_fusion_params(organ, OUT)``. Never on test images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organ", required=True)
    ap.add_argument("--fusion", type=Path, default=None, help="the fusion file to recalibrate (default: the packaged one)")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--centers", nargs="+", help="staged centers (their committed --split)")
    source.add_argument("--manifest", type=Path, default=None,
                        help="a manifest CSV of your own labelled images (rows with split=test are refused)")
    ap.add_argument("--split", default="val", choices=["train", "val", "train+val"], help="never 'test'")
    ap.add_argument("--detector", type=Path, default=None, help="detector weights the fusion is used with (default: packaged)")
    ap.add_argument("--classifier", type=Path, default=None, help="second-look classifier the fusion is used with")
    ap.add_argument("--retarget", action="store_true",
                    help="the fusion was fitted for other weights of the same recipe: use its weights with --detector / "
                         "--classifier (a retrained model) and refit the temperature on their runs; without it such "
                         "runs are refused, as the fusion would step aside on them")
    ap.add_argument("--folds", type=int, default=3, help="grouped folds of the cross-validated estimate")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--runs-cache", type=Path, default=None, help="reuse / write the agent's runs here (JSONL)")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.force:
        ap.error(f"{args.out} exists; pass --force to replace it")
    if args.folds < 2:
        ap.error("--folds must be at least 2")
    if args.retarget and args.detector is None and args.classifier is None:
        ap.error("--retarget needs --detector and/or --classifier: the retrained weights the fusion is to be used with")
    from train_policy import _classifier_name, _detector_name, _source, cached_or_collected_runs

    from echo_agent.errors import ModelLoadError
    from echo_agent.fusion import load_fusion_params
    from echo_agent.training.fusion_fit import recalibrate_temperature, retarget

    try:
        params = load_fusion_params(args.organ, None if args.fusion is None else str(args.fusion))
    except (ModelLoadError, FileNotFoundError) as exc:
        ap.error(str(exc))
    if params is None:
        ap.error(f"no packaged fusion for {args.organ!r}; give --fusion")
    if args.retarget:
        params = retarget(params, detectors=[_detector_name(args.organ, args.detector)] if args.detector else None,
                          classifiers=[_classifier_name(args.organ, args.classifier)] if args.classifier else None)
        for key, moved in params.training["retargeted"].items():
            print(f"retargeted {key}: {', '.join(moved['from']) or '(none)'} -> {', '.join(moved['to'])}")
    records = cached_or_collected_runs(args, ap)
    notes = {"source": _source(args), "command": "python tools/recalibrate_fusion.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    try:
        new, report = recalibrate_temperature(params, records, folds=args.folds, notes=notes)
    except ValueError as exc:
        ap.error(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(new.to_json() + "\n")
    b, a, cv = report["before"], report["after"], report["cv"]
    print(f"{report['n']} runs in {report['groups']} groups; temperature {report['temperature_before']:.3f} -> "
          f"{report['temperature']:.3f}")
    print(f"  on these runs: NLL {b['nll']:.4f} -> {a['nll']:.4f}, ECE {b['ece']:.4f} -> {a['ece']:.4f}, "
          f"accuracy {b['accuracy']:.4f} -> {a['accuracy']:.4f}")
    print(f"  grouped {cv['folds']}-fold: NLL {cv['current']['nll']:.4f} -> {cv['refit']['nll']:.4f}, "
          f"ECE {cv['current']['ece']:.4f} -> {cv['refit']['ece']:.4f} "
          f"({'better' if report['better_in_cv'] else 'not better'} in cross-validation)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
