"""Breast `run` p50 with the packaged detector against another breast detector file, interleaved in
one process, caches cleared before every run; also the detector's own forward time (one forward pass,
cache cleared) for each file.

    python docs/experiments/detector_input_size/speed_ab.py OTHER_DETECTOR.onnx [RUNS] [IMAGE]

IMAGE defaults to the README example (the bundled carcinoma).
"""
import statistics
import sys
import time
from pathlib import Path

from echo_agent import EchoAgent
from echo_agent.config import AgentConfig
from echo_agent.imaging import load_image

other = Path(sys.argv[1])
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 40
image = sys.argv[3] if len(sys.argv) > 3 else str(
    Path(__file__).resolve().parents[3] / "echo_agent" / "assets" / "examples" / "breast_malignant.png")
base = AgentConfig()
agents = {"packaged": EchoAgent.from_config(base),
          "other": EchoAgent.from_config(base.replace(detectors={**base.detectors, "breast": other}))}
for a in agents.values():
    a.run(image, organ="breast")
times: dict[str, list[float]] = {k: [] for k in agents}
for _ in range(runs):
    for name, a in agents.items():
        a.toolkit.clear_caches()
        t = time.perf_counter()
        a.run(image, organ="breast")
        times[name].append((time.perf_counter() - t) * 1000)
for name, ts in times.items():
    print(f"run {name}: p50 {statistics.median(ts):.1f} ms, p95 {sorted(ts)[int(0.95 * len(ts)) - 1]:.1f} ms")

arr = load_image(image).array
for name in agents:
    det = agents[name].toolkit.detector("breast")
    ts = []
    for _ in range(runs):
        det.clear_cache()
        t = time.perf_counter()
        det.predict_raw([arr])
        ts.append((time.perf_counter() - t) * 1000)
    print(f"detector {name}: one forward pass p50 {statistics.median(ts):.1f} ms")
