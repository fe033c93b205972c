#!/usr/bin/env python
"""Agreement of the agent's BI-RADS category with the radiologist's, from an eval run.

    python tools/birads_agreement.py runs/eval/breast_lesions_usg_test_default/predictions.jsonl

Categories are ordered 1, 2, 3, 4A, 4B, 4C, 5; "within one step" counts |difference| <= 1.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

ORDER = ["1", "2", "3", "4A", "4B", "4C", "5"]


def main(path: str) -> int:
    n = within = exact = 0
    pairs: Counter[tuple[str, str]] = Counter()
    for line in open(path, encoding="utf-8"):
        rec = json.loads(line)
        t = rec.get("truth") or {}
        truth = str(t.get("category", t.get("birads")) or "").upper()
        agent = rec.get("agent") or {}
        dx = agent.get("diagnosis", agent) if isinstance(agent, dict) else {}
        cat = (dx or {}).get("category")
        if truth in ORDER and cat in ORDER:
            n += 1
            d = abs(ORDER.index(truth) - ORDER.index(cat))
            within += d <= 1
            exact += d == 0
            pairs[(truth, cat)] += 1
    if not n:
        print("no image with both a radiologist and an agent BI-RADS category")
        return 1
    print(f"images {n}: exact {exact} ({exact / n:.1%}), within one step {within} ({within / n:.1%})")
    print("radiologist -> agent counts:", dict(sorted(pairs.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
