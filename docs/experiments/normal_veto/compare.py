"""Before / after table of two eval runs (``metrics.json`` of ``echo-agent eval``), breast organ.

    python docs/experiments/normal_veto/compare.py "BUSI test,BEFORE/metrics.json,AFTER/metrics.json" ...
"""

from __future__ import annotations

import json
import sys
from typing import Any


def row(path: str) -> dict[str, Any]:
    """Localization F1, accuracy (agent and detector), AUC, ECE, normal readings and referral rate."""
    m = json.load(open(path))["organs"]["breast"]["overall"]
    agent, detector = m["agent"], m["detector"]
    cls = agent["classification"]
    labels, matrix = cls["confusion"]["labels"], cls["confusion"]["matrix"]
    ni = labels.index("normal")
    lesion_rows = [i for i in range(len(labels)) if i != ni]
    return {
        "loc": agent["localization"]["f1"], "acc": cls["accuracy"], "det_acc": detector["classification"]["accuracy"],
        "auc": agent["auc"]["value"], "ece": agent["calibration"]["ece"],
        "les_normal": f"{sum(matrix[i][ni] for i in lesion_rows)}/{sum(sum(matrix[i]) for i in lesion_rows)}",
        "nor_kept": f"{matrix[ni][ni]}/{sum(matrix[ni])}", "referred": agent["referral"]["referred_rate"],
    }


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        label, before, after = arg.split(",")
        b, a = row(before), row(after)
        print(label)
        for k in b:
            print(f"   {k:10s} {_fmt(b[k]):>8s} -> {_fmt(a[k]):>8s}")
