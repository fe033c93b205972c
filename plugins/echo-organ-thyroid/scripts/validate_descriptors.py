#!/usr/bin/env python
"""How the plug-in's TI-RADS descriptors relate to the radiologists' categories on DDTI.

    python plugins/echo-organ-thyroid/scripts/validate_descriptors.py --split train [--json out.json]

Describes each sample's ground-truth box with the captioner (its own segmentation, as in the agent),
counts the suspicious descriptor values the organ lists (``suspicious_descriptors``: solid,
hypoechoic or markedly hypoechoic, taller-than-wide, echogenic foci; Kwak's irregular margin is left
out, see organ.yaml) and reports,
per TI-RADS category, the mean count and how often each value occurs, plus the Spearman correlation
between the count and the category's rank. DDTI has no per-feature reader labels, so this is the
only check the data allows: in the Kwak et al. scheme the category grows with the count.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="train", help="train, val or train+val (never test for choices)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import numpy as np
    from scipy.stats import spearmanr

    from echo_agent.eval.datasets import load_split
    from echo_agent.evidence.captioner import PixelCaptioner
    from echo_agent.imaging import load_image
    from echo_agent.organs import get_organ

    spec = get_organ("thyroid")
    order = [b.name for b in spec.categories]
    cap = PixelCaptioner()
    rows = []
    for im in load_split("ddti", args.split):
        if not im.category or not im.boxes:
            continue
        ctx = cap.describe(load_image(im.image).array, organ="thyroid", regions=[im.boxes[0]])
        d = ctx.regions[0].descriptors
        hits = {k: str(d[k].value) in vals for k, vals in spec.suspicious_descriptors.items() if k in d}
        rows.append((im.category, hits))
    if not rows:
        print("no sample with a category and a box", file=sys.stderr)
        return 1
    by_cat: dict[str, list[dict[str, bool]]] = defaultdict(list)
    for cat, hits in rows:
        by_cat[cat].append(hits)
    keys = list(spec.suspicious_descriptors)
    print(f"{len(rows)} samples of {args.split}; suspicious values: " + ", ".join(
        f"{k} in {list(v)}" for k, v in spec.suspicious_descriptors.items()))
    print(f"{'TI-RADS':>8} {'n':>4} {'count':>6} " + " ".join(f"{k[:12]:>12}" for k in keys))
    table = {}
    for cat in order:
        hs = by_cat.get(cat, [])
        if not hs:
            continue
        mean = float(np.mean([sum(h.values()) for h in hs]))
        freq = {k: float(np.mean([h.get(k, False) for h in hs])) for k in keys}
        table[cat] = {"n": len(hs), "mean_count": round(mean, 3), **{k: round(v, 3) for k, v in freq.items()}}
        print(f"{cat:>8} {len(hs):>4} {mean:6.2f} " + " ".join(f"{freq[k]:12.2f}" for k in keys))
    rank = [order.index(c) for c, _ in rows]
    count = [sum(h.values()) for _, h in rows]
    rho, p = spearmanr(rank, count)
    per_key = {k: float(spearmanr(rank, [h.get(k, False) for _, h in rows])[0]) for k in keys}
    print(f"Spearman(count, category rank) = {rho:.3f} (p = {p:.2g}); per value: "
          + ", ".join(f"{k} {v:.2f}" for k, v in per_key.items()))
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "n": len(rows), "by_category": table,
                                         "spearman_count": rho, "p": p, "spearman_per_value": per_key}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
