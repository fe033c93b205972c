"""Out-of-fold hydronephrosis AUC of a whole-frame probe and of a mask-supervised cell probe on frozen
Lite0 maps (PREREGISTRATION.md in this folder).

    python docs/experiments/kidney_patch_probe/patch_cv.py --out runs/kidney_patch_probe

Needs the train extra and scikit-learn; Hydronephrosis-NCNU staged by ``python tools/prepare_data.py``.
Never reads the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CS = (0.0003, 0.001, 0.003, 0.01)
CLIP_FOLDS = 3
MIN_FLUID = 0.10


def frames(batch: int = 32):
    """The pool's frames in batches, as the second look crops a whole image (224 px): yields lists of
    ``(crop uint8 224x224x3, fluid mask bool 224x224, label 0/1, clip group, clip fold, given fold)``."""
    from PIL import Image

    from echo_agent.detectors.region_classifier import square_crop
    from echo_agent.eval.datasets import lesion_mask, load_split
    from echo_agent.eval.splits import cross_fit_fold, cv_group
    from echo_agent.imaging.preprocess import prepare_for_detection

    images = [im for split in ("train", "val") for im in load_split("hydronephrosis_ncnu", split)]
    for i in range(0, len(images), batch):
        out = []
        for im in images[i:i + batch]:
            with Image.open(im.image) as pil:
                arr = np.asarray(pil.convert("RGB"))
            prep = prepare_for_detection(arr)
            x0, y0 = prep.crop
            h, w = prep.array.shape[:2]
            mask = lesion_mask(im, prep.original_size) if im.label != "normal" else None
            m = np.zeros(arr.shape[:2], np.uint8) if mask is None else mask.astype(np.uint8) * 255
            m = np.repeat(m[y0:y0 + h, x0:x0 + w, None], 3, axis=2)
            out.append((square_crop(np.ascontiguousarray(prep.array), None, margin=0.0, size=224),
                        square_crop(np.ascontiguousarray(m), None, margin=0.0, size=224)[:, :, 0] > 127,
                        int(im.label != "normal"), cv_group(im), cross_fit_fold(cv_group(im), CLIP_FOLDS),
                        int(Path(im.image).parts[-3].removeprefix("fold"))))
        yield out
        print(f"  {min(i + batch, len(images))}/{len(images)} frames", flush=True)


def maps(out: Path) -> dict[str, np.ndarray]:
    """Per frame: the backbone's last map (n, 49, 1280), cell fluid fractions (n, 49), label, folds."""
    cache = out / "maps.npz"
    if cache.exists():
        return dict(np.load(cache, allow_pickle=False))
    import torch

    from echo_agent.training.linear_probe import INPUT_OFFSET, INPUT_SCALE, Lite0Features

    torch.set_num_threads(2)
    net = Lite0Features(threads=2).net
    feats, fluid, y, clip_fold, given_fold, groups = [], [], [], [], [], []
    for chunk in frames():
        crops, masks, labels, grp, cf, gf = zip(*chunk, strict=True)
        y += labels
        groups += grp
        clip_fold += cf
        given_fold += gf
        x = np.stack(crops).astype(np.float32)
        x = torch.from_numpy(((x - INPUT_OFFSET) / INPUT_SCALE).transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            fm = net.body.extract_features(x).numpy()  # (b, 1280, 7, 7)
        feats.append(fm.reshape(len(crops), fm.shape[1], -1).transpose(0, 2, 1).astype(np.float16))
        cells = np.stack(masks).reshape(len(masks), 7, 32, 7, 32).mean(axis=(2, 4)).reshape(len(masks), 49)
        fluid.append(cells.astype(np.float32))
    data = {"x": np.concatenate(feats), "fluid": np.concatenate(fluid), "y": np.asarray(y),
            "clip_fold": np.asarray(clip_fold), "given_fold": np.asarray(given_fold), "group": np.asarray(groups)}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


def scores(d: dict[str, np.ndarray], folds: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold frame scores of WHOLE and PATCH at inverse regularisation ``c``."""
    from sklearn.linear_model import LogisticRegression

    x = d["x"].astype(np.float32)
    pooled = x.mean(1)
    cell_y = (d["fluid"] >= MIN_FLUID).astype(int)
    cell_y[d["y"] == 0] = 0
    whole, patch = np.zeros(len(d["y"])), np.zeros(len(d["y"]))
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        mu, sd = pooled[tr].mean(0), pooled[tr].std(0) + 1e-6
        m = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit((pooled[tr] - mu) / sd, d["y"][tr])
        whole[te] = m.predict_proba((pooled[te] - mu) / sd)[:, 1]
        xc = x[tr].reshape(-1, x.shape[2])
        mu, sd = xc.mean(0), xc.std(0) + 1e-6
        m = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit((xc - mu) / sd, cell_y[tr].reshape(-1))
        pc = m.predict_proba(((x[te].reshape(-1, x.shape[2])) - mu) / sd)[:, 1].reshape(int(te.sum()), -1)
        patch[te] = pc.max(1)
    return whole, patch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/kidney_patch_probe"))
    args = ap.parse_args()
    from sklearn.metrics import roc_auc_score

    t0 = time.monotonic()
    d = maps(args.out)
    y = d["y"]
    print(f"{len(y)} frames, {len(set(d['group'].tolist()))} clips, {int(y.sum())} hydronephrosis, "
          f"{int((d['fluid'] >= MIN_FLUID).sum())} fluid cells; maps {time.monotonic() - t0:.0f} s", flush=True)
    rows = []
    for c in CS:
        row = {"C": c}
        for scheme in ("clip_fold", "given_fold"):
            folds = d[scheme]
            whole, patch = scores(d, folds, c)
            for name, s in (("whole", whole), ("patch", patch)):
                per = [float(roc_auc_score(y[folds == f], s[folds == f])) for f in np.unique(folds)]
                row[f"{name}_{scheme}"] = {"folds": per, "mean": float(np.mean(per)), "pooled": float(roc_auc_score(y, s))}
        rows.append(row)
        print(json.dumps(row), f"{time.monotonic() - t0:.0f} s", flush=True)
    best = {arm: max(rows, key=lambda r: r[f"{arm}_clip_fold"]["mean"]) for arm in ("whole", "patch")}
    gain = best["patch"]["patch_clip_fold"]["mean"] - best["whole"]["whole_clip_fold"]["mean"]
    given = best["patch"]["patch_given_fold"]["mean"] - best["whole"]["whole_given_fold"]["mean"]
    verdict = {"whole_C": best["whole"]["C"], "patch_C": best["patch"]["C"], "clip_fold_gain": gain,
               "given_fold_gain": given, "worth_building": gain >= 0.03 and given >= 0.0}
    print(json.dumps(verdict, indent=1))
    (args.out / "cv.json").write_text(json.dumps({"results": rows, "verdict": verdict, "command": " ".join(sys.argv)},
                                                 indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
