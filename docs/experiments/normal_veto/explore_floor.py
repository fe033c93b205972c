"""Exploration (val only, no test split): would a lower veto floor through the TTA re-check's scores
bound the lesions read normal further, and at what price on normal images?

    python docs/experiments/normal_veto/explore_floor.py

The veto fires when the first detector call has a candidate at its threshold (0.25); here it also
fires when a TTA re-check's top candidate reaches ``floor``. Cached runs (``tools/train_policy.py
--runs-cache``): the packaged models on the val splits (/tmp/pg/runs_packaged_val.jsonl), the BUSI-only
models on BrEaST val and the BrEaST-only models on BUSI val (/tmp/vf, written by
``tools/train_policy.py --organ breast --centers <other> --split val --detector D --classifier C
--runs-cache F``). Output: results/eval/normal_veto/explore_floor_output.txt.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from explore_val import NORMAL, ORGAN, fused, load

from echo_agent.fusion.learned import FusionParams, veto_normal
from echo_agent.schemas import DetectorReport


def rows_of(runs, params):
    out = []
    for r in runs:
        ev, p = fused(r, params)
        reps = [e for e in ev.reports if isinstance(e, DetectorReport)]
        first = max((d.score for d in reps[0].detections), default=0.0) if reps else 0.0
        tta = [max((d.score for d in e.detections), default=0.0) for e in reps[1:] if e.tta]
        out.append(dict(center=r.key.split(":")[0], y=list(ORGAN.image_labels).index(r.label), p=p,
                        first=first, tta=max(tta) if tta else None, ncalls=len(reps)))
    return out

def table(name, rows):
    for center in sorted({x["center"] for x in rows}):
        sub = [x for x in rows if x["center"] == center]
        y = np.array([x["y"] for x in sub])
        les, nor = y != NORMAL, y == NORMAL
        print(f"-- {name} {center} n={len(y)} lesions={les.sum()} normals={nor.sum()}")
        fused_normal = [x for x in sub if x["p"].argmax() == NORMAL]
        for x in sorted(fused_normal, key=lambda x: x["y"]):
            print(f"   fused normal: truth={ORGAN.image_labels[x['y']]:9s} first={x['first']:.3f} tta={x['tta'] if x['tta'] is None else round(x['tta'],3)} calls={x['ncalls']}")
        for floor in (None, 0.25, 0.2, 0.15, 0.12, 0.1):
            pred = []
            for x in sub:
                if floor is None:
                    hit = x["first"] >= 0.25
                else:
                    hit = x["first"] >= 0.25 or (x["tta"] is not None and x["tta"] >= floor)
                pred.append(veto_normal(x["p"], NORMAL, hit).argmax())
            pred = np.array(pred)
            print(f"   floor={floor}: acc={(pred == y).mean():.3f} lesions->normal {(pred[les] == NORMAL).sum()}/{les.sum()} normals kept {(pred[nor] == NORMAL).sum()}/{nor.sum()}")


def fusion(path: str) -> FusionParams:
    params = FusionParams.from_json(open(path).read())
    params.normal_veto = False  # applied here, explicitly
    return params


if __name__ == "__main__":
    table("packaged on val", rows_of(load("/tmp/pg/runs_packaged_val.jsonl"), fusion("echo_agent/assets/fusion/breast.json")))
    table("BUSI-only -> BrEaST val", rows_of(load("/tmp/vf/runs_busi_to_breast_val.jsonl"),
                                             fusion("results/eval/normal_veto/fusion_busi_oof_veto.json")))
    table("BrEaST-only -> BUSI val", rows_of(load("/tmp/vf/runs_breast_to_busi_val.jsonl"),
                                             fusion("results/eval/normal_veto/fusion_breast_lesions_usg_oof_veto.json")))
