"""Table of the cross-center before/after runs of CROSS_CENTER.md, from the eval folders' metrics.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [("busi_to_breast", "BUSI-only → BrEaST test"), ("breast_to_busi", "BrEaST-only → BUSI test")]


def _summary(path: Path) -> dict:
    m = json.loads((path / "metrics.json").read_text())
    org = m["organs"]["breast"]["overall"]
    agent, det = org["agent"], org["detector"]
    conf = agent["classification"]["confusion"]
    labels, mat = conf["labels"], conf["matrix"]
    n = labels.index("normal")
    lesion_rows = [r for i, r in enumerate(mat) if i != n]
    return {
        "lesions_normal": sum(r[n] for r in lesion_rows), "lesions": sum(sum(r) for r in lesion_rows),
        "normals_normal": mat[n][n], "normals": sum(mat[n]),
        "acc": agent["classification"]["accuracy"], "det_acc": det["classification"]["accuracy"],
        "auc": agent["auc"]["value"], "ece": agent["calibration"]["ece"],
        "loc_f1": agent["localization"]["f1"], "referred": agent["referral"]["referred_rate"],
    }


def main(root: Path) -> None:
    out = {}
    print("| direction, detector seed | lesion images read normal | normal images read normal | accuracy (detector) "
          "| malignant AUC | ECE | loc. F1@0.5 | referred |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, title in ROWS:
        for seed in ("s0", "s1"):
            b, a = (_summary(root / f"{key}_{seed}_{arm}") for arm in ("before", "after"))
            out[f"{key}_{seed}"] = {"before": b, "after": a}
            normals = f"{b['normals_normal']} → {a['normals_normal']} / {a['normals']}" if a["normals"] else "–"
            print(f"| {title}, {seed} | {b['lesions_normal']} → **{a['lesions_normal']}** / {a['lesions']} | {normals} "
                  f"| {b['acc']:.3f} → {a['acc']:.3f} ({a['det_acc']:.3f}) | {b['auc']:.3f} → {a['auc']:.3f} "
                  f"| {b['ece']:.3f} → {a['ece']:.3f} | {b['loc_f1']:.3f} → {a['loc_f1']:.3f} "
                  f"| {b['referred']:.1%} → {a['referred']:.1%} |")
    (root / "cross_center_table.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
