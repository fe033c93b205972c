"""Localization F1@0.5 of the agent's findings on cached runs, for several secondary-finding scores.

    SMS="0.25 0.35 0.5 9" python docs/experiments/secondary_findings/loc_check.py RUNS.jsonl FUSION.json [RUNS FUSION ...]

Every run's evidence goes through ``LearnedFusion`` (the fusion's model-identity check set aside: the
runs may come from fold or single-center models) with ``secondary_min_score`` set to each value of
``$SMS`` (9 = the leading finding only); the findings are scored against the boxes of the staged
manifests (``/tmp/echo_data/<center>/all.csv``, ``tools/prepare_data.py``) as ``echo-agent eval``
scores them. Nothing is fitted. DECISION.md in this folder.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from pathlib import Path

from echo_agent.eval.metrics import PredictedBox, ScoredImage, detection_score
from echo_agent.fusion.learned import FusionParams, LearnedFusion
from echo_agent.organs import get_organ
from echo_agent.schemas import Box
from echo_agent.training.fusion_fit import load_runs

MANIFESTS = Path(os.environ.get("ECHO_MANIFESTS", "/tmp/echo_data"))


def true_boxes() -> dict[str, list[Box]]:
    """Boxes by run key (``<center>:<path inside the dataset folder>``)."""
    out: dict[str, list[Box]] = {}
    for manifest in MANIFESTS.glob("*/all.csv"):
        for row in csv.DictReader(manifest.open()):
            if row["x_min"]:
                key = row["center"] + ":" + "/".join(Path(row["image"]).parts[5:])
                out.setdefault(key, []).append(Box(x1=float(row["x_min"]), y1=float(row["y_min"]),
                                                   x2=float(row["x_max"]), y2=float(row["y_max"])))
    return out


def main() -> int:
    args = sys.argv[1:]
    if not args or len(args) % 2:
        raise SystemExit(__doc__)
    scores = [float(x) for x in os.environ.get("SMS", "0.25 0.35 0.5 9").split()]
    gt = true_boxes()
    for runs_path, fusion_path in zip(args[::2], args[1::2]):
        runs = load_runs(runs_path)
        params = dataclasses.replace(FusionParams.from_json(Path(fusion_path).read_text(), fusion_path), training={})
        normal = get_organ(params.organ).normal_label
        cells = []
        for s in scores:
            fusion = LearnedFusion({params.organ: params}, secondary_min_score=s)
            images = []
            for r in runs:
                ev, clin = r.parsed()
                dx = fusion.fuse(get_organ(r.organ), ev, clinical=clin, image_size=(r.width, r.height))
                images.append(ScoredImage(key=r.key, true_label=r.label, pred_label=dx.label,
                                          true_boxes=tuple(gt.get(r.key, [])),
                                          pred_boxes=tuple(PredictedBox(box=f.box, label=f.label, score=f.score)
                                                           for f in dx.findings)))
            d = detection_score(images, normal_label=normal)
            cells.append(f">= {s:g}: F1 {d.f1:.3f} P {d.precision:.3f} R {d.recall:.3f}")
        print(Path(runs_path).name, "|", " || ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
