"""Out-of-fold runs with another second look's answers spliced in (PREREGISTRATION.md in this folder).

    python docs/experiments/kidney_seg_crops/splice.py RUNS.jsonl "FOLD{k}.onnx" --out SPLICED.jsonl [--expect-stem STEM]

Every classified region of every run gets the probabilities of the image's fold model (``{k}`` = its
cross-fitting fold of ``--folds``) for that region, computed as the classify tool computes them
(``echo_agent.tools.toolkit.run_classifier`` on the frame); the classifier name is replaced. Prints the
largest change of a probability, and the whole-frame AUC out of fold before and after, overall and by
given fold. ``--expect-stem`` checks that each run's recorded classifier was the fold model the
image's fold names (``STEM{k}``): the check that the splice picks the right fold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("pattern", help="fold model path with {k}")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--expect-stem", default=None)
    args = ap.parse_args()
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from echo_agent.detectors import OnnxRegionClassifier
    from echo_agent.eval.datasets import load_split
    from echo_agent.eval.splits import cross_fit_fold, cv_group
    from echo_agent.organs import get_organ
    from echo_agent.schemas import Box
    from echo_agent.tools.toolkit import run_classifier

    runs = [json.loads(x) for x in args.runs.read_text().splitlines() if x.strip()]
    centers = sorted({r["key"].split(":", 1)[0] for r in runs})
    images = {im.key: im for c in centers for im in load_split(c, "train+val")}
    models: dict[int, OnnxRegionClassifier] = {}
    worst, before, after, truth, folds, out = 0.0, [], [], [], [], []
    for r in runs:
        im = images[r["key"]]
        k = cross_fit_fold(cv_group(im), args.folds)
        clf = models.setdefault(k, OnnxRegionClassifier(args.pattern.format(k=k)))
        organ = get_organ(r["organ"])
        with Image.open(im.image) as pil:
            frame = np.asarray(pil.convert("RGB"))
        for e in r["evidence"]:
            if e["kind"] != "classification":
                continue
            if args.expect_stem and e["classifier"].split(":", 1)[1].split("@")[0] != f"{args.expect_stem}{k}":
                raise SystemExit(f"{r['key']}: recorded {e['classifier']}, its fold is {k}")
            boxes = [Box(**g["box"]) if g["box"] else None for g in e["regions"]]
            new = run_classifier(organ, frame, boxes, classifier=clf)
            for g, p in zip(e["regions"], new, strict=True):
                worst = max(worst, max(abs(p[lb] - g["probabilities"][lb]) for lb in p))
                if g["box"] is None:
                    before.append(1.0 - g["probabilities"][organ.normal_label])
                    after.append(1.0 - p[organ.normal_label])
                g["probabilities"] = p
            e["classifier"] = clf.name
        truth.append(r["label"] != "normal")
        folds.append(r["key"].split(":", 1)[1].split("/", 1)[0])
        out.append(json.dumps(r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out) + "\n")
    print(f"{len(runs)} runs; largest change of a probability {worst:.2e}")
    y, f = np.array(truth), np.array(folds)
    for name, p in (("recorded", np.array(before)), ("spliced", np.array(after))):
        by = {g: round(float(roc_auc_score(y[f == g], p[f == g])), 4) for g in sorted(set(folds))}
        print(f"{name}: whole-frame AUC out of fold {roc_auc_score(y, p):.4f}; by given fold {by}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
