"""Read-outs of PREREGISTRATION.md in this folder: a presence veto driven by a breast segmenter.

    python docs/experiments/breast_presence_seg/presence_seg.py \\
        NAME RUNS.jsonl FUSION.json SEGMENTER [NAME RUNS FUSION SEGMENTER ...] --choose-on NAME --out F.json

``SEGMENTER`` is one ONNX file, or a pattern with ``{k}`` for out-of-fold runs (the image's
cross-fitting fold of ``--folds`` picks the file). Each run's image gets the segmenter's whole-image
P(lesion) (the second look's whole-image crop of the detector's preprocessed view); each run's evidence
goes through ``LearnedFusion`` with the fusion as it is (``explore.py`` of presence_veto). Printed per
set: the separation among the images read normal (AUC lesion vs normal, the segmenter and the second
look), and for each t of the grid the readings with the veto (a normal reading becomes the strongest
lesion class when P(lesion) >= t). t is chosen on ``--choose-on`` only. Nothing else is fitted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "presence_veto"))
from explore import summary  # noqa: E402  (the presence-veto exploration's counts, reused as they are)

GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def fused(runs: list, params) -> list[dict[str, float]]:
    """The fusion's probabilities for each run (normal veto as the fusion has it)."""
    from echo_agent.fusion.learned import LearnedFusion
    from echo_agent.organs import get_organ

    fusion = LearnedFusion({params.organ: params})
    out = []
    for r in runs:
        ev, clin = r.parsed()
        out.append(fusion.fuse(get_organ(r.organ), ev, clinical=clin, image_size=(r.width, r.height)).probabilities)
    return out


def second_look_lesion(runs: list, normal: str) -> np.ndarray:
    """1 - the second look's whole-image P(normal) of each run (NaN where it has none)."""
    from echo_agent.fusion.evidence import RunEvidence

    out = []
    for r in runs:
        whole = RunEvidence.of(r.parsed()[0]).whole_image
        out.append(np.nan if whole is None else 1.0 - whole.probabilities[normal])
    return np.array(out)


def segmenter_lesion(runs: list, pattern: str, folds: int) -> np.ndarray:
    """The segmenter's whole-image P(lesion) of each run's image."""
    from PIL import Image

    from echo_agent.detectors import OnnxRegionClassifier
    from echo_agent.eval.datasets import load_split
    from echo_agent.eval.splits import cross_fit_fold, cv_group
    from echo_agent.imaging.preprocess import prepare_for_detection

    centers = sorted({r.key.split(":", 1)[0] for r in runs})
    images = {im.key: im for c in centers for im in load_split(c, "train+val")}
    models: dict[str, OnnxRegionClassifier] = {}
    out = []
    for r in runs:
        im = images[r.key]
        path = pattern.format(k=cross_fit_fold(cv_group(im), folds)) if "{k}" in pattern else pattern
        clf = models.setdefault(path, OnnxRegionClassifier(path))
        with Image.open(im.image) as pil:
            arr = np.asarray(pil.convert("RGB"))
        out.append(clf.classify(prepare_for_detection(arr).array, [None])[0][clf.labels[1]])
    return np.array(out)


def vetoed(probs: list[dict[str, float]], p_lesion: np.ndarray, t: float, normal: str) -> list[str]:
    labels = []
    for pr, p in zip(probs, p_lesion, strict=True):
        label = max(pr, key=pr.__getitem__)
        if label == normal and p >= t:
            label = max((k for k in pr if k != normal), key=pr.__getitem__)
        labels.append(label)
    return labels


def separation(truth: list[str], labels: list[str], score: np.ndarray, normal: str) -> dict:
    from sklearn.metrics import roc_auc_score

    sel = [i for i, lb in enumerate(labels) if lb == normal and not np.isnan(score[i])]
    y = np.array([truth[i] != normal for i in sel])
    s = score[sel]
    res = {"read_normal": len(sel), "lesions": int(y.sum()), "normals": int((~y).sum()),
           "median_lesion": round(float(np.median(s[y])), 4) if y.any() else None,
           "median_normal": round(float(np.median(s[~y])), 4) if (~y).any() else None}
    if 0 < y.sum() < len(y):
        res["auc"] = round(float(roc_auc_score(y, s)), 4)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", help="NAME RUNS.jsonl FUSION.json SEGMENTER, repeated")
    ap.add_argument("--choose-on", required=True, help="the set whose accuracy picks t")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if len(args.sets) % 4:
        ap.error("give NAME RUNS FUSION SEGMENTER quadruples")
    from echo_agent.fusion.learned import FusionParams
    from echo_agent.organs import get_organ
    from echo_agent.training.fusion_fit import load_runs

    results = {}
    for name, runs_path, fusion_path, seg in zip(*[iter(args.sets)] * 4, strict=True):
        runs = load_runs(runs_path)
        params = FusionParams.from_json(Path(fusion_path).read_text(), fusion_path)
        params = dataclasses.replace(params, training={})  # fold models' runs, read as the fit read them
        normal = get_organ(params.organ).normal_label
        probs = fused(runs, params)
        before = [max(p, key=p.__getitem__) for p in probs]
        truth = [r.label for r in runs]
        seg_p = segmenter_lesion(runs, seg, args.folds)
        res = {"runs": runs_path, "fusion": fusion_path, "segmenter": seg, "without": summary(runs, before, normal),
               "separation": {"segmenter": separation(truth, before, seg_p, normal),
                              "second_look": separation(truth, before, second_look_lesion(runs, normal), normal)},
               "lesion_share_at_or_above": {str(t): round(float((seg_p[[x != normal for x in truth]] >= t).mean()), 4)
                                            for t in GRID},
               "veto": {str(t): summary(runs, vetoed(probs, seg_p, t, normal), normal) for t in GRID}}
        results[name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k not in ("runs", "fusion", "segmenter")}), flush=True)
    if args.choose_on not in results:
        ap.error(f"--choose-on {args.choose_on!r} is not one of the sets {sorted(results)}")
    acc = {t: results[args.choose_on]["veto"][str(t)]["accuracy"] for t in GRID}
    chosen = max(GRID, key=lambda t: (acc[t], -t))
    table = {name: {"without": r["without"], "with": r["veto"][str(chosen)]} for name, r in results.items()}
    print("chosen t", chosen, "on", args.choose_on, json.dumps(table, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"chosen_t": chosen, "chosen_on": args.choose_on, "table": table,
                                    "results": results, "command": " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
