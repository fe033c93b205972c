"""One forward pass of the packaged breast detector against another breast detector file on the same
image (detector output cache cleared before every pass, the two files taking turns), p50 in ms.

    python docs/experiments/detector_input_size/speed_ab.py OTHER_DETECTOR.onnx [RUNS] [IMAGE]

IMAGE defaults to the README example (the bundled carcinoma). Only the detector is timed: a whole
`run` with another detector file is not comparable, because the packaged fusion is tied to the
packaged detector and is skipped (the heuristic fusion answers) with any other file.
"""
import statistics
import sys
import time
from pathlib import Path

from echo_agent.detectors.onnx import OnnxDetector
from echo_agent.imaging import load_image
from echo_agent.organs import get_organ

other = Path(sys.argv[1])
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 40
image = sys.argv[3] if len(sys.argv) > 3 else str(
    Path(__file__).resolve().parents[3] / "echo_agent" / "assets" / "examples" / "breast_malignant.png")
arr = load_image(image).array
spec = get_organ("breast")  # both with the organ's detector threads, as the agent runs them
detectors = {"packaged": OnnxDetector(spec.resolve_weights(), intra_op_threads=spec.detector_threads),
             "other": OnnxDetector(other, intra_op_threads=spec.detector_threads)}
times: dict[str, list[float]] = {k: [] for k in detectors}
for _ in range(runs):
    for name, det in detectors.items():
        det.clear_cache()
        t = time.perf_counter()
        det.predict_raw([arr])
        times[name].append((time.perf_counter() - t) * 1000)
for name, det in detectors.items():
    print(f"detector {name} ({det.input_size} px): one forward pass p50 {statistics.median(times[name]):.1f} ms")
