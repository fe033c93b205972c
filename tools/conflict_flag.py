#!/usr/bin/env python
"""How the reason node's evidence-conflict flag behaves on an eval run.

    echo-agent eval /tmp/echo_data/busi/val.csv --out runs/eval/busi_val
    python tools/conflict_flag.py runs/eval/busi_val/predictions.jsonl [more predictions.jsonl ...]

A Diagnosis whose label is not the organ's positive one is flagged (``indeterminate`` with an
"evidence conflict" reason) when the top candidate shows enough of the organ's suspicious
descriptor values (``OrganSpec.suspicious_descriptors``). Reported, per center and overall: how
often the flag fires, and among the images the agent does not label positive, the true-positive
rate of flagged vs unflagged images (the adoption test of
docs/experiments/conflict_flag/PREREGISTRATION.md asks for a flag rate <= 25 % and a flagged rate at
least twice the unflagged one, on val).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

CONFLICT = "evidence conflict"


def _rows(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        for line in open(path, encoding="utf-8"):
            rec = json.loads(line)
            dx = (rec.get("agent") or {}).get("diagnosis")
            if not dx:
                continue  # the agent failed on this image: nothing to flag
            rows.append({
                "center": rec.get("center") or "?", "truth": (rec.get("truth") or {}).get("label"),
                "label": dx["label"], "flag": CONFLICT in (dx.get("indeterminate_reason") or ""),
            })
    return rows


def summarise(rows: list[dict[str, Any]], positive: str) -> dict[str, Any]:
    """Flag rate and positive rates of flagged / unflagged non-positive readings."""
    rest = [r for r in rows if r["label"] != positive]
    flagged = [r for r in rest if r["flag"]]
    unflagged = [r for r in rest if not r["flag"]]

    def pos(xs: list[dict[str, Any]]) -> int:
        return sum(r["truth"] == positive for r in xs)

    out: dict[str, Any] = {
        "images": len(rows), "flagged": len(flagged), "flag_rate": len(flagged) / max(len(rows), 1),
        "flagged_positive": pos(flagged), "unflagged_positive": pos(unflagged),
        "unflagged_non_positive_readings": len(unflagged),
        "flagged_truth": {k: sum(r["truth"] == k for r in flagged) for k in sorted({r["truth"] for r in rows})},
    }
    out["flagged_positive_rate"] = pos(flagged) / len(flagged) if flagged else None
    out["unflagged_positive_rate"] = pos(unflagged) / len(unflagged) if unflagged else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", nargs="+", help="predictions.jsonl files of echo-agent eval runs")
    ap.add_argument("--positive", default="malignant", help="the organ's positive label")
    args = ap.parse_args(argv)
    rows = _rows(args.predictions)
    if not rows:
        print("no agent diagnosis in the given files")
        return 1
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["center"]].append(r)
    groups["all"] = rows
    for name, rs in groups.items():
        s = summarise(rs, args.positive)
        fr = "-" if s["flagged_positive_rate"] is None else f"{s['flagged_positive_rate']:.3f}"
        ur = "-" if s["unflagged_positive_rate"] is None else f"{s['unflagged_positive_rate']:.3f}"
        print(f"{name}: {s['images']} images, flagged {s['flagged']} ({s['flag_rate']:.1%}); "
              f"{args.positive} among flagged {s['flagged_positive']}/{s['flagged']} ({fr}), among unflagged "
              f"non-{args.positive} readings {s['unflagged_positive']}/{s['unflagged_non_positive_readings']} ({ur}); "
              f"flagged truth {s['flagged_truth']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
