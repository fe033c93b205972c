#!/usr/bin/env python
"""Agreement of the agent's assessment categories with the readers' (e.g. BI-RADS on BrEaST).

    python tools/category_agreement.py runs/eval/breast_lesions_usg_test/predictions.jsonl

Reads an ``echo-agent eval`` predictions file (``truth.category`` = the reader's category,
``agent.diagnosis.category`` = the agent's) and prints exact and within-one-step agreement on the
organ's ordinal scale, the reader x agent table, and the agent's category counts. ``--json`` writes
the numbers to a file too.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from echo_agent.eval.metrics import category_agreement, normalise_category
    from echo_agent.organs import get_organ

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--organ", default="breast")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    spec = get_organ(args.organ)
    order = spec.category_scale
    truth, pred = [], []
    for line in args.predictions.read_text().splitlines():
        row = json.loads(line)
        if row.get("organ") != spec.name:
            continue
        dx = (row.get("agent") or {}).get("diagnosis") or {}
        t = row.get("truth") or {}
        truth.append(t.get("category", t.get("birads")))  # "birads": files written before 2026-12
        pred.append(dx.get("category"))
    a = category_agreement(truth, pred, order)
    if a.unscored:
        print("not scored, reader categories on no step of the scale: "
              + ", ".join(f"{v!r} ({k})" for v, k in a.unscored), file=sys.stderr)
    if not a.n:
        print("no image has a reader category on the scale", file=sys.stderr)
        return 1
    print(f"{a.n} images with a reader category: exact {a.exact:.3f}, within one step {a.within_one:.3f}"
          + (f" ({a.n_missing} without an agent category)" if a.n_missing else "")
          + (f"; {a.n_coarse} scored at a coarser level (e.g. 4 for 4A-4C)" if a.n_coarse else ""))
    print("reader \\ agent " + " ".join(f"{c:>4}" for c in a.order))
    for c, row in zip(a.reader_order, a.confusion):
        print(f"{c:>14} " + " ".join(f"{v:>4}" for v in row))
    counts = collections.Counter(normalise_category(p) for p in pred if p)
    print("agent categories: " + ", ".join(f"{c} {counts.get(c, 0)}" for c in a.order))
    if args.json:
        args.json.write_text(json.dumps({"n": a.n, "exact": a.exact, "within_one": a.within_one, "order": a.order,
                                         "reader_order": a.reader_order, "confusion": a.confusion,
                                         "n_missing": a.n_missing, "n_coarse": a.n_coarse,
                                         "unscored": dict(a.unscored)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
