"""Pool cross-validation of BI-RADS category heads against the ACR bands of a malignancy probe
(PREREGISTRATION.md in this folder).

    python docs/experiments/birads_head/pool_cv.py --out runs/birads_head

Reuses the TI-RADS experiment's feature extraction and heads (docs/experiments/tirads_ordinal/pool_cv.py)
with this folder's categories.yaml. Needs the train extra, scikit-learn, and BrEaST-Lesions_USG + BUSI
staged by ``python tools/prepare_data.py``. Writes features (cached), ``cv.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def _tirads_module():  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location("tirads_pool_cv", REPO / "docs/experiments/tirads_ordinal/pool_cv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.CONFIG = HERE / "categories.yaml"
    return mod


def malignancy_pool(out: Path, passes: int = 3) -> dict[str, np.ndarray]:
    """BUSI train + val lesion crops (plain, then augmented) with benign (0) / malignant (1) targets,
    and the benign/malignant target of each BrEaST pool image, for the reference probe."""
    cache = out / "malignancy.npz"
    if cache.exists():
        return dict(np.load(cache, allow_pickle=False))
    from echo_agent.eval.datasets import load_split
    from echo_agent.training.linear_probe import Lite0Features
    from echo_agent.training.region_classifier import prepare_cases

    labels = ["normal", "benign", "malignant"]
    busi = [im for s in ("train", "val") for im in load_split("busi", s) if im.label != "normal"]
    cases = prepare_cases(busi, labels)
    feats, arng = Lite0Features(threads=2), random.Random(7)
    plain = [(i, b, c.label, "lesion") for i, c in enumerate(cases) for b in c.boxes]
    xs = [feats.of_samples(cases, plain, 0.25, arng if k else None) for k in range(passes)]
    breast = {im.key: im.label for s in ("train", "val") for im in load_split("breast_lesions_usg", s)}
    data = {"x": np.concatenate(xs), "y": np.tile(np.asarray([p[2] - 1 for p in plain]), passes),
            "breast_keys": np.asarray(sorted(breast)), "breast_malignant": np.asarray([breast[k] == "malignant" for k in sorted(breast)])}
    np.savez(cache, **data)
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "birads_head")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression

    from echo_agent.eval.datasets import load_split
    from echo_agent.eval.metrics import category_agreement
    from echo_agent.organs import get_organ
    from echo_agent.training.region_classifier import category_head_images, median_categories, prepare_cases

    tir = _tirads_module()
    labels = ["normal", "2", "3", "4A", "4B", "4C", "5"]
    t0 = time.monotonic()
    d = tir.extract(args.out)
    m = malignancy_pool(args.out)
    print(f"features: {d['x'].shape} pool crops, {d['x_eval'].shape} eval boxes, {m['x'].shape} BUSI crops, "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    # the pool's cases in extract()'s order, to give each sample its benign/malignant target
    images = [im for split in ("train", "val") for im in load_split("breast_lesions_usg", split)]
    kept, _ = category_head_images(images, labels)
    keys = [c.key for c in prepare_cases(kept, labels, category_head=True)]
    malignant = dict(zip(m["breast_keys"].tolist(), m["breast_malignant"].tolist(), strict=True))
    mal_case = np.asarray([bool(malignant[k]) for k in keys])
    fold_of_sample, fold_of_eval = d["fold"][d["case"]], d["fold"][d["case_eval"]]
    y_eval = d["y_eval"]
    truth = [labels[i] for i in y_eval]

    def score(pred: np.ndarray) -> dict:
        a = category_agreement(truth, [labels[i] for i in pred], labels[1:])
        return {"exact": a.exact, "within_one": a.within_one, "S": a.exact + a.within_one, "n": a.n,
                "predicted": {lbl: int((pred == i).sum()) for i, lbl in enumerate(labels) if i}}

    results = []
    for family in ("A", "B", "C"):
        for c in tir.CS:
            pred = np.zeros(len(y_eval), dtype=int)
            for f in range(tir.FOLDS):
                tr, te = fold_of_sample != f, fold_of_eval == f
                mean, scale = d["x"][tr].mean(0), d["x"][tr].std(0) + 1e-6
                x, xe = (d["x"][tr] - mean) / scale, (d["x_eval"][te] - mean) / scale
                p = (tir.multinomial(x, d["y"][tr], xe, c, balanced=family == "A") if family != "C"
                     else tir.ordinal(x, d["y"][tr], xe, c))
                pred[te] = median_categories(p)
            results.append({"family": family, "C": c, **score(pred)})
            print(json.dumps(results[-1]), flush=True)
    spec = get_organ("breast")
    lesion_sample = d["y"] >= 1  # lesion and whole-image crops of lesion images (background crops are 0)
    for c in tir.CS:
        pred = np.zeros(len(y_eval), dtype=int)
        for f in range(tir.FOLDS):
            tr = (fold_of_sample != f) & lesion_sample
            te = fold_of_eval == f
            x_fit = np.concatenate([d["x"][tr], m["x"]])
            y_fit = np.concatenate([mal_case[d["case"][tr]].astype(int), m["y"]])
            mean, scale = x_fit.mean(0), x_fit.std(0) + 1e-6
            probe = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit((x_fit - mean) / scale, y_fit)
            pm = probe.predict_proba((d["x_eval"][te] - mean) / scale)[:, 1]
            pred[te] = [labels.index(spec.category_for(float(p), lesion_found=True)) for p in pm]
        results.append({"family": "R", "C": c, **score(pred)})
        print(json.dumps(results[-1]), flush=True)
    pred = np.zeros(len(y_eval), dtype=int)
    for f in range(tir.FOLDS):  # the other folds' most frequent category
        pred[fold_of_eval == f] = np.bincount(y_eval[fold_of_eval != f], minlength=7)[1:].argmax() + 1
    majority = score(pred)
    heads = [r for r in results if r["family"] in "ABC"]
    best_h = max(heads, key=lambda r: r["S"])
    best_r = max((r for r in results if r["family"] == "R"), key=lambda r: r["S"])
    decision = {"best_head": best_h, "best_reference": best_r, "majority_baseline": majority,
                "build": best_h["S"] >= best_r["S"] + 0.05 and best_h["exact"] >= best_r["exact"],
                "n_eval_boxes": int(len(y_eval)),
                "categories_in_pool": {labels[i]: int((y_eval == i).sum()) for i in range(1, 7)}}
    print(json.dumps(decision, indent=1))
    (args.out / "cv.json").write_text(json.dumps({"results": results, "decision": decision,
                                                  "command": " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
