#!/usr/bin/env python
"""The kidney normal veto with the whole-image re-check counted too, on §40's out-of-fold runs.

    python docs/experiments/kidney_veto_recheck/kidney_veto_recheck.py \
        --runs runs/kfix/runs_B.jsonl --fusion runs/kfix/fusion_B.json \
        --replication-runs runs/kfix/runs_seg_s1_.jsonl --replication-fusion runs/kfix/fusion_seg_s1_.json \
        --out results/eval/kidney_veto_recheck

The fusion family is held to the packaged kidney fusion's; its grouped out-of-fold probabilities
are redone with the fit's folds and CV seeds (``../veto_recheck/veto_recheck.py:out_of_fold``) and
the normal veto applied with the first look only (today) or also a re-check candidate at τ.
Prints and writes (``kidney_veto_recheck.txt`` / ``.json``) each arm's accuracy (mean and per CV
seed), balanced accuracy, ECE, hydronephrosis frames read normal and normal frames read normal,
for both run sets, and the decision of ``PREREGISTRATION.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "veto_recheck"))
sys.path.insert(0, str(HERE.parents[2]))

from veto_recheck import lesion_found, out_of_fold  # noqa: E402

PACKAGED_FAMILY = "logistic[detector+classifier] l2=1"
THRESHOLDS = (0.25, 0.2, 0.15, 0.1)
MIN_GAIN = 0.005
TIE = 0.001


def arms(runs_path: str, fusion_path: str) -> tuple[dict, str]:
    """Every arm's metrics on one run set, and a header line."""
    from echo_agent.fusion import veto_normal
    from echo_agent.training.fusion_fit import ece_with_interval

    params, records, data, P, ni = out_of_fold(runs_path, fusion_path, PACKAGED_FAMILY)
    y = data.y
    labels = list(params.labels)
    groups = [r.group for r in records]
    sel = params.training["selection"]
    head = (f"{runs_path}: {len(records)} runs ({PACKAGED_FAMILY}; the fit chose {params.training['chosen']}; "
            f"{sel['folds']} folds, CV seeds {sel['cv_seeds']})")

    def metrics(found: np.ndarray) -> dict:
        Q = np.stack([veto_normal(p, ni, found) for p in P])
        pred = Q.argmax(2)
        acc = (pred == y).mean(1)
        recalls = [(pred[:, y == k] == k).mean(1) for k in np.unique(y)]
        return {"accuracy": float(acc.mean()), "accuracy_per_seed": [float(a) for a in acc],
                "balanced_accuracy": float(np.mean(recalls, axis=0).mean()),
                "ece": float(np.mean([ece_with_interval(y, q, labels, groups, n_boot=0)[0] for q in Q])),
                "lesions_read_normal": float((pred[:, y != ni] == ni).sum(1).mean()),
                "normals_read_normal": float((pred[:, y == ni] == ni).sum(1).mean()),
                "n_lesions": int((y != ni).sum()), "n_normals": int((y == ni).sum())}

    out = {"today": metrics(lesion_found(records, None))}
    out.update({f"recheck>={t:g}": metrics(lesion_found(records, t)) for t in THRESHOLDS})
    return out, head


def decide(main: dict, replication: dict) -> tuple[float | None, list[str]]:
    """The pre-registered rule: the τ with the highest mean accuracy on the main runs that passes
    all four conditions (ties within ``TIE`` to the higher τ), and why each τ passed or not."""
    today, rep_today = main["today"], replication["today"]
    why, passing = [], []
    for t in THRESHOLDS:
        a, r = main[f"recheck>={t:g}"], replication[f"recheck>={t:g}"]
        checks = {
            f"gain >= {MIN_GAIN}": a["accuracy"] - today["accuracy"] >= MIN_GAIN,
            "balanced not lower": a["balanced_accuracy"] >= today["balanced_accuracy"],
            "no CV seed lower": all(x >= y for x, y in zip(a["accuracy_per_seed"], today["accuracy_per_seed"])),
            "replication not lower": r["accuracy"] >= rep_today["accuracy"],
        }
        why.append(f"tau {t:g}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()))
        if all(checks.values()):
            passing.append(t)
    if not passing:
        return None, why
    best = max(main[f"recheck>={t:g}"]["accuracy"] for t in passing)
    return max(t for t in passing if main[f"recheck>={t:g}"]["accuracy"] >= best - TIE), why


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--fusion", required=True)
    ap.add_argument("--replication-runs", required=True)
    ap.add_argument("--replication-fusion", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    lines: list[str] = []
    results = {}
    for name, runs, fusion in (("B", a.runs, a.fusion), ("B1", a.replication_runs, a.replication_fusion)):
        res, head = arms(runs, fusion)
        results[name] = res
        lines.append(f"[{name}] {head}")
        for arm, m in res.items():
            lines.append(f"  {arm:14s} accuracy {m['accuracy']:.4f} (seeds {', '.join(f'{x:.4f}' for x in m['accuracy_per_seed'])})  "
                         f"balanced {m['balanced_accuracy']:.4f}  ECE {m['ece']:.4f}  "
                         f"hydronephrosis read normal {m['lesions_read_normal']:.1f} of {m['n_lesions']}  "
                         f"normals read normal {m['normals_read_normal']:.1f} of {m['n_normals']}")
    tau, why = decide(results["B"], results["B1"])
    lines += why
    lines.append("decision: " + (f"adopt normal_veto_recheck = {tau:g}" if tau is not None else "none passes: not adopted"))
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kidney_veto_recheck.txt").write_text(text + "\n")
    (out / "kidney_veto_recheck.json").write_text(json.dumps({"arms": results, "adopt": tau}, indent=1) + "\n")


if __name__ == "__main__":
    main()
