"""Per-center detector recalibration: move a detector's scores so its best threshold on a few
labelled images of a new center reads as the agent's operating threshold.

A detector trained on one center often finds the lesions of another at lower scores (docs/benchmarks.md
§9: BUSI → BrEaST, 20 of 51 lesion images got no box at 0.25 while a re-check at 0.1 found most of
them). The agent's policy and fusion read scores against 0.25, so the fix is one logit shift of the
class scores: :func:`choose_threshold` picks the threshold with the best localization F1@0.5 on the
calibration images (run through the agent's own detection path), and :func:`shift_onnx_scores` writes
a copy of the ONNX model whose class scores are ``sigmoid(logit(p) + shift)`` (boxes untouched),
recording what was done in its metadata. The copy has a new weights version, so a learned fusion
fitted for the original refuses it (refit one with ``tools/train_policy.py --detector``).

Needs the ``onnx`` package (``train`` / ``dev`` extras); the recalibrated model runs in the light
runtime like any other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Metadata key of the recalibration record in a recalibrated ONNX model.
RECALIBRATION_KEY = "echo_detector_recalibration"
#: Thresholds searched by :func:`choose_threshold`.
THRESHOLDS = (0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7)


def logit_shift(threshold: float, operating_threshold: float = 0.25) -> float:
    """The logit shift that makes a score of ``threshold`` read as ``operating_threshold``."""
    for name, p in (("threshold", threshold), ("operating_threshold", operating_threshold)):
        if not 0.0 < p < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {p}")
    return (math.log(operating_threshold) - math.log1p(-operating_threshold)) - (math.log(threshold) - math.log1p(-threshold))


def localization_by_threshold(organ: Any, detector: Any, images: Sequence[Any],
                              thresholds: Sequence[float] = THRESHOLDS) -> dict[float, dict[str, float | None]]:
    """Localization F1@0.5 / precision / recall (and the rest of
    :func:`echo_agent.eval.sweep.threshold_sweep`) of ``detector`` on manifest ``images`` at each
    threshold, through the agent's detection path."""
    from ..eval.sweep import threshold_sweep

    if not images:
        raise ValueError("no calibration images")
    return threshold_sweep(organ, detector, images, thresholds)


def choose_threshold(by_threshold: dict[float, dict[str, float]]) -> float:
    """The threshold with the highest localization F1 (ties: the higher threshold)."""
    scored = [(m["f1"], t) for t, m in by_threshold.items() if m.get("f1") is not None]
    if not scored:
        raise ValueError("no threshold has a localization F1 (the calibration images have no lesion boxes?)")
    return max(scored)[1]


def shift_onnx_scores(src: str | Path, dst: str | Path, shift: float, *, record: dict[str, Any] | None = None) -> Path:
    """Write a copy of the detector ``src`` (ultralytics head layout ``(B, 4 + nc, N)``) whose class
    scores are ``sigmoid(logit(p) + shift)``; the box rows are unchanged. Refuses to overwrite."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ..detectors.onnx import WEIGHTS_VERSION_KEY

    src, dst = Path(src), Path(dst)
    if dst.exists():
        from ..errors import OutputPathError

        raise OutputPathError(f"{dst} already exists; choose another file name")
    model = onnx.load(str(src))
    graph = model.graph
    if len(graph.output) != 1 or graph.output[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"{src} is not a single-output float32 detector export")
    name = graph.output[0].name
    raw = name + "__before_recalibration"
    for node in graph.node:
        node.output[:] = [raw if o == name else o for o in node.output]
    p = "echo_recal_"
    graph.initializer.extend([
        numpy_helper.from_array(np.array([0], dtype=np.int64), p + "zero"),
        numpy_helper.from_array(np.array([4], dtype=np.int64), p + "four"),
        numpy_helper.from_array(np.array([2**62], dtype=np.int64), p + "end"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), p + "axis"),
        numpy_helper.from_array(np.array(1e-7, dtype=np.float32), p + "eps"),
        numpy_helper.from_array(np.array(1 - 1e-7, dtype=np.float32), p + "max"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), p + "one"),
        numpy_helper.from_array(np.array(shift, dtype=np.float32), p + "shift"),
    ])
    graph.node.extend([
        helper.make_node("Slice", [raw, p + "zero", p + "four", p + "axis"], [p + "boxes"]),
        helper.make_node("Slice", [raw, p + "four", p + "end", p + "axis"], [p + "scores"]),
        helper.make_node("Clip", [p + "scores", p + "eps", p + "max"], [p + "clipped"]),
        helper.make_node("Sub", [p + "one", p + "clipped"], [p + "rest"]),
        helper.make_node("Div", [p + "clipped", p + "rest"], [p + "odds"]),
        helper.make_node("Log", [p + "odds"], [p + "logit"]),
        helper.make_node("Add", [p + "logit", p + "shift"], [p + "shifted"]),
        helper.make_node("Sigmoid", [p + "shifted"], [p + "new_scores"]),
        helper.make_node("Concat", [p + "boxes", p + "new_scores"], [name], axis=1),
    ])
    meta = {m.key: m.value for m in model.metadata_props}
    meta.pop(WEIGHTS_VERSION_KEY, None)  # a new version: fusions fitted for the original refuse this one
    meta[RECALIBRATION_KEY] = json.dumps({"shift": shift, "source": src.name, **(record or {})})
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


__all__ = ["RECALIBRATION_KEY", "THRESHOLDS", "choose_threshold", "localization_by_threshold", "logit_shift",
           "shift_onnx_scores"]
