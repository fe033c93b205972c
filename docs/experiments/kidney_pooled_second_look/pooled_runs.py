"""The pooled second look's out-of-fold runs, from two run sets that differ only in their second look.

    python docs/experiments/kidney_pooled_second_look/pooled_runs.py A.jsonl B.jsonl --out POOLED.jsonl

Every run of ``B`` (same keys, tool calls and classified regions as ``A``: checked, else it stops)
with each classified region's probabilities replaced by the log-linear pool of ``A``'s and ``B``'s for
that region (:func:`echo_agent.training.classifier_pool.pool_probabilities`, what the pooled ONNX file
computes), and the classifier named ``pool(<A's>+<B's>)``. Also prints the whole-image AUC of A, B and
the pool out of fold, overall and by the dataset's given fold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _classifications(run: dict) -> list[dict]:
    return [e for e in run["evidence"] if e["kind"] == "classification"]


def _regions(cls: list[dict]) -> list:
    return [[(r["box"], r["detection_id"]) for r in e["regions"]] for e in cls]


def _max_lesion(a: dict[str, float], b: dict[str, float], normal: str = "normal") -> dict[str, float]:
    """Two-label pool that keeps the larger lesion probability."""
    (lesion,) = [k for k in a if k != normal]
    p = max(a[lesion], b[lesion])
    return {normal: 1.0 - p, lesion: p}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pool", choices=("log_linear", "max"), default="log_linear",
                    help="log_linear: pool_probabilities; max (the addendum): P(lesion) = the larger of the two")
    args = ap.parse_args()
    from sklearn.metrics import roc_auc_score

    from echo_agent.training.classifier_pool import pool_probabilities

    a = {r["key"]: r for r in map(json.loads, args.a.read_text().splitlines()) if r}
    b_runs = [json.loads(x) for x in args.b.read_text().splitlines() if x.strip()]
    if set(a) != {r["key"] for r in b_runs}:
        raise SystemExit("the two run sets hold different images")
    whole: dict[str, list[float]] = {"a": [], "b": [], "pool": []}
    truth, folds = [], []
    out = []
    for rb in b_runs:
        ra = a[rb["key"]]
        ca, cb = _classifications(ra), _classifications(rb)
        if [e["kind"] for e in ra["evidence"]] != [e["kind"] for e in rb["evidence"]] or _regions(ca) != _regions(cb):
            raise SystemExit(f"{rb['key']}: the runs differ in more than the second look's answers")
        for ea, eb in zip(ca, cb, strict=True):
            eb["classifier"] = f"pool({ea['classifier']}+{eb['classifier']})"
            for rga, rgb in zip(ea["regions"], eb["regions"], strict=True):
                pooled = (pool_probabilities([rga["probabilities"], rgb["probabilities"]]) if args.pool == "log_linear"
                          else _max_lesion(rga["probabilities"], rgb["probabilities"]))
                if rgb["box"] is None:
                    for name, p in (("a", rga["probabilities"]), ("b", rgb["probabilities"]), ("pool", pooled)):
                        whole[name].append(1.0 - p["normal"])
                rgb["probabilities"] = pooled
        truth.append(rb["label"] != "normal")
        folds.append(rb["key"].split(":", 1)[1].split("/", 1)[0])
        out.append(json.dumps(rb))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out) + "\n")
    y, f = np.array(truth), np.array(folds)
    for name, p in whole.items():
        p = np.array(p)
        by_fold = {k: round(float(roc_auc_score(y[f == k], p[f == k])), 4) for k in sorted(set(folds))}
        print(f"{name}: whole-image AUC out of fold {roc_auc_score(y, p):.4f}; by given fold {by_fold}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
