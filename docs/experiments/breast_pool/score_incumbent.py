#!/usr/bin/env python
"""Score a fixed (already fitted) breast fusion on cached out-of-fold runs, as pre-registered.

    python docs/experiments/breast_pool/score_incumbent.py RUNS.jsonl [--fusion F.json] [--split train]

RUNS.jsonl is the ``--runs-cache`` of ``tools/train_policy.py``; only the runs of images in
``--split`` (of the fusion's centers) are scored, so a fusion fitted on val is scored on images it
never saw. Prints n, log-loss, accuracy, balanced accuracy and ECE with its group-bootstrap interval.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from echo_agent.eval.datasets import load_split
from echo_agent.fusion.learned import LOGISTIC, load_fusion_params, softmax
from echo_agent.organs import get_organ
from echo_agent.training.fusion_fit import RunRecord, _balanced_accuracy, ece_with_interval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--fusion", default=None, help="fusion JSON (default: the packaged breast fusion)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--centers", nargs="+", default=["busi", "breast_lesions_usg"])
    args = ap.parse_args()

    params = load_fusion_params("breast", args.fusion)
    keys = {im.key for c in args.centers for im in load_split(c, args.split)}
    recs = [RunRecord(**json.loads(line)) for line in args.runs.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.key in keys]
    spec = get_organ("breast")
    labels = list(params.labels)
    probs = []
    for r in recs:
        logits = r.rule_log_probs(params.kind) if params.kind != LOGISTIC else params.logits(r.features())
        probs.append(softmax(np.asarray(logits) / params.temperature))
    P = np.array(probs)
    y = np.array([labels.index(r.label) for r in recs])
    pred = P.argmax(1)
    ece, ci = ece_with_interval(y, P, labels, [r.group for r in recs])
    out = {
        "fusion": args.fusion or "packaged", "split": args.split, "n": len(recs), "organ": spec.name,
        "log_loss": round(float(-np.log(np.clip(P[np.arange(len(y)), y], 1e-12, None)).mean()), 4),
        "accuracy": round(float((pred == y).mean()), 4),
        "balanced_accuracy": round(_balanced_accuracy(y, pred, len(labels)), 4),
        "ece": round(float(ece), 4), "ece_ci": [round(float(v), 4) for v in ci] if ci else None,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
