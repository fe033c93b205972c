"""Apply the pre-registered rule (PREREGISTRATION.md) to two `echo-agent eval` runs of one organ:
the fp32 reference and an 8-bit candidate, on the same manifest.

    python docs/experiments/int8/compare.py REF_DIR CAND_DIR [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _load(d: Path) -> tuple[dict, dict]:
    metrics = json.loads((d / "metrics.json").read_text())
    preds = {}
    for line in (d / "predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        preds[r["key"]] = r
    return metrics, preds


def _summary(metrics: dict) -> dict:
    (organ, m), = metrics["organs"].items()
    a = m["overall"]["agent"]
    auc = a.get("auc") or {}
    return {"organ": organ, "positive": m["positive_label"], "normal": m["labels"][0],
            "accuracy": a["classification"]["accuracy"], "auc": auc.get("value") if isinstance(auc, dict) else auc,
            "loc_f1": a["localization"]["f1"], "ece": (a.get("calibration") or {}).get("ece")}


def compare(ref_dir: Path, cand_dir: Path) -> dict:
    ref_m, ref = _load(ref_dir)
    cand_m, cand = _load(cand_dir)
    if set(ref) != set(cand):
        raise SystemExit("the two runs are not on the same images")
    r, c = _summary(ref_m), _summary(cand_m)
    pos, normal = r["positive"], r["normal"]
    same, dp, lesion_normal = [], [], {"ref": 0, "cand": 0}
    for k in sorted(ref):
        da, db = ref[k]["agent"]["diagnosis"], cand[k]["agent"]["diagnosis"]
        same.append(da["label"] == db["label"])
        dp.append(abs(da["probabilities"][pos] - db["probabilities"][pos]))
        if ref[k]["truth"]["label"] != normal:
            lesion_normal["ref"] += da["label"] == normal
            lesion_normal["cand"] += db["label"] == normal
    agree, med, p95 = float(np.mean(same)), float(np.median(dp)), float(np.percentile(dp, 95))
    checks = {
        "label_agreement>=0.97": agree >= 0.97,
        "median_dp<=0.02": med <= 0.02,
        "p95_dp<=0.08": p95 <= 0.08,
        "accuracy_drop<=0.01": c["accuracy"] >= r["accuracy"] - 0.01,
        "auc_drop<=0.01": c["auc"] >= r["auc"] - 0.01,
        "loc_f1_drop<=0.01": c["loc_f1"] >= r["loc_f1"] - 0.01,
        "ece_rise<=0.01": c["ece"] <= r["ece"] + 0.01,
        "lesion_called_normal_not_more": lesion_normal["cand"] <= lesion_normal["ref"],
    }
    return {"n_images": len(ref), "ref": r, "cand": c, "label_agreement": agree, "median_abs_dp": med,
            "p95_abs_dp": p95, "lesion_called_normal": lesion_normal, "checks": checks,
            "passes_val_checks": all(checks.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ref", type=Path)
    ap.add_argument("cand", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = compare(args.ref, args.cand)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
