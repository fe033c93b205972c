#!/usr/bin/env python
"""Images whose lesion hits differ between two ``echo-agent eval`` runs (agent and detector alone).

    python docs/experiments/detector_weight_average_packaged/agent_diff.py \
        runs/det_swa2/val_shipped/predictions.jsonl runs/det_swa2/val_swa/predictions.jsonl

One line per image where the agent's reported boxes hit a different number of ground-truth boxes
(IoU >= 0.5) in the two runs: truth label and box count, then per run the agent's (hits, boxes,
scores) and the detector's (hits, boxes) at the harness's threshold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def _load(path: str) -> dict[str, dict[str, Any]]:
    with open(path) as f:
        return {row["key"]: row for row in map(json.loads, f)}


def _boxes(row: dict[str, Any], who: str) -> tuple[list[list[float]], list[float]]:
    if who == "agent":
        found = [f for f in row["agent"]["diagnosis"].get("findings") or [] if f.get("box")]
        return [[f["box"][c] for c in ("x1", "y1", "x2", "y2")] for f in found], [round(f["score"], 2) for f in found]
    dets = row["detector"]["detections"]
    return [d["box"] for d in dets], [round(d["score"], 2) for d in dets]


def hits(row: dict[str, Any], who: str) -> tuple[int, int, list[float]]:
    from echo_agent.detectors.postprocess import box_iou

    boxes, scores = _boxes(row, who)
    truth = row["truth"]["boxes"]
    return int((box_iou(truth, boxes) >= 0.5).any(axis=1).sum()), len(boxes), scores


def main(a: str, b: str) -> None:
    first, second = _load(a), _load(b)
    for key, row in first.items():
        if key not in second:
            continue
        x, y = hits(row, "agent"), hits(second[key], "agent")
        if x[:2] != y[:2]:
            print(f"{key[:40]:40s} {row['truth']['label']:9s} truth {len(row['truth']['boxes'])} | "
                  f"agent {x} detector {hits(row, 'detector')[:2]} || agent {y} detector {hits(second[key], 'detector')[:2]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
