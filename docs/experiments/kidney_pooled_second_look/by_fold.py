"""Reading only: a fusion's readings of out-of-fold kidney runs, by the dataset's given fold.

    python docs/experiments/kidney_pooled_second_look/by_fold.py RUNS.jsonl FUSION.json

(the fusion in-sample on runs it was fitted on, as in ../kidney_fluid_seg/RESULT.md)
"""

from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "presence_veto"))
from explore import readings  # noqa: E402  (every run's evidence through LearnedFusion)


def main() -> int:
    from echo_agent.fusion.learned import FusionParams
    from echo_agent.training.fusion_fit import load_runs

    runs = load_runs(sys.argv[1])
    params = FusionParams.from_json(Path(sys.argv[2]).read_text(), sys.argv[2])
    labels = readings(runs, dataclasses.replace(params, training={}))
    by = collections.defaultdict(lambda: [0, 0, 0])  # frames, right, hydronephrosis read normal
    for r, lb in zip(runs, labels, strict=True):
        row = by[r.key.split(":", 1)[1].split("/", 1)[0]]
        row[0] += 1
        row[1] += lb == r.label
        row[2] += r.label != "normal" and lb == "normal"
    for fold, (n, right, missed) in sorted(by.items()):
        print(f"{fold}: accuracy {right / n:.3f} of {n}; hydronephrosis read normal {missed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
