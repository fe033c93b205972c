"""Reading only: the kidney pool's out-of-fold evidence by given fold and session name prefix.

    python docs/experiments/kidney_patch_probe/sessions.py [RUNS.jsonl]

Reads out-of-fold runs (default: docs/experiments/kidney_probe_c/'s ``runs/kidney_probe_c/runs.jsonl``,
three clip-fold detectors and probes) and prints, per (given fold, name prefix, label) group of at
least 20 frames, the first detector call's top score and the second look's whole-frame probability of
hydronephrosis. Nothing is fitted.
"""

from __future__ import annotations

import collections
import math
import sys
from pathlib import Path

import numpy as np

from echo_agent.training.fusion_fit import load_runs

PREFIXES = ("20210330", "20210329", "130510", "CANON")


def main() -> int:
    runs = load_runs(sys.argv[1] if len(sys.argv) > 1 else "runs/kidney_probe_c/runs.jsonl")
    rows: dict[tuple[str, str, str], list[tuple[float, float]]] = collections.defaultdict(list)
    for r in runs:
        path = r.key.split(":", 1)[1]
        prefix = Path(path).name.split("_")[0]
        f = r.features()
        key = (path.split("/")[0], prefix if prefix in PREFIXES else "other", r.label)
        rows[key].append((f.get("det_top", 0.0), math.exp(f.get("cls_whole_hydronephrosis", -30.0))))
    print("fold / prefix / label, frames: detector top score median [q25, q75], share >= 0.25; "
          "second look p(hydronephrosis) median [q25, q75]")
    for key in sorted(rows):
        v = np.asarray(rows[key])
        if len(v) < 20:
            continue
        q = np.quantile(v, [0.25, 0.5, 0.75], axis=0)
        print(f"{' / '.join(key)}, {len(v)}: {q[1, 0]:.2f} [{q[0, 0]:.2f}, {q[2, 0]:.2f}], {(v[:, 0] >= 0.25).mean():.2f}; "
              f"{q[1, 1]:.2f} [{q[0, 1]:.2f}, {q[2, 1]:.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
