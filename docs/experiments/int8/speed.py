"""Criterion 4 of PREREGISTRATION.md: `run` p50 with the fp32 and the 8-bit models, interleaved in one
process (caches cleared before every run), on one image.

    python docs/experiments/int8/speed.py IMAGE --organ kidney --classifier runs/int8/kidney_cls_v2.onnx [--runs 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from echo_agent import EchoAgent
from echo_agent.config import AgentConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("--organ", required=True)
    ap.add_argument("--detector", type=Path, default=None)
    ap.add_argument("--classifier", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    base = AgentConfig()
    changes = {}
    if args.detector:
        changes["detectors"] = {**base.detectors, args.organ: args.detector}
    if args.classifier:
        changes["classifiers"] = {**base.classifiers, args.organ: args.classifier}
    agents = {"fp32": EchoAgent.from_config(base), "int8": EchoAgent.from_config(base.replace(**changes))}
    times: dict[str, list[float]] = {k: [] for k in agents}
    for a in agents.values():
        a.run(args.image)  # load models, warm up
    for _ in range(args.runs):
        for name, a in agents.items():
            a.toolkit.clear_caches()
            t = time.perf_counter()
            a.run(args.image)
            times[name].append((time.perf_counter() - t) * 1000)
    out = {k: {"p50_ms": round(statistics.median(v), 1), "p95_ms": round(sorted(v)[int(0.95 * (len(v) - 1))], 1)}
           for k, v in times.items()}
    out["ratio_p50"] = round(out["fp32"]["p50_ms"] / out["int8"]["p50_ms"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
