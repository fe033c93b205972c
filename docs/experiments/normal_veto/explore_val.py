"""The pre-registration's exploration: fused readings with and without the normal veto, on cached runs.

    python docs/experiments/normal_veto/explore_val.py

Reads run caches written by ``tools/train_policy.py --runs-cache`` (evidence of earlier agent runs;
nothing is re-run): the packaged models on the val splits (/tmp/pg/runs_packaged_val.jsonl), the
BUSI train+val runs of the out-of-fold models and the BUSI-only models on BrEaST val (/tmp/xc, see
../cross_center_agent/). Output: results/eval/normal_veto/explore_val_output.txt.
"""

from __future__ import annotations

import json

import numpy as np

from echo_agent.fusion.evidence import RunEvidence
from echo_agent.fusion.learned import DETECTOR_RULE, FusionParams, rule_log_probs, veto_normal
from echo_agent.organs import get_organ
from echo_agent.schemas import ClinicalContext, DetectorReport, parse_evidence
from echo_agent.training.fusion_fit import RunRecord

ORGAN = get_organ("breast")
NORMAL = list(ORGAN.image_labels).index(ORGAN.normal_label)


def load(path: str) -> list[RunRecord]:
    fields = RunRecord.__dataclass_fields__
    return [RunRecord(**{k: v for k, v in json.loads(line).items() if k in fields}) for line in open(path)]


def fused(r: RunRecord, params: FusionParams) -> tuple[RunEvidence, np.ndarray]:
    """A cached run's evidence and its fused probabilities under ``params``."""
    ev = RunEvidence.of([parse_evidence(e) for e in r.evidence])
    clin = ClinicalContext.model_validate(r.clinical) if r.clinical else None
    return ev, params.probabilities(params.run_logits(ORGAN, ev, clin, (r.width, r.height))[0])


def evaluate(name: str, runs: list[RunRecord], params: FusionParams) -> None:
    rows = []
    for r in runs:
        ev, p = fused(r, params)
        reports = [e for e in ev.reports if isinstance(e, DetectorReport)]
        det = int(np.argmax(rule_log_probs(ORGAN, reports, DETECTOR_RULE)))
        rows.append((r.key.split(":")[0], list(ORGAN.image_labels).index(r.label), p, det))
    for center in sorted({c for c, *_ in rows}):
        sub = [x for x in rows if x[0] == center]
        y = np.array([x[1] for x in sub])
        preds = {"fusion": np.array([x[2].argmax() for x in sub]),
                 "fusion+veto": np.array([veto_normal(x[2], NORMAL, x[3] != NORMAL).argmax() for x in sub]),
                 "detector": np.array([x[3] for x in sub])}
        for tag, pred in preds.items():
            les, nor = y != NORMAL, y == NORMAL
            print(f"{name:28s} {center:20s} {tag:12s} n={len(y):3d} acc={(pred == y).mean():.3f} "
                  f"lesions->normal {(pred[les] == NORMAL).sum()}/{les.sum()} normals kept {(pred[nor] == NORMAL).sum()}/{nor.sum()}")


if __name__ == "__main__":
    packaged = FusionParams.from_json(open("echo_agent/assets/fusion/breast.json").read())
    packaged.normal_veto = False  # the veto is applied here, explicitly
    busi = FusionParams.from_json(open("/tmp/xc/oof/fusion_busi_oof.json").read())
    evaluate("packaged on val", load("/tmp/pg/runs_packaged_val.jsonl"), packaged)
    evaluate("BUSI OOF fusion, in-center", load("/tmp/xc/oof/runs_busi.jsonl"), busi)
    evaluate("BUSI models -> BrEaST val", load("/tmp/xc/runs_busi_only_on_breast_val.jsonl"), busi)
