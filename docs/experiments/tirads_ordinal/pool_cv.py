"""Pool cross-validation of TI-RADS category heads (PREREGISTRATION.md in this folder).

    python docs/experiments/tirads_ordinal/pool_cv.py --out runs/tirads_ordinal

Needs the train extra, scikit-learn, the thyroid plug-in and DDTI staged by
``python tools/prepare_data.py --centers ddti``. Writes ``features.npz`` (cached) and ``cv.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "plugins" / "echo-organ-thyroid" / "configs" / "classifier.yaml"
FOLDS = 5
CS = (0.003, 0.01, 0.03, 0.1)


def extract(out: Path, passes: int = 3) -> dict[str, np.ndarray]:
    """Features of the probe's training crops (per pass) and of each image's plain nodule boxes."""
    cache = out / "features.npz"
    if cache.exists():
        return dict(np.load(cache, allow_pickle=False))
    from echo_agent.eval.datasets import load_split
    from echo_agent.eval.splits import cross_fit_fold
    from echo_agent.training.linear_probe import Lite0Features
    from echo_agent.training.region_classifier import (
        ClassifierTrainConfig,
        build_samples,
        category_head_images,
        prepare_cases,
    )

    cfg = ClassifierTrainConfig.from_yaml(CONFIG)
    images = [im for c in cfg.centers for split in (cfg.train_split, cfg.val_split) for im in load_split(c, split)]
    images, left = category_head_images(images, cfg.labels)
    cases = prepare_cases(images, cfg.labels, category_head=True)
    print(f"{len(cases)} categorised images in the pool ({len(left)} without a category left out)", flush=True)
    feats = Lite0Features(input_size=cfg.input_size, threads=cfg.threads)
    rng, arng = random.Random(cfg.seed), random.Random(cfg.seed + 1)
    xs, ys, case_of, kinds = [], [], [], []
    for k in range(passes):
        s = build_samples(cases, rng, normal_index=0, background_per_image=cfg.background_per_image,
                          background_shrink=cfg.background_shrink)
        xs.append(feats.of_samples(cases, s, cfg.margin, arng if k else None))
        ys += [x[2] for x in s]
        case_of += [x[0] for x in s]
        kinds += [x[3] for x in s]
    plain = [(i, b, c.label, "lesion") for i, c in enumerate(cases) for b in c.boxes]
    data = {
        "x": np.concatenate(xs), "y": np.asarray(ys), "case": np.asarray(case_of), "kind": np.asarray(kinds),
        "x_eval": feats.of_samples(cases, plain, cfg.margin), "y_eval": np.asarray([p[2] for p in plain]),
        "case_eval": np.asarray([p[0] for p in plain]),
        "fold": np.asarray([cross_fit_fold(c.group, FOLDS) for c in cases]),
    }
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


def multinomial(x, y, xe, c, balanced):  # noqa: ANN001, ANN201 - numpy in, numpy out
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if balanced else None).fit(x, y)
    p = np.zeros((len(xe), 7))
    p[:, m.classes_] = m.predict_proba(xe)
    return p


def ordinal(x, y, xe, c):  # noqa: ANN001, ANN201
    from sklearn.linear_model import LogisticRegression

    cat = y >= 1
    gt = np.ones((len(xe), 6))  # gt[:, k] = P(category index > k - 1); column 0 is 1
    for k in range(1, 6):
        t = (y[cat] - 1) >= k
        gt[:, k] = LogisticRegression(C=c, max_iter=5000).fit(x[cat], t).predict_proba(xe)[:, 1]
    gt = np.minimum.accumulate(gt, axis=1)
    probs = gt - np.concatenate([gt[:, 1:], np.zeros((len(xe), 1))], axis=1)
    pn = LogisticRegression(C=0.01, max_iter=5000, class_weight="balanced").fit(x, ~cat).predict_proba(xe)[:, 1]
    return np.concatenate([pn[:, None], (1 - pn)[:, None] * probs], axis=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "tirads_ordinal")
    args = ap.parse_args()
    from echo_agent.eval.metrics import category_agreement
    from echo_agent.training.region_classifier import median_categories

    labels = ["normal", "2", "3", "4a", "4b", "4c", "5"]
    t0 = time.monotonic()
    d = extract(args.out)
    print(f"features: {d['x'].shape} train crops, {d['x_eval'].shape} eval boxes, {time.monotonic() - t0:.0f} s", flush=True)
    fold_of_sample, fold_of_eval = d["fold"][d["case"]], d["fold"][d["case_eval"]]
    results = []
    for family in ("A", "B", "C"):
        for c in CS:
            pred = np.zeros(len(d["y_eval"]), dtype=int)
            for f in range(FOLDS):
                tr, te = fold_of_sample != f, fold_of_eval == f
                mean, scale = d["x"][tr].mean(0), d["x"][tr].std(0) + 1e-6
                x, xe = (d["x"][tr] - mean) / scale, (d["x_eval"][te] - mean) / scale
                p = (multinomial(x, d["y"][tr], xe, c, balanced=family == "A") if family != "C"
                     else ordinal(x, d["y"][tr], xe, c))
                pred[te] = median_categories(p)
            a = category_agreement([labels[i] for i in d["y_eval"]], [labels[i] for i in pred], labels[1:])
            counts = {lbl: int((pred == i).sum()) for i, lbl in enumerate(labels) if i}
            row = {"family": family, "C": c, "exact": a.exact, "within_one": a.within_one, "S": a.exact + a.within_one,
                   "n": a.n, "predicted": counts}
            results.append(row)
            print(json.dumps(row), flush=True)
    y = d["y_eval"]
    base = []
    for f in range(FOLDS):  # majority category of the other folds' plain boxes
        tr = fold_of_eval != f
        base.append(np.full(int((fold_of_eval == f).sum()), np.bincount(y[tr], minlength=7)[1:].argmax() + 1))
    pred = np.zeros(len(y), dtype=int)
    for f, b in zip(range(FOLDS), base, strict=True):
        pred[fold_of_eval == f] = b
    a = category_agreement([labels[i] for i in y], [labels[i] for i in pred], labels[1:])
    majority = {"exact": a.exact, "within_one": a.within_one, "S": a.exact + a.within_one}
    order = {"A": 0, "B": 1, "C": 2}
    best_s = max(r["S"] for r in results)
    chosen = min((r for r in results if r["S"] >= best_s - 0.005), key=lambda r: (order[r["family"]], r["C"]))
    best_a = max(r["S"] for r in results if r["family"] == "A")
    decision = {"chosen": chosen, "best_A_S": best_a, "adopt": chosen["family"] != "A" and chosen["S"] >= best_a + 0.05,
                "majority_baseline": majority, "n_eval_boxes": int(len(y)),
                "categories_in_pool": {labels[i]: int((y == i).sum()) for i in range(1, 7)}}
    print(json.dumps(decision, indent=1))
    (args.out / "cv.json").write_text(json.dumps({"results": results, "decision": decision,
                                                  "command": " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
