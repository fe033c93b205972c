"""Cross-center scoring of breast second looks for PREREGISTRATION.md (this folder).

    python docs/experiments/breast_probe/xc_eval.py --work runs/breast_probe
    python docs/experiments/breast_probe/xc_eval.py --work runs/breast_probe --mirror   # the addendum
    python docs/experiments/breast_probe/xc_eval.py --work runs/breast_probe --against D   # addendum 2

Reads ``<work>/F_<source>.onnx`` (fine-tuned) and ``<work>/P_<source>.onnx`` (probe) for each source
center, scores them and their probability average on the other center's train + val images with
``tools/eval_classifier.py``'s ``evaluate``, and writes ``<work>/xc.json``. With ``--mirror``: the
fine-tuned ones alone and with mirror averaging (``<work>/xc_mirror.json``); with ``--against D``: F
against ``<work>/D_<source>.onnx`` (``<work>/xc_D.json``). Never reads a test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
from eval_classifier import evaluate  # noqa: E402

from echo_agent.detectors import load_region_classifier  # noqa: E402
from echo_agent.eval.datasets import load_split  # noqa: E402
from echo_agent.organs import get_organ  # noqa: E402

DIRECTIONS = {"busi": "breast_lesions_usg", "breast_lesions_usg": "busi"}
METRICS = ("auc_lesion_boxes", "auc_whole_lesion_images")


class MeanOf:
    """Two region classifiers with the same labels; each crop gets the mean of their probabilities."""

    def __init__(self, a, b) -> None:  # noqa: ANN001 - library objects
        if tuple(a.labels) != tuple(b.labels):
            raise ValueError(f"labels differ: {a.labels} vs {b.labels}")
        self.labels = a.labels
        self.a, self.b = a, b

    def classify(self, image, boxes):  # noqa: ANN001, ANN201
        pa, pb = self.a.classify(image, boxes), self.b.classify(image, boxes)
        return [{k: (x[k] + y[k]) / 2 for k in x} for x, y in zip(pa, pb, strict=True)]


class WithMirror:
    """A region classifier whose probabilities for each crop are averaged with its horizontal mirror's."""

    def __init__(self, clf) -> None:  # noqa: ANN001 - library object
        self.labels, self.clf = clf.labels, clf

    def classify(self, image, boxes):  # noqa: ANN001, ANN201
        w = image.shape[1]
        mirrored = np.ascontiguousarray(image[:, ::-1])
        mboxes = [None if b is None else b.model_copy(update={"x1": w - b.x2, "x2": w - b.x1}) for b in boxes]
        pa, pb = self.clf.classify(image, boxes), self.clf.classify(mirrored, mboxes)
        return [{k: (x[k] + y[k]) / 2 for k in x} for x, y in zip(pa, pb, strict=True)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--mirror", action="store_true", help="F alone and F with mirror averaging (the addendum)")
    ap.add_argument("--f-prefix", default="F", help="file prefix of the fine-tuned models (addendum 3: Fs1)")
    ap.add_argument("--sources", nargs="+", default=list(DIRECTIONS), choices=list(DIRECTIONS))
    ap.add_argument("--against", default=None, metavar="PREFIX",
                    help="F against the classifiers <work>/PREFIX_<source>.onnx (addendum 2)")
    args = ap.parse_args()
    organ = get_organ("breast")
    out: dict = {"split": "train+val", "directions": {}}
    for source in args.sources:
        target = DIRECTIONS[source]
        images = load_split(target, "train+val")
        f = load_region_classifier(args.work / f"{args.f_prefix}_{source}.onnx")
        if args.against:
            candidates = (("F", f), (args.against, load_region_classifier(args.work / f"{args.against}_{source}.onnx")))
        elif args.mirror:
            candidates = (("F", f), ("M", WithMirror(f)))
        else:
            p = load_region_classifier(args.work / f"P_{source}.onnx")
            candidates = (("F", f), ("P", p), ("E", MeanOf(f, p)))
        res = {name: evaluate(clf, images, organ) for name, clf in candidates}
        out["directions"][f"{source}->{target}"] = res
        for name, r in res.items():
            print(f"{source:>20s} -> {target:20s} {name}: " + ", ".join(
                f"{k} {r[k]:.3f}" if isinstance(r.get(k), float) else f"{k} {r.get(k)}"
                for k in (*METRICS, "auc_whole_lesion_vs_normal", "acc_lesion_boxes", "lesion_images_called_normal")), flush=True)
    scores = {name: sum(out["directions"][d][name][m] for d in out["directions"] for m in METRICS)
              / (len(METRICS) * len(out["directions"])) for name in res}
    out["score_mean_of_4_aucs"] = scores
    print("score (mean of the malignant AUCs):", json.dumps({k: round(v, 4) for k, v in scores.items()}))
    (args.work / (f"xc_{args.against}.json" if args.against else "xc_mirror.json" if args.mirror else "xc.json")).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
