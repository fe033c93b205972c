#!/usr/bin/env python
"""The normal veto with the whole-image re-check's candidates counted too, on out-of-fold runs.

    python docs/experiments/veto_recheck/veto_recheck.py runs/vr/runs.jsonl runs/vr/fusion.json

Takes the runs cache of ``tools/train_policy.py --cross-fitted ...`` and the fusion it fitted; redoes
that fit's grouped out-of-fold probabilities of the fusion's candidate (the same procedure, folds and
seeds: ``fusion_fit.cross_validate``), and applies the normal veto with ``lesion_found`` =

- ``today``: the first detector report has a candidate (the runtime rule, ``LearnedFusion``);
- ``recheck>=t``: that, or a whole-image re-check report (``tta``, no region) has a candidate at
  score >= t, for t in 0.25, 0.225, 0.2.

Prints out-of-fold accuracy (mean over the CV seeds), lesion images read normal and normal images read
normal, overall and per center, and the pre-registered decision (``PREREGISTRATION.md``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

THRESHOLDS = (0.25, 0.225, 0.2)
MAX_COST = 0.01  # the veto's own adoption bar (fusion_fit.NORMAL_VETO_MAX_COST)
MIN_DROP = 0.20  # lesion images read normal at least 20 % fewer
PACKAGED_FAMILY = "logistic[classifier] l2=10"


def lesion_found(records: list, threshold: float | None) -> np.ndarray:
    """Per run: the first detector report has a candidate, or (``threshold``) a whole-image TTA
    re-check report has one at ``threshold`` or above."""
    from echo_agent.fusion import recheck_candidate
    from echo_agent.schemas import DetectorReport, parse_evidence

    out = []
    for r in records:
        reports = [e for e in map(parse_evidence, r.evidence) if isinstance(e, DetectorReport)]
        found = bool(reports and reports[0].detections)
        if threshold is not None and not found:
            found = recheck_candidate(reports, threshold) is not None  # what LearnedFusion reads
        out.append(found)
    return np.array(out)


def out_of_fold(runs_path: str, fusion_path: str, family: str):
    """``(params, records, data, P, ni)``: the runs of the fusion's organ in a ``--runs-cache``, their
    fit arrays, and the grouped out-of-fold probabilities ``P`` (CV seeds x runs x labels) of the
    fusion ``family`` with the fit's own folds and CV seeds; ``ni`` is the normal label's index."""
    from echo_agent.fusion import load_fusion_params
    from echo_agent.organs import get_organ
    from echo_agent.training.fusion_fit import Candidate, FitData, load_runs

    params = load_fusion_params("", fusion_path)
    spec = get_organ(params.organ)
    records = [r for r in load_runs(runs_path) if r.organ == params.organ]
    labels = list(spec.image_labels)
    data = FitData.from_runs(records, labels)
    sel = params.training["selection"]
    P = data.out_of_fold(Candidate.from_name(family), folds=sel["folds"], seeds=tuple(sel["cv_seeds"]))
    return params, records, data, P, labels.index(spec.normal_label)


def main(runs_path: str, fusion_path: str) -> None:
    from echo_agent.fusion import DETECTOR_RULE, veto_normal
    from echo_agent.training.fusion_fit import NORMAL_VETO_MAX_COST

    assert MAX_COST == NORMAL_VETO_MAX_COST
    # the family is held to the packaged fusion's (PREREGISTRATION.md), whatever the fit's guard chose
    params, records, data, P, ni = out_of_fold(runs_path, fusion_path, PACKAGED_FAMILY)
    y = data.y
    sel = params.training["selection"]
    centers = np.array([r.key.split(":")[0] for r in records])
    det_found = data.R[DETECTOR_RULE].argmax(1) != ni
    print(f"{len(records)} runs ({PACKAGED_FAMILY}; the fit chose {params.training['chosen']}; CV seeds {sel['cv_seeds']}); "
          f"first-look rule agrees with the fit's detector rule on {(lesion_found(records, None) == det_found).mean():.3f}")

    def summary(found: np.ndarray | None) -> dict:
        pred = (P if found is None else np.stack([veto_normal(p, ni, found) for p in P])).argmax(2)
        row = {"accuracy": float((pred == y).mean()),
               "lesions_read_normal": float((pred[:, y != ni] == ni).sum(1).mean()),
               "normals_read_normal": float((pred[:, y == ni] == ni).sum(1).mean())}
        for c in sorted(set(centers)):
            m = centers == c
            row[c] = {"accuracy": float((pred[:, m] == y[m]).mean()),
                      "lesions_read_normal": float((pred[:, m & (y != ni)] == ni).sum(1).mean()),
                      "normals_read_normal": float((pred[:, m & (y == ni)] == ni).sum(1).mean())}
        return row

    arms = {"no veto": summary(None), "today": summary(lesion_found(records, None))}
    arms.update({f"recheck>={t:g}": summary(lesion_found(records, t)) for t in THRESHOLDS})
    n_les, n_nor = int((y != ni).sum()), int((y == ni).sum())
    for name, row in arms.items():
        per = "; ".join(f"{c}: acc {v['accuracy']:.3f}, lesions normal {v['lesions_read_normal']:.1f}, "
                        f"normals normal {v['normals_read_normal']:.1f}" for c, v in row.items() if isinstance(v, dict))
        print(f"{name:15s} accuracy {row['accuracy']:.4f}  lesions read normal {row['lesions_read_normal']:.1f} of {n_les}  "
              f"normals read normal {row['normals_read_normal']:.1f} of {n_nor}  [{per}]")
    today = arms["today"]
    passing = [t for t in THRESHOLDS if today["accuracy"] - arms[f"recheck>={t:g}"]["accuracy"] <= MAX_COST
               and arms[f"recheck>={t:g}"]["lesions_read_normal"] <= (1 - MIN_DROP) * today["lesions_read_normal"]]
    print(f"rule: lowest t with accuracy cost <= {MAX_COST} and >= {MIN_DROP:.0%} fewer lesions read normal -> "
          + (f"adopt t = {min(passing):g}" if passing else "none: not adopted"))
    out = Path(runs_path).with_name("veto_recheck.json")
    out.write_text(json.dumps({"arms": arms, "adopt": min(passing) if passing else None, "n_lesions": n_les,
                               "n_normals": n_nor}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
