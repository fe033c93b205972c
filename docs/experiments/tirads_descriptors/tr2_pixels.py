"""Exploratory (not registered; nothing adopted): do the readers' TI-RADS 2 nodules look cystic in pixels?

    python docs/experiments/tirads_descriptors/tr2_pixels.py

On the 289 categorised DDTI train + val nodules (no test nodule), inside an ellipse inscribed in the
ground-truth box (0.8 of its radii) against a ring around it (1.3-2.5), prints for a few pixel
measures the AUC of category 2 against the rest, of 2-3 against the rest, of 5 against the rest, the
Spearman correlation with the category, and each category's median. A measure that saw cystic or
spongiform nodules would have a high AUC for category 2 on the dark-pixel measures.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

CATS = ["2", "3", "4a", "4b", "4c", "5"]


def measures(gray: np.ndarray, box) -> dict[str, float]:
    h, w = gray.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    rx, ry = max(1.0, (box.x2 - box.x1) / 2), max(1.0, (box.y2 - box.y1) / 2)
    e = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    inside, ring = e <= 0.8, (e > 1.3) & (e <= 2.5)
    gland = float(np.median(gray[ring])) if ring.sum() > 20 else float(np.median(gray))
    v = gray[inside]
    out = {"area share": inside.sum() / (h * w), "mean / gland": v.mean() / max(gland, 1.0),
           "std / mean": v.std() / max(v.mean(), 1.0)}
    for k in (0.3, 0.5, 0.6):
        dark = (gray < k * gland) & inside
        lab, n = ndimage.label(dark)
        sizes = ndimage.sum(dark, lab, range(1, n + 1)) if n else np.array([])
        out[f"dark<{k} share"] = dark.sum() / inside.sum()
        out[f"dark<{k} blobs>=6px"] = float((sizes >= 6).sum())
    out["p10 / gland"] = np.percentile(ndimage.gaussian_filter(gray, 1.5)[inside], 10) / max(gland, 1.0)
    return out


def main() -> None:
    from echo_agent.eval.datasets import load_split
    from echo_agent.imaging import load_image

    cats, rows = [], []
    for split in ("train", "val"):
        for im in load_split("ddti", split):
            if im.category in CATS and im.boxes:
                a = load_image(im.image).array.astype(float)
                cats.append(im.category)
                rows.append(measures(a.mean(2) if a.ndim == 3 else a, im.boxes[0]))
    y = np.array(cats)
    print(len(y), {c: int((y == c).sum()) for c in CATS})
    for key in rows[0]:
        x = np.array([r[key] for r in rows])
        rho = spearmanr([CATS.index(c) for c in y], x).correlation
        print(f"{key:20s} AUC 2 {roc_auc_score(y == '2', x):.3f}  2-3 {roc_auc_score(np.isin(y, ['2', '3']), x):.3f}  "
              f"5 {roc_auc_score(y == '5', x):.3f}  spearman {rho:+.3f}  medians",
              [round(float(np.median(x[y == c])), 3) for c in CATS])


if __name__ == "__main__":
    main()
