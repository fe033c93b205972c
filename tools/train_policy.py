#!/usr/bin/env python
"""Train the learned evidence fusion of the default reasoner for one organ.

    python tools/train_policy.py --organ breast --centers busi breast_lesions_usg --split val \
        --out echo_agent/assets/fusion/breast.json --runs-cache /tmp/fusion_runs_breast.jsonl

It runs the real agent (embedded policy, packaged detector, captioner, retriever, heuristic
fusion) on the chosen split of each center, keeps each run's typed evidence, compares candidate
fusions (calibrated decision rules, logistic models over nested feature sets and L2 strengths) by
grouped cross-validation, chooses one by a rule fixed in advance, and writes it with its CV table
(see echo_agent/training/fusion_fit.py). For another detector (and second-look classifier):

    python tools/train_policy.py --organ breast --centers busi --split val --detector X.onnx \
        --classifier C.onnx --out Y.json

For your own center (recalibration), fit on a manifest of labelled images the detector never saw
(columns as for ``echo-agent eval``; give ``patient_id`` or ``group`` so the CV keeps a patient's
images together), then use the result with ``echo-agent eval ... --organ breast --fusion Y.json``
(in Python: ``EchoAgent(fusion=LearnedFusion({"breast": load_fusion_params("breast", "Y.json")}))``):

    python tools/train_policy.py --organ breast --manifest my_center/calibration.csv --out Y.json

Use a split the detector was NOT trained on (default: ``val``), so the fusion learns from the
detector's out-of-sample behaviour. The test splits are never read here.

Out-of-fold detector predictions on the **train** split (the issue's recipe; it needs K extra
detector trainings, about 84 min each on a 2-core CPU, which is why the packaged fusions use the val
splits instead): train K cross-fitted detectors, each without one fold of the train split's groups,
then pair every train image with the detector that did not see it:

    for k in 0 1 2; do python tools/train_detector.py configs/detector/breast.yaml --fold $k --folds 3 \
        --work /tmp/cf --output /tmp/cf/breast_fold$k.onnx; done
    python tools/train_policy.py --organ breast --centers busi breast_lesions_usg --split train \
        --cross-fitted /tmp/cf/breast_fold0.onnx /tmp/cf/breast_fold1.onnx /tmp/cf/breast_fold2.onnx \
        --out Y.json

Where a center's val split is too small to choose on (the kidney val split holds 3 hydronephrosis
clips), use the development pool instead: train the fold models on ``train+val``
(``--train-split train+val --fold k --folds K`` on both trainers) and fit with ``--split train+val``
(docs/experiments/kidney_pool/ is the worked example). A pool never includes test.

The fusion is written for the packaged detector (``--for-detector`` to name another, e.g. one you
trained on the whole train split), which the cross-fitted ones stand in for; the runs' own
detectors are kept in ``training.runs_detectors`` and the fold of each group in
``training.cross_fit``. The second-look classifier is cross-fitted the same way
(``tools/train_classifier.py --fold k --folds K``, then ``--cross-fitted-classifiers C0 .. CK-1``,
``--for-classifier`` for another than the packaged one; the runs' own in ``training.runs_classifiers``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from echo_agent.eval.datasets import load_split  # noqa: E402
from echo_agent.fusion import RULE_CALIBRATIONS  # noqa: E402
from echo_agent.training.fusion_fit import (  # noqa: E402
    DEFAULT_FEATURE_SETS,
    FEATURE_SETS,
    NORMAL_VETO_MODES,
    PROB_FEATURE_SETS,
    SELECTION_MODES,
    Candidate,
    RunRecord,
    collect_runs,
    default_candidates,
    fit_fusion,
    load_runs,
    save_runs,
)


def print_selection(training: dict) -> None:
    """The grouped-CV table of the candidates, the choice and any warning."""
    sel = training["selection"]
    print(f"\nn = {training['n']} images in {training['n_groups']} groups, {sel['folds']}-fold grouped CV x "
          f"{len(sel['cv_seeds'])} fold assignments; detector-only CV accuracy {sel['detector_only_cv_accuracy']:.3f}, "
          f"balanced {sel['detector_only_cv_balanced_accuracy']:.3f}")
    print(f"{'candidate':50s} {'feat':>4s} {'log-loss':>15s} {'acc':>6s} {'bal.acc':>7s} {'ECE [95% CI]':>22s}")
    for c in sel["candidates"]:
        ci = c["cv_ece_ci"]
        mark = "<- chosen" if c["chosen"] else ("" if c["eligible"] else "(fails guard)")
        print(f"{c['name']:50s} {c['n_features']:4d} {c['cv_log_loss']:7.3f} ± {c['cv_log_loss_se']:5.3f} "
              f"{c['cv_accuracy']:6.3f} {c['cv_balanced_accuracy']:7.3f} {c['cv_ece']:6.3f} "
              f"[{ci[0]:.3f}, {ci[1]:.3f}] {mark}" if ci else f"{c['name']:50s} ... {mark}")
    print(f"rule ({sel.get('mode', 'simplest')}): {sel['rule']}")
    for w in training.get("warnings") or []:
        print(f"WARNING: {w}")


MIN_RUNS = 10  # fit_fusion's own minimum


def _source(args: argparse.Namespace) -> str:
    return f"manifest {args.manifest}" if args.manifest else f"{args.split} of {', '.join(args.centers)}"


def _images(args: argparse.Namespace, ap: argparse.ArgumentParser) -> list:
    """The images to fit on: a staged split of the given centers, or the rows of --manifest."""
    if args.manifest is None:
        return [im for c in args.centers for im in load_split(c, args.split) if im.organ == args.organ]
    from echo_agent.errors import ManifestError
    from echo_agent.eval.manifest import load_development_rows

    try:
        images = load_development_rows(args.manifest, args.organ, purpose="fit the fusion")
    except ManifestError as exc:
        ap.error(str(exc))
    if not images:
        ap.error(f"{args.manifest} has no {args.organ!r} rows")
    if len(images) < MIN_RUNS:
        ap.error(f"{args.manifest} has {len(images)} {args.organ} image(s); a fusion needs at least {MIN_RUNS} "
                 "(and at least 50 for a learned one)")
    return images


def _agent_with(organ: str, weights: Path | None, classifier: Path | None = None):
    """The default agent (heuristic fusion: the runs feed the fusion being fitted) on other weights."""
    from echo_agent import AgentConfig, EchoAgent

    return EchoAgent.from_config(AgentConfig(
        fusion="heuristic",
        detectors={organ: weights} if weights is not None else {},
        classifiers={organ: classifier} if classifier is not None else {},
    ))


def _cross_fitted_runs(args: argparse.Namespace, images: list, progress) -> list[RunRecord]:
    """Each image run with the cross-fitted detector (and classifier) of its group's fold: the ones
    that did not see it."""
    from echo_agent.eval.splits import cross_fit_fold, cv_group

    k = len(args.cross_fitted or args.cross_fitted_classifiers)
    by_fold: dict[int, list] = {}
    for im in images:
        by_fold.setdefault(cross_fit_fold(cv_group(im), k), []).append(im)
    records: list[RunRecord] = []
    for fold in sorted(by_fold):
        det = args.cross_fitted[fold] if args.cross_fitted else None
        clf = args.cross_fitted_classifiers[fold] if args.cross_fitted_classifiers else None
        print(f"  fold {fold}: {len(by_fold[fold])} images with detector {det or 'packaged'}, classifier {clf or 'packaged'}")
        records += collect_runs(by_fold[fold], agent=_agent_with(args.organ, det, clf), progress=progress)
    order = {im.key: i for i, im in enumerate(images)}
    return sorted(records, key=lambda r: order[r.key])  # the manifest's order, whatever the folds


def _detector_name(organ: str, weights: Path | None) -> str:
    from echo_agent import get_organ
    from echo_agent.detectors import get_detector, load_detector

    det = get_detector(organ) if weights is None else load_detector(weights, labels=get_organ(organ).detector_labels)
    return str(det.name)


def _check_cross_fitted(ap: argparse.ArgumentParser, files: list[Path] | None, for_file: Path | None,
                        flag: str, for_flag: str, what: str) -> None:
    """Refuse fewer than 2 fold models, missing files, and ``for_flag`` without ``flag``."""
    if files is None:
        if for_file is not None:
            ap.error(f"{for_flag} only goes with {flag}")
        return
    if len(files) < 2:
        ap.error(f"{flag} needs at least 2 {what}s (one per fold)")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        ap.error(f"cross-fitted {what}(s) not found: {', '.join(missing)}")


def _classifier_name(organ: str, weights: Path | None) -> str:
    from echo_agent.detectors import get_region_classifier, load_region_classifier

    clf = get_region_classifier(organ) if weights is None else load_region_classifier(weights)
    return str(clf.name)


def _groups_per_fold(records: list[RunRecord], k: int) -> list[int]:
    from echo_agent.eval.splits import cross_fit_fold

    groups = {r.group for r in records}
    return [sum(cross_fit_fold(g, k) == f for g in groups) for f in range(k)]


def cached_or_collected_runs(args: argparse.Namespace, ap: argparse.ArgumentParser,
                             collect: Callable[[list, Callable[[int, int], None]], list[RunRecord]] | None = None,
                             ) -> list[RunRecord]:
    """The runs of ``--runs-cache`` when the file exists; else the agent run on the images the arguments
    name (``collect(images, progress)``; default: the packaged models, or ``--detector`` /
    ``--classifier``), with progress every 25 runs, and written to ``--runs-cache`` when given."""
    if args.runs_cache and args.runs_cache.exists():
        records = load_runs(args.runs_cache)
        print(f"reusing {len(records)} cached runs from {args.runs_cache}")
        return records
    images = _images(args, ap)
    t0 = time.perf_counter()

    def progress(i: int, n: int) -> None:
        if i % 25 == 0 or i == n:
            print(f"  {i}/{n} runs ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"running the agent on {len(images)} {args.organ} images ({_source(args)})")
    if collect is None:
        own = args.detector is not None or args.classifier is not None
        records = collect_runs(images, agent=_agent_with(args.organ, args.detector, args.classifier) if own else None,
                               progress=progress)
    else:
        records = collect(images, progress)
    if args.runs_cache:
        save_runs(records, args.runs_cache)
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organ", required=True)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--centers", nargs="+", help="staged centers (their committed --split)")
    source.add_argument("--manifest", type=Path, default=None,
                        help="a manifest CSV of your own labelled images (rows with split=test are refused)")
    ap.add_argument("--split", default="val", choices=["train", "val", "train+val"],
                    help="never 'test'; train+val (the development pool) goes with cross-fitted models of the "
                         "same pool")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs-cache", type=Path, default=None, help="JSONL of collected runs (reused when present)")
    ap.add_argument("--indeterminate-below", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-images", type=int, default=50,
                    help="below this many images only the calibrated rules are considered")
    ap.add_argument("--min-class-images", type=int, default=1,
                    help="the selection guard's balanced accuracy averages the classes with at least this many "
                         "images (default 1: all); see fit_fusion")
    ap.add_argument("--platt-rules", action="store_true",
                    help="also compare the decision rules with a Platt map of the vote's share instead of a "
                         "temperature: better calibrated where the detector's scores sit near its threshold, "
                         "but a flat map ranks all votes for a label alike (see the fusion model card)")
    ap.add_argument("--feature-sets", nargs="+", choices=FEATURE_SETS, default=list(DEFAULT_FEATURE_SETS),
                    metavar="SET",
                    help="the logistic candidates' feature sets (default: %(default)s; also "
                         f"{', '.join(PROB_FEATURE_SETS)}: the second look's probabilities instead of its "
                         "log-probabilities)")
    ap.add_argument("--candidates", nargs="+", default=None, metavar="NAME",
                    help="compare exactly these candidates, by the names the CV table prints (e.g. "
                         "'logistic[detector+classifier] l2=1', 'detector_rule+temperature'): holds the fusion "
                         "family fixed, e.g. to compare two second looks like for like (the detector-only rule, the "
                         "guard's reference, is always compared too); excludes --feature-sets and --platt-rules")
    ap.add_argument("--normal-veto", choices=NORMAL_VETO_MODES, default="auto",
                    help="a normal reading needs the detector-only rule's agreement: 'auto' (default) adopts it "
                         "unless it costs the chosen fusion more than 1 point of out-of-fold accuracy")
    ap.add_argument("--selection", choices=SELECTION_MODES, default="simplest",
                    help="how to choose among the candidates passing the guard: 'simplest' (default) = the simplest "
                         "within one standard error of the lowest CV log-loss; 'calibrated' = the lowest CV ECE "
                         "among those (see fit_fusion)")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    ap.add_argument("--detector", type=Path, default=None, help="detector weights to use instead of the packaged ones")
    ap.add_argument("--classifier", type=Path, default=None,
                    help="second-look classifier (.onnx) to use instead of the packaged one")
    ap.add_argument("--cross-fitted", type=Path, nargs="+", default=None, metavar="FOLD_ONNX",
                    help="K detectors, the k-th trained without cross-fitting fold k (tools/train_detector.py "
                         "--fold k --folds K): each image runs with the one that did not see it")
    ap.add_argument("--for-detector", type=Path, default=None,
                    help="with --cross-fitted: the weights of the detector the fusion is for (default: packaged)")
    ap.add_argument("--cross-fitted-classifiers", type=Path, nargs="+", default=None, metavar="FOLD_ONNX",
                    help="K second-look classifiers, the k-th trained without fold k (tools/train_classifier.py "
                         "--fold k --folds K); with --cross-fitted, the same K folds")
    ap.add_argument("--for-classifier", type=Path, default=None,
                    help="with --cross-fitted-classifiers: the classifier the fusion is for (default: packaged)")
    args = ap.parse_args()
    if args.out.exists() and not args.force:
        ap.error(f"{args.out} exists; pass --force to overwrite it")
    if args.candidates is None:
        candidates = default_candidates(rule_calibrations=RULE_CALIBRATIONS if args.platt_rules else ("temperature",),
                                        feature_sets=args.feature_sets)
    else:
        if args.platt_rules or args.feature_sets != list(DEFAULT_FEATURE_SETS):
            ap.error("--candidates names the candidates itself; drop --feature-sets / --platt-rules")
        try:
            candidates = [Candidate.from_name(n) for n in args.candidates]
        except ValueError as exc:
            ap.error(str(exc))
    _check_cross_fitted(ap, args.cross_fitted, args.for_detector, "--cross-fitted", "--for-detector", "detector")
    _check_cross_fitted(ap, args.cross_fitted_classifiers, args.for_classifier, "--cross-fitted-classifiers",
                        "--for-classifier", "classifier")
    if args.cross_fitted is not None and args.detector is not None:
        ap.error("--detector and --cross-fitted exclude each other (use --for-detector)")
    if args.cross_fitted_classifiers is not None and args.classifier is not None:
        ap.error("--classifier and --cross-fitted-classifiers exclude each other (use --for-classifier)")
    if args.classifier is not None and not args.classifier.is_file():
        ap.error(f"classifier not found: {args.classifier}")
    if args.cross_fitted and args.cross_fitted_classifiers and len(args.cross_fitted) != len(args.cross_fitted_classifiers):
        ap.error("--cross-fitted and --cross-fitted-classifiers must have one file per fold each (same K)")

    if args.cross_fitted is not None or args.cross_fitted_classifiers is not None:
        records = cached_or_collected_runs(args, ap, lambda images, progress: _cross_fitted_runs(args, images, progress))
    else:
        records = cached_or_collected_runs(args, ap)
    notes = {"centers": args.centers, "split": None if args.manifest else args.split,
             "manifest": str(args.manifest) if args.manifest else None,
             "command": "python tools/train_policy.py " + " ".join(sys.argv[1:])}
    for_detectors = None
    if args.cross_fitted is not None:
        k = len(args.cross_fitted)
        for_detectors = [_detector_name(args.organ, args.for_detector)]
        notes["cross_fit"] = {"folds": k, "detectors": [str(p) for p in args.cross_fitted],
                              "groups_per_fold": _groups_per_fold(records, k)}
    for_classifiers = None
    if args.cross_fitted_classifiers is not None:
        k = len(args.cross_fitted_classifiers)
        for_classifiers = [_classifier_name(args.organ, args.for_classifier)]
        notes["cross_fit_classifiers"] = {"folds": k, "classifiers": [str(p) for p in args.cross_fitted_classifiers],
                                          "groups_per_fold": _groups_per_fold(records, k)}
    try:
        params = fit_fusion(
            records, organ=args.organ, seed=args.seed, indeterminate_below=args.indeterminate_below,
            min_images=args.min_images, notes=notes, for_detectors=for_detectors, for_classifiers=for_classifiers,
            candidates=candidates,
            min_class_images=args.min_class_images, normal_veto=args.normal_veto, selection=args.selection,
        )
    except ValueError as exc:  # e.g. too few runs of the organ
        ap.error(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(params.to_json() + "\n")
    print_selection(params.training)
    veto = params.training["normal_veto"]
    if "without" in veto:
        print(f"normal veto ({veto['mode']}): {'adopted' if veto['adopted'] else 'not adopted'}; out-of-fold accuracy "
              f"{veto['without']['oof_accuracy']:.3f} -> {veto['with']['oof_accuracy']:.3f}, lesions read normal "
              f"{veto['without']['lesions_read_normal']:g} -> {veto['with']['lesions_read_normal']:g} of {veto['n_lesions']}")
    print(f"wrote {args.out} ({params.training['chosen']}, temperature {params.temperature:.3f}, "
          f"{len(params.feature_names)} features, n={params.training['n']})")
    made_for = [*(params.training.get("detectors") or []), *(params.training.get("classifiers") or [])]
    if made_for:
        print(f"it is for {', '.join(made_for)}: in a run with other weights (a file replaced after this fit) "
              "the agent falls back to the transparent fusion with a warning; refit with --for-detector / "
              "--for-classifier naming the files you ship")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
