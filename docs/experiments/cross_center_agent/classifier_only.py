"""Addendum 4: refit the BUSI out-of-fold fusion of addendum 3 with the candidates restricted to the two
rules and logistic[classifier] (registered: the unchanged selection rule decides), or, with ``--force``,
logistic[classifier] L2 10 fitted past the selection guard (exploratory; evaluated on BrEaST val only).

Reads the cached runs of addendum 3 and the single-center models it names; writes one fusion file.

    python docs/experiments/cross_center_agent/classifier_only.py /tmp/xc/oof/fusion_busi_oof_clsonly.json
    python docs/experiments/cross_center_agent/classifier_only.py --force /tmp/xc/oof/fusion_busi_oof_forced_cls.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from echo_agent.detectors import load_detector, load_region_classifier  # noqa: E402
from echo_agent.fusion import DETECTOR_RULE, HEURISTIC_RULE, LOGISTIC  # noqa: E402
from echo_agent.organs import get_organ  # noqa: E402
from echo_agent.training import fusion_fit  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/xc/oof/runs_busi.jsonl"))
    ap.add_argument("--detector", default="/tmp/xc/det_busi_only.onnx")
    ap.add_argument("--classifier", default="/tmp/xc/cls_busi_only.onnx")
    ap.add_argument("--force", action="store_true", help="fit logistic[classifier] L2 10 past the guard")
    args = ap.parse_args()

    recs = [fusion_fit.RunRecord(**json.loads(line)) for line in args.runs.read_text().splitlines() if line.strip()]
    if args.force:
        cands = [fusion_fit.Candidate(LOGISTIC, "classifier", 10.0)]

        def take_the_logistic(scores, *_):  # noqa: ANN001, ANN202 - replaces select_candidate
            i = next(i for i, s in enumerate(scores) if s.kind == LOGISTIC)
            for s in scores:
                s.chosen = i == scores.index(s)
            return i

        fusion_fit.select_candidate = take_the_logistic
    else:
        cands = [fusion_fit.Candidate(DETECTOR_RULE), fusion_fit.Candidate(HEURISTIC_RULE)] + [
            fusion_fit.Candidate(LOGISTIC, "classifier", l2, bal) for bal in (False, True) for l2 in (1.0, 10.0, 100.0)]
    det = load_detector(args.detector, labels=get_organ("breast").detector_labels).name
    cls = load_region_classifier(args.classifier).name
    note = "addendum 4, exploratory: logistic[classifier] L2 10 past the guard" if args.force else \
        "addendum 4: candidates restricted to the rules and logistic[classifier]"
    params = fusion_fit.fit_fusion(recs, organ="breast", candidates=cands, for_detectors=[det], for_classifiers=[cls],
                                   notes={"diagnostic": note})
    args.out.write_text(params.to_json() + "\n")
    for c in params.training["selection"]["candidates"]:
        print(f"{c['name']:40s} log-loss {c['cv_log_loss']:.3f} acc {c['cv_accuracy']:.3f} "
              f"bal {c['cv_balanced_accuracy']:.3f} ECE {c['cv_ece']:.3f}{'  <- chosen' if c['chosen'] else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
