"""Table of the cross-center before/after runs of CROSS_CENTER.md, from the eval folders' metrics.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [("busi_to_breast", "BUSI-only → BrEaST test"), ("breast_to_busi", "BrEaST-only → BUSI test")]


def _summary(path: Path) -> dict:
    from echo_agent.eval.report import lesions_called_normal

    m = json.loads((path / "metrics.json").read_text())
    org = m["organs"]["breast"]["overall"]
    agent, det = org["agent"], org["detector"]
    normal_row = agent["classification"]["confusion"]["matrix"][0]  # the organ's first label is its normal label
    called, lesions = lesions_called_normal(agent)
    return {
        "lesions_normal": called, "lesions": lesions,
        "normals_normal": normal_row[0], "normals": sum(normal_row),
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
