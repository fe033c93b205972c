#!/usr/bin/env python
"""Out-of-fold kidney errors by acquisition series and by fluid area (PREREGISTRATION.md here).

    python docs/experiments/kidney_seg_input/by_series.py runs/kfix/runs_B.jsonl runs/kfix/fusion_B.json [NAME]
    python docs/experiments/kidney_seg_input/by_series.py --with-series MANIFEST.csv OUT.csv

The fusion family is held to the packaged kidney fusion's and its grouped out-of-fold probabilities
are redone with the fit's folds and CV seeds (``../veto_recheck/veto_recheck.py:out_of_fold``),
averaged over the CV seeds, with the normal veto of the first look. A frame's series is read from its
clip name in the dataset's ``frames.csv`` (the naming schemes of its acquisition batches); the fluid
area is the mask's ``mask_area_px`` there, cut at the quartiles of the pool's hydronephrosis frames.
"""

from __future__ import annotations

import collections
import csv
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "veto_recheck"))
sys.path.insert(0, str(HERE.parents[2]))

from veto_recheck import lesion_found, out_of_fold  # noqa: E402

FAMILY = "logistic[detector+classifier] l2=1"


def series(clip_id: str) -> str:
    """The acquisition batch a clip's name belongs to (the dataset's file-naming schemes)."""
    if clip_id.startswith("_hydronphrosis-202103_tif"):
        return "2021 tif"
    if clip_id.startswith("2021"):
        return "2021"
    if clip_id.startswith("CANON"):
        return "CANON"
    if clip_id.startswith("S0000"):
        return "S0000"
    if clip_id[:2] in ("12", "13", "14") and "_" in clip_id:
        return "2013"
    return "other"


def main(runs: str, fusion: str, name: str = "") -> None:
    from echo_agent.eval.datasets import dataset_folder
    from echo_agent.fusion import veto_normal

    frames = {r["image"]: r for r in csv.DictReader(open(dataset_folder("hydronephrosis_ncnu") / "frames.csv"))}
    _, records, data, P, ni = out_of_fold(runs, fusion, FAMILY)
    found = lesion_found(records, None)
    pred = np.stack([veto_normal(p, ni, found) for p in P]).mean(0).argmax(1)
    rows = [frames[r.key.split(":", 1)[1]] for r in records]
    y = data.y
    by = collections.defaultdict(lambda: [0, 0, 0, 0])  # lesions, missed, normals, false alarms
    for row, p, t in zip(rows, pred, y):
        c = by[series(row["clip_id"])]
        if t == ni:
            c[2] += 1
            c[3] += int(p != ni)
        else:
            c[0] += 1
            c[1] += int(p == ni)
    print(f"{name or runs}: accuracy {(pred == y).mean():.4f} (CV-seed-averaged probabilities)")
    for s, (n_l, miss, n_n, fa) in sorted(by.items()):
        print(f"  series {s:8s} hydronephrosis read normal {miss:3d} of {n_l:3d}   normal read hydronephrosis {fa:3d} of {n_n:3d}")
    area = np.array([int(row["mask_area_px"]) for row, t in zip(rows, y) if t != ni])
    missed = np.array([p == ni for p, t in zip(pred, y) if t != ni])
    cuts = np.quantile(area, [0.25, 0.5, 0.75])
    q = np.searchsorted(cuts, area, side="right")
    print("  fluid-area quartile (px): " + "; ".join(
        f"Q{k + 1} {missed[q == k].sum()} of {(q == k).sum()} missed" for k in range(4))
        + f"  (cuts {', '.join(f'{c:.0f}' for c in cuts)})")


def write_manifest_with_series(manifest: str, out: str) -> None:
    """A copy of a kidney manifest with a ``series`` column (from each row's clip, its ``group``),
    for ``echo-agent eval OUT --by series``."""
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=[*rows[0], "series"])
        w.writeheader()
        w.writerows({**r, "series": series(r["group"])} for r in rows)


if __name__ == "__main__":
    if sys.argv[1] == "--with-series":  # by_series.py --with-series MANIFEST.csv OUT.csv
        write_manifest_with_series(sys.argv[2], sys.argv[3])
    else:
        main(*sys.argv[1:4])
