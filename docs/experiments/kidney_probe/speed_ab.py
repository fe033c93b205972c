"""Kidney `run` p50: the packaged second look + fusion against another pair (e.g. the former 8-bit fine-tuned
classifier and its fusion), interleaved in one process, caches cleared before every run.

    git show 55df77a:echo_agent/assets/classifiers/kidney_int8.onnx > /tmp/old_kidney_int8.onnx
    git show 55df77a:echo_agent/assets/fusion/kidney.json > /tmp/old_fusion_kidney.json
    python docs/experiments/kidney_probe/speed_ab.py IMAGE /tmp/old_kidney_int8.onnx /tmp/old_fusion_kidney.json [RUNS]
"""
import statistics
import sys
import time
from pathlib import Path

from echo_agent import EchoAgent
from echo_agent.config import AgentConfig

image, before_classifier, before_fusion = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
runs = int(sys.argv[4]) if len(sys.argv) > 4 else 40
base = AgentConfig()
agents = {
    "now": EchoAgent.from_config(base),
    "before": EchoAgent.from_config(base.replace(
        classifiers={**base.classifiers, "kidney": before_classifier},
        fusion_params={**base.fusion_params, "kidney": before_fusion})),
}
for a in agents.values():
    dx = a.run(image, organ="kidney")
    assert not any("skipped" in w for w in dx.warnings), dx.warnings
times = {k: [] for k in agents}
for _ in range(runs):
    for name, a in agents.items():
        a.toolkit.clear_caches()
        t = time.perf_counter()
        a.run(image, organ="kidney")
        times[name].append((time.perf_counter() - t) * 1000)
for name, ts in times.items():
    print(f"{name}: p50 {statistics.median(ts):.1f} ms, p95 {sorted(ts)[int(0.95 * len(ts)) - 1]:.1f} ms")
