#!/usr/bin/env python
"""Evaluate a second-look region classifier alone, on ground-truth lesion boxes and whole images.

    python tools/eval_classifier.py --center breast_lesions_usg --split test                       # packaged
    python tools/eval_classifier.py --center breast_lesions_usg --split test --classifier /tmp/xc/busi_cls.onnx

Every image goes through the detector's preprocessing (as in the agent); each ground-truth lesion
box and the whole field of view are classified. Printed: the positive-vs-other-lesion AUC on lesion
boxes and on whole images (breast: malignant vs benign; images with a lesion label), the
lesion-vs-normal AUC on whole images where the split has normal images, and accuracies, with the
number of images. For an organ with a category head (``category_source: classifier``, e.g. thyroid
TI-RADS) the classifier's category probabilities are summed into the image labels
(``OrganSpec.split_classifier_output``) for the numbers above, and the median category
(``OrganSpec.category_from_distribution``) is compared with the reader's on lesion boxes and on whole
lesion images: exact and within-one-step agreement. Light runtime only (ONNX Runtime); ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def evaluate(classifier, images, organ) -> dict:  # noqa: ANN001 - library objects
    """The classifier's numbers on manifest images (see the module docstring)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from echo_agent.training.region_classifier import prepare_cases  # no torch needed for this part

    pos, normal = organ.positive_label, organ.normal_label
    labels = list(organ.image_labels)
    head = organ.category_source == "classifier"
    lesion_rows, whole_rows = [], []
    cat_rows: dict[str, list[tuple[str | None, str | None]]] = {"lesion": [], "whole": []}
    for case in prepare_cases(images, labels):
        probs = classifier.classify(case.array, [None, *case.boxes])
        if head:  # category head: image-label probabilities and the category given a lesion
            split = [organ.split_classifier_output(p) for p in probs]
            probs = [lbl for lbl, _ in split]
            if labels[case.label] != normal:
                for kind, (_, cats) in zip(["whole"] + ["lesion"] * len(case.boxes), split, strict=True):
                    cat_rows[kind].append((case.category, organ.category_from_distribution(cats) if cats else None))
        whole_rows.append((labels[case.label], probs[0]))
        lesion_rows += [(labels[case.label], p) for p in probs[1:]]

    def auc(rows, positive, negatives) -> tuple[float | None, int]:
        keep = [(lbl, p) for lbl, p in rows if lbl == positive or lbl in negatives]
        y = [int(lbl == positive) for lbl, _ in keep]
        if not keep or len(set(y)) < 2:
            return None, len(keep)
        return float(roc_auc_score(y, [p[positive] for _, p in keep])), len(keep)

    others = [lbl for lbl in organ.lesion_labels if lbl != pos]
    out: dict = {"n_images": len(images), "n_lesion_boxes": len(lesion_rows)}
    if others:  # breast: malignant vs benign
        out["auc_lesion_boxes"], out["n_auc_lesion_boxes"] = auc(lesion_rows, pos, others)
        out["auc_whole_lesion_images"], out["n_auc_whole"] = auc([r for r in whole_rows if r[0] != normal], pos, others)
    lesion_vs_normal = [("lesion" if lbl != normal else normal, {"lesion": 1 - p[normal], normal: p[normal]})
                        for lbl, p in whole_rows]
    out["auc_whole_lesion_vs_normal"], out["n_auc_presence"] = auc(lesion_vs_normal, "lesion", [normal])
    out["acc_whole"] = float(np.mean([max(p, key=p.get) == lbl for lbl, p in whole_rows])) if whole_rows else None
    out["acc_lesion_boxes"] = float(np.mean([max(p, key=p.get) == lbl for lbl, p in lesion_rows])) if lesion_rows else None
    lesion_whole = [p for lbl, p in whole_rows if lbl != normal]
    out["lesion_images_called_normal"] = (float(np.mean([max(p, key=p.get) == normal for p in lesion_whole]))
                                          if lesion_whole else None)
    if head:
        from echo_agent.eval.metrics import category_agreement

        order = [b.name for b in organ.categories]
        for kind, rows in cat_rows.items():
            a = category_agreement([t for t, _ in rows], [c for _, c in rows], order)
            out[f"category_exact_{kind}"], out[f"category_within_one_{kind}"], out[f"n_category_{kind}"] = (
                a.exact, a.within_one, a.n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--center", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--classifier", type=Path, default=None, help="an .onnx classifier (default: the organ's packaged one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from echo_agent.detectors import get_region_classifier, load_region_classifier
    from echo_agent.eval.datasets import center_organ, load_split
    from echo_agent.organs import get_organ

    organ = get_organ(center_organ(args.center))
    clf = load_region_classifier(args.classifier) if args.classifier else get_region_classifier(organ)
    if tuple(clf.labels) != organ.classifier_labels:
        ap.error(f"the classifier's labels {clf.labels} are not the {organ.name} classifier labels {organ.classifier_labels}")
    res = {"center": args.center, "split": args.split, "classifier": clf.name,
           **evaluate(clf, load_split(args.center, args.split), organ)}
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
