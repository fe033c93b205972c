"""Score fitted fusions on cached agent runs (PREREGISTRATION.md in this folder).

    python docs/experiments/fusion_prob_features/score.py NAME RUNS.jsonl FUSION.json [NAME RUNS FUSION ...] --out F.json

For each (runs, fusion) triple every run's evidence goes through ``LearnedFusion`` with the fusion as
fitted (its model-identity check set aside: the runs come from the models it was fitted on, or from
single-center models another center's fusion is scored with) and is scored as ``echo-agent eval``
scores a run: accuracy, lesion images read normal, malignant AUC (P(malignant), malignant vs benign),
NLL, ECE. Nothing is fitted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def score(runs: list, params) -> dict:
    from echo_agent.eval.metrics import auc_score, calibration_score
    from echo_agent.fusion.learned import LearnedFusion
    from echo_agent.organs import get_organ

    fusion = LearnedFusion({params.organ: params})
    spec = get_organ(params.organ)
    truth, pred, probs = [], [], []
    for r in runs:
        ev, clin = r.parsed()
        dx = fusion.fuse(spec, ev, clinical=clin, image_size=(r.width, r.height))
        truth.append(r.label)
        pred.append(dx.label)
        probs.append({lbl: float(dx.probabilities.get(lbl, 0.0)) for lbl in params.labels})
    normal = spec.normal_label
    lesion = [t != normal for t in truth]
    cal = calibration_score(truth, probs, params.labels)
    out = {"n": len(runs), "accuracy": round(sum(a == b for a, b in zip(pred, truth)) / len(runs), 4),
           "lesions": sum(lesion),
           "lesions_read_normal": sum(le and p == normal for le, p in zip(lesion, pred)),
           "normals_read_normal": sum((not le) and p == normal for le, p in zip(lesion, pred)),
           "nll": round(cal.log_loss, 4), "ece": round(cal.ece, 4)}
    if "malignant" in params.labels:
        auc = auc_score(truth, [p["malignant"] for p in probs], "malignant", "benign")
        out["malignant_auc"] = None if auc.value is None else round(auc.value, 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("triples", nargs="+", help="NAME RUNS.jsonl FUSION.json, repeated")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if len(args.triples) % 3:
        ap.error("give NAME RUNS FUSION triples")
    from echo_agent.fusion.learned import FusionParams
    from echo_agent.training.fusion_fit import load_runs

    results = {}
    for name, runs_path, fusion_path in zip(*[iter(args.triples)] * 3, strict=True):
        params = FusionParams.from_json(Path(fusion_path).read_text(), fusion_path)
        chosen = params.training.get("chosen")
        params = dataclasses.replace(params, training={})
        results[name] = {"runs": runs_path, "fusion": fusion_path, "chosen": chosen, **score(load_runs(runs_path), params)}
        print(name, json.dumps(results[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "command": " ".join(sys.argv)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
