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
from typing import Any


def _load(path: str) -> dict[str, dict[str, Any]]:
    with open(path) as f:
        return {row["key"]: row for row in map(json.loads, f)}


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def _boxes(row: dict[str, Any], who: str) -> tuple[list[list[float]], list[float]]:
    if who == "agent":
        found = [f for f in row["agent"]["diagnosis"].get("findings") or [] if f.get("box")]
        return [[f["box"][c] for c in ("x1", "y1", "x2", "y2")] for f in found], [round(f["score"], 2) for f in found]
    dets = row["detector"]["detections"]
    return [d["box"] for d in dets], [round(d["score"], 2) for d in dets]


def hits(row: dict[str, Any], who: str) -> tuple[int, int, list[float]]:
    boxes, scores = _boxes(row, who)
    truth = row["truth"]["boxes"]
    return sum(any(_iou(t, b) >= 0.5 for b in boxes) for t in truth), len(boxes), scores


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
