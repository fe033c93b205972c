"""Cross-center scoring of the soup arms (PREREGISTRATION.md in this folder).

    python docs/experiments/classifier_soup/score.py --work runs/classifier_soup --singles runs/breast_probe

For each source center: S0 = ``<singles>/F_<source>.onnx``, S1 = ``<singles>/Fs1_<source>.onnx`` (or
``<work>/Fs1_<source>.onnx``), SOUP = ``<work>/SOUP_<source>.onnx``, ENS = the mean of S0's and S1's
probabilities; each scored on the other center's train + val images with ``tools/eval_classifier.py``'s
``evaluate`` (as ``docs/experiments/breast_probe/xc_eval.py``). Writes ``<work>/xc.json``. Never reads
a test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "docs" / "experiments" / "breast_probe"))

from eval_classifier import evaluate  # noqa: E402
from xc_eval import DIRECTIONS, METRICS, MeanOf  # noqa: E402

from echo_agent.detectors import load_region_classifier  # noqa: E402
from echo_agent.eval.datasets import load_split  # noqa: E402
from echo_agent.organs import get_organ  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--singles", type=Path, required=True)
    args = ap.parse_args()
    organ = get_organ("breast")
    out: dict = {"split": "train+val", "directions": {}}
    for source, target in DIRECTIONS.items():
        s1 = args.singles / f"Fs1_{source}.onnx"
        s1 = s1 if s1.exists() else args.work / f"Fs1_{source}.onnx"
        s0c, s1c = load_region_classifier(args.singles / f"F_{source}.onnx"), load_region_classifier(s1)
        arms = (("S0", s0c), ("S1", s1c), ("SOUP", load_region_classifier(args.work / f"SOUP_{source}.onnx")),
                ("ENS", MeanOf(s0c, s1c)))
        images = load_split(target, "train+val")
        res = {name: evaluate(clf, images, organ) for name, clf in arms}
        out["directions"][f"{source}->{target}"] = res
        for name, r in res.items():
            print(f"{source:>20s} -> {target:20s} {name:4s}: " + ", ".join(
                f"{k} {r[k]:.3f}" if isinstance(r.get(k), float) else f"{k} {r.get(k)}"
                for k in (*METRICS, "auc_whole_lesion_vs_normal", "lesion_images_called_normal")), flush=True)
    names = ("S0", "S1", "SOUP", "ENS")
    scores = {n: sum(out["directions"][d][n][m] for d in out["directions"] for m in METRICS)
              / (len(METRICS) * len(out["directions"])) for n in names}
    scores["mean_of_singles"] = (scores["S0"] + scores["S1"]) / 2
    out["score_mean_of_4_aucs"] = scores
    out["rule_1_soup_minus_singles"] = scores["SOUP"] - scores["mean_of_singles"]
    print("mean of the four malignant AUCs:", json.dumps({k: round(v, 4) for k, v in scores.items()}))
    (args.work / "xc.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
