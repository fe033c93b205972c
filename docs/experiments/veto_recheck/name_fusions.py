"""Copies of the single-center out-of-fold fusions of §16 naming this run's models (CROSS_CENTER.md).

For each detector seed: ``OUT/<seed>/det_{busi,breast}_only.onnx`` (copies of the §42 base detectors, so
the detector's name keeps the stem the fusion was fitted under) and ``OUT/<seed>/fusion_{busi,breast}_{before,after}.json``:
the §16 fusion with ``training.detectors`` / ``training.classifiers`` naming these models; "after" also
has ``normal_veto_recheck: 0.2``. Nothing else in the files changes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from echo_agent.detectors.onnx import OnnxDetector
from echo_agent.detectors.region_classifier import OnnxRegionClassifier

DETECTORS = {"s0": {"busi": "runs/det_acq/busi_base.onnx", "breast": "runs/det_acq/breast_base.onnx"},
             "s1": {"busi": "runs/det_acq/busi_base_s1.onnx", "breast": "runs/det_acq/breast_base_s1.onnx"}}
FUSIONS = {"busi": "results/eval/normal_veto/fusion_busi_oof_veto.json",
           "breast": "results/eval/normal_veto/fusion_breast_lesions_usg_oof_veto.json"}
RECHECK = 0.2


def main(out: Path) -> None:
    for seed, dets in DETECTORS.items():
        (out / seed).mkdir(parents=True, exist_ok=True)
        for center, src in dets.items():
            det = out / seed / f"det_{center}_only.onnx"
            shutil.copyfile(src, det)
            cls = out / f"cls_{center}_only.onnx"
            fusion = json.loads(Path(FUSIONS[center]).read_text())
            assert "normal_veto_recheck" not in fusion and fusion["normal_veto"] is True
            fusion["training"]["detectors"] = [OnnxDetector(det).name]
            fusion["training"]["classifiers"] = [OnnxRegionClassifier(cls).name]
            fusion["training"]["renamed_for"] = "docs/experiments/veto_recheck/CROSS_CENTER.md"
            (out / seed / f"fusion_{center}_before.json").write_text(json.dumps(fusion, indent=1) + "\n")
            fusion["normal_veto_recheck"] = RECHECK
            (out / seed / f"fusion_{center}_after.json").write_text(json.dumps(fusion, indent=1) + "\n")
            print(seed, center, fusion["training"]["detectors"], fusion["training"]["classifiers"])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
