"""Out-of-fold detector comparison over the kidney development pool (PREREGISTRATION.md here).

    python docs/experiments/kidney_lite_pool/det_cv.py --work runs/kidney_lite_pool \
        --detectors scratch=runs/kidney_probe_pool/kidney_det{k}.onnx lite=runs/kidney_lite_pool/lite_det{k}.onnx

For each of the 3 cross-fitting folds of the pool (train + val, ``cross_fit_fold(cv_group, 3)``), writes
the fold's manifest and runs ``echo-agent eval`` on it with each set's fold-``k`` detector (the
transparent fusion, no second look: only the detector-only column is read): localization F1@0.5 at the
operating threshold (0.25), its TP/FP/FN, and the detector-only AUC (top score, hydronephrosis vs
normal). Pooled F1 from the summed counts. Writes ``<work>/det_cv.json``. Never reads test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from echo_agent.eval.datasets import load_split  # noqa: E402
from echo_agent.eval.manifest import write_manifest  # noqa: E402
from echo_agent.eval.splits import cross_fit_fold, cv_group  # noqa: E402

FOLDS = 3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--detectors", nargs="+", required=True, metavar="NAME=PATTERN",
                    help="a set of fold detectors; {k} in the path is the fold")
    args = ap.parse_args()
    sets = dict(d.split("=", 1) for d in args.detectors)
    pool = load_split("hydronephrosis_ncnu", "train+val")
    out: dict = {"n": len(pool), "folds": {}, "pooled": {}}
    exe = Path(sys.executable).with_name("echo-agent")
    for k in range(FOLDS):
        fold = [im for im in pool if cross_fit_fold(cv_group(im), FOLDS) == k]
        manifest = args.work / f"pool_fold{k}.csv"
        write_manifest(fold, manifest, overwrite=True)
        out["folds"][k] = {"n": len(fold)}
        for name, pattern in sets.items():
            res = args.work / f"eval_{name}_fold{k}"
            subprocess.run([str(exe), "eval", str(manifest), "--out", str(res), "--organ", "kidney", "--overwrite",
                            "--fusion", "heuristic", "--classifier", "none", "--detector", pattern.format(k=k)],
                           check=True, capture_output=True, text=True)
            det = json.loads((res / "metrics.json").read_text())["organs"]["kidney"]["overall"]["detector"]
            loc = det["localization"]
            row = {"tp": loc["tp"], "fp": loc["fp"], "fn": loc["fn"], "f1": loc["f1"],
                   "recall": loc["recall"], "precision": loc["precision"],
                   "auc": (det.get("auc") or {}).get("value"), "accuracy": det["classification"]["accuracy"]}
            out["folds"][k][name] = row
            print(f"fold {k} ({len(fold)} frames) {name:8s} " + json.dumps({a: round(b, 3) if isinstance(b, float) else b
                                                                          for a, b in row.items()}), flush=True)
    for name in sets:
        tp, fp, fn = (sum(out["folds"][k][name][c] for k in range(FOLDS)) for c in ("tp", "fp", "fn"))
        out["pooled"][name] = {"tp": tp, "fp": fp, "fn": fn, "f1": 2 * tp / (2 * tp + fp + fn),
                               "mean_auc": sum(out["folds"][k][name]["auc"] for k in range(FOLDS)) / FOLDS}
        print(f"pooled {name:8s} {json.dumps(out['pooled'][name])}")
    (args.work / "det_cv.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
