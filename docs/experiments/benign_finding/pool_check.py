"""Pool check of rule R2 (PREREGISTRATION.md here): BI-RADS 2 for a benign reading whose leading
finding the captioner calls anechoic and circumscribed.

    python docs/experiments/benign_finding/pool_check.py --out runs/benign_finding [--split train+val]
    python docs/experiments/benign_finding/pool_check.py --out runs/benign_finding_r5 --rule r5   # the addendum

Runs the packaged agent on BrEaST images of the split, keeps each Diagnosis and the captioner's
descriptors of its leading finding, and compares the readers' categories with today's and with R2's.
Refuses the test split (the adoption's test read goes through ``echo-agent eval``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from echo_agent import EchoAgent  # noqa: E402
from echo_agent.eval.datasets import load_split, training_split  # noqa: E402
from echo_agent.eval.metrics import category_agreement  # noqa: E402
from echo_agent.fusion.evidence import linked_descriptors  # noqa: E402
from echo_agent.organs import get_organ  # noqa: E402
from echo_agent.schemas import Box, ImageContext, parse_evidence  # noqa: E402

PATTERN = {"echo_pattern": "anechoic", "margin": "circumscribed"}
#: ../birads3_pattern/PREREGISTRATION.md: the probably-benign look
R3_PATTERN = {"shape": "oval", "orientation": "parallel", "margin": "circumscribed"}


def leading_descriptors(state: dict) -> dict:
    """The captioner's descriptor values of the Diagnosis's leading finding, linked as the fusion links
    them (``echo_agent.fusion.evidence.linked_descriptors``: detection id, else IoU >= 0.5)."""
    dx = state["diagnosis"]
    if not dx.get("findings"):
        return {}
    lead = dx["findings"][0]
    evidence = [parse_evidence(e) if isinstance(e, dict) else e for e in state.get("evidence") or []]
    contexts = [e for e in evidence if isinstance(e, ImageContext)]
    descs = linked_descriptors(contexts, Box(**lead["box"]), lead.get("detection_ids") or [])
    return {k: d.value for k, d in descs.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", default="train+val")
    ap.add_argument("--rule", choices=["r2", "r5", "r3"], default="r2",
                    help="r2: category 2 for the simple-cyst look; r5 (addendum): category 5 for a 4C malignant "
                         "reading whose leading finding shows every suspicious descriptor group; r3 "
                         "(../birads3_pattern/): category 3 for a benign reading of the oval, parallel, "
                         "circumscribed look that R2 leaves alone")
    args = ap.parse_args()
    training_split(args.split)  # never test
    organ = get_organ("breast")
    benign = next(lbl for lbl in organ.lesion_labels if lbl != organ.positive_label)
    agent = EchoAgent()
    rows = []
    for im in load_split("breast_lesions_usg", args.split):
        state = agent.run_state(im.image, organ="breast", context=im.clinical_context)
        dx = state["diagnosis"]
        desc = leading_descriptors(state)
        if args.rule == "r5":
            fires = (dx["label"] == organ.positive_label and dx.get("category") == "4C"
                     and all(desc.get(k) in values for k, values in organ.suspicious_descriptors.items()))
            new = "5"
        elif args.rule == "r3":
            fires = (dx["label"] == benign and dx.get("category") != "2"
                     and all(desc.get(k) == v for k, v in R3_PATTERN.items()))
            new = "3"
        else:
            fires = dx["label"] == benign and all(desc.get(k) == v for k, v in PATTERN.items())
            new = "2"
        rows.append({"key": im.key, "reader": im.category, "label": dx["label"], "truth": im.label,
                     "today": dx.get("category"), "r2": new if fires else dx.get("category"), "fires": fires,
                     "descriptors": desc})
    order = organ.category_scale
    truth = [r["reader"] for r in rows]
    res = {"split": args.split, "n": len(rows), "rule": args.rule,
           "pattern": {"r2": PATTERN, "r3": R3_PATTERN}.get(args.rule, organ.suspicious_descriptors)}
    for name in ("today", "r2"):
        a = category_agreement(truth, [r[name] for r in rows], order)
        res[name] = {"exact": a.exact, "within_one": a.within_one, "n": a.n,
                     "categories": dict(Counter(r[name] for r in rows))}
    fired = [r for r in rows if r["fires"]]
    changed = [r for r in fired if r["today"] != r["r2"]]
    res["fires"] = len(fired)
    res["changed"] = len(changed)
    res["readers_where_changed"] = dict(Counter(r["reader"] for r in changed))
    res["anechoic_circumscribed_any_label"] = dict(Counter(
        f"{r['label']} / reader {r['reader']}" for r in rows if all(r["descriptors"].get(k) == v for k, v in PATTERN.items())))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pool_check.json").write_text(json.dumps(res, indent=1))
    (args.out / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
