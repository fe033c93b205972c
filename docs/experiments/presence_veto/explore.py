"""What the presence veto changes on cached agent runs (PREREGISTRATION.md in this folder).

    python docs/experiments/presence_veto/explore.py NAME RUNS.jsonl FUSION.json [NAME RUNS FUSION ...] --out F.json

For each (runs, fusion) triple: every run's evidence goes through ``LearnedFusion`` with the fusion as
it is and with ``presence_veto`` in ``--mode``; printed per triple: accuracy, lesion images read normal, normal
images read normal, readings changed. Nothing is fitted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def readings(runs: list, params) -> list[str]:
    from echo_agent.fusion.learned import LearnedFusion
    from echo_agent.organs import get_organ

    fusion = LearnedFusion({params.organ: params})
    out = []
    for r in runs:
        ev, clin = r.parsed()
        dx = fusion.fuse(get_organ(r.organ), ev, clinical=clin, image_size=(r.width, r.height))
        out.append(dx.label)
    return out


def summary(runs: list, labels: list[str], normal: str) -> dict:
    truth = [r.label for r in runs]
    lesion = [t != normal for t in truth]
    return {"n": len(runs), "accuracy": round(sum(a == b for a, b in zip(labels, truth)) / len(runs), 4),
            "lesions": sum(lesion), "lesions_read_normal": sum(le and lb == normal for le, lb in zip(lesion, labels)),
            "normals": len(runs) - sum(lesion),
            "normals_read_normal": sum((not le) and lb == normal for le, lb in zip(lesion, labels))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("triples", nargs="+", help="NAME RUNS.jsonl FUSION.json, repeated")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", default="top_or_whole", choices=("whole_image", "top_or_whole"),
                    help="the presence_veto mode compared with the fusion as it is (the addendum's: whole_image)")
    args = ap.parse_args()
    if len(args.triples) % 3:
        ap.error("give NAME RUNS FUSION triples")
    from echo_agent.fusion.learned import FusionParams
    from echo_agent.organs import get_organ
    from echo_agent.training.fusion_fit import load_runs

    results = {}
    for name, runs_path, fusion_path in zip(*[iter(args.triples)] * 3, strict=True):
        runs = load_runs(runs_path)
        params = FusionParams.from_json(Path(fusion_path).read_text(), fusion_path)
        # Out-of-fold runs come from fold models, which the fusion's model-identity check would refuse
        # (it is written for the models it ships with): read them as the fit read them.
        params = dataclasses.replace(params, training={})
        normal = get_organ(params.organ).normal_label
        before = readings(runs, params)
        after = readings(runs, dataclasses.replace(params, presence_veto=args.mode))
        results[name] = {"runs": runs_path, "fusion": fusion_path, "normal_veto": params.normal_veto, "mode": args.mode,
                         "without": summary(runs, before, normal), "with": summary(runs, after, normal),
                         "changed": sum(a != b for a, b in zip(before, after))}
        print(name, json.dumps(results[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "command": " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
