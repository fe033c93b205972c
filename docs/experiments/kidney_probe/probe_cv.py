"""Out-of-fold hydronephrosis AUC of a frozen-feature probe on the kidney development pool
(PREREGISTRATION.md in this folder).

    python docs/experiments/kidney_probe/probe_cv.py --out runs/kidney_probe

Needs the train extra and scikit-learn; Hydronephrosis-NCNU staged by ``python tools/prepare_data.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CS = (0.003, 0.01, 0.03, 0.1)
FOLDS = 3


def features(out: Path) -> dict[str, np.ndarray]:
    cache = out / "features.npz"
    if cache.exists():
        return dict(np.load(cache, allow_pickle=False))
    from echo_agent.eval.datasets import load_split
    from echo_agent.eval.splits import cross_fit_fold
    from echo_agent.training.linear_probe import Lite0Features
    from echo_agent.training.region_classifier import prepare_cases

    labels = ["normal", "hydronephrosis"]
    images = [im for split in ("train", "val") for im in load_split("hydronephrosis_ncnu", split)]
    cases = prepare_cases(images, labels)
    feats = Lite0Features(threads=2)
    whole = [(i, None, c.label, "whole") for i, c in enumerate(cases)]
    x = np.concatenate([feats.of_samples(cases, whole[k:k + 64], 0.0) for k in range(0, len(whole), 64)])
    data = {"x": x, "y": np.asarray([c.label for c in cases]),
            "fold": np.asarray([cross_fit_fold(c.group, FOLDS) for c in cases]),
            "group": np.asarray([c.group for c in cases])}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/kidney_probe"))
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    t0 = time.monotonic()
    d = features(args.out)
    x, y, fold = d["x"], d["y"], d["fold"]
    print(f"{len(y)} frames, {len(set(d['group'].tolist()))} clips, {int(y.sum())} hydronephrosis; "
          f"features {time.monotonic() - t0:.0f} s", flush=True)
    rows = []
    for c in CS:
        p = np.zeros(len(y))
        per_fold = []
        for f in range(FOLDS):
            tr, te = fold != f, fold == f
            mean, scale = x[tr].mean(0), x[tr].std(0) + 1e-6
            m = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit((x[tr] - mean) / scale, y[tr])
            p[te] = m.predict_proba((x[te] - mean) / scale)[:, 1]
            per_fold.append({"fold": f, "n": int(te.sum()), "hydronephrosis": int(y[te].sum()),
                             "auc": float(roc_auc_score(y[te], p[te]))})
        pred = p >= 0.5
        rec = float(pred[y == 1].mean())
        spec = float((~pred[y == 0]).mean())
        rows.append({"C": c, "folds": per_fold, "pooled_auc": float(roc_auc_score(y, p)),
                     "mean_fold_auc": float(np.mean([f["auc"] for f in per_fold])),
                     "accuracy": float((pred == y).mean()), "balanced_accuracy": (rec + spec) / 2,
                     "hydronephrosis_recall": rec})
        print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: r["mean_fold_auc"])
    finetuned = [0.81, 0.66, 0.76]  # kidney_pool DECISION.md, the same folds
    verdict = {"chosen_C": best["C"], "probe_fold_auc": [f["auc"] for f in best["folds"]],
               "finetuned_fold_auc": finetuned,
               "higher_in_every_fold": all(f["auc"] > a for f, a in zip(best["folds"], finetuned, strict=True))}
    print(json.dumps(verdict, indent=1))
    (args.out / "cv.json").write_text(json.dumps({"results": rows, "verdict": verdict, "command": " ".join(sys.argv)},
                                                 indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
