"""Per-center detector recalibration: one logit shift of the class scores, written into an ONNX copy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="recalibration writes ONNX graphs (the train/dev extras)")

from echo_agent.detectors.onnx import OnnxDetector  # noqa: E402
from echo_agent.errors import OutputPathError  # noqa: E402
from echo_agent.organs import get_organ  # noqa: E402
from echo_agent.training.recalibrate import (  # noqa: E402
    RECALIBRATION_KEY,
    THRESHOLDS,
    choose_threshold,
    logit_shift,
    shift_onnx_scores,
)

REPO = Path(__file__).resolve().parents[1]
KIDNEY = get_organ("kidney").resolve_weights()


def test_the_shift_maps_the_chosen_threshold_onto_the_operating_one():
    assert logit_shift(0.25) == pytest.approx(0.0)
    s = logit_shift(0.1)
    assert 1 / (1 + math.exp(-(math.log(0.1 / 0.9) + s))) == pytest.approx(0.25)
    assert logit_shift(0.5) < 0 < logit_shift(0.05)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            logit_shift(bad)


def test_the_threshold_with_the_best_f1_wins_and_ties_go_higher():
    table = {0.1: {"f1": 0.6}, 0.2: {"f1": 0.7}, 0.3: {"f1": 0.7}, 0.4: {"f1": 0.5}}
    assert choose_threshold(table) == 0.3
    with pytest.raises(ValueError, match="no threshold"):
        choose_threshold({0.1: {"f1": None}})


def test_the_onnx_copy_moves_the_scores_only_and_says_so(tmp_path):
    import onnxruntime as ort

    shift = logit_shift(0.1)
    out = shift_onnx_scores(KIDNEY, tmp_path / "kidney_center_x.onnx", shift, record={"threshold": 0.1})
    a, b = ort.InferenceSession(str(KIDNEY)), ort.InferenceSession(str(out))
    inp = a.get_inputs()[0]
    x = np.random.default_rng(0).random([1 if isinstance(d, str) else d for d in inp.shape], dtype=np.float32)
    ya, yb = a.run(None, {inp.name: x})[0], b.run(None, {inp.name: x})[0]
    assert ya.shape == yb.shape and np.array_equal(ya[:, :4], yb[:, :4])
    p = np.clip(ya[:, 4:], 1e-7, 1 - 1e-7)
    assert np.allclose(yb[:, 4:], 1 / (1 + np.exp(-(np.log(p / (1 - p)) + shift))), atol=1e-5)
    record = json.loads(b.get_modelmeta().custom_metadata_map[RECALIBRATION_KEY])
    assert record["shift"] == pytest.approx(shift) and record["threshold"] == 0.1
    # a new weights version: a fusion fitted for the packaged detector will not take it for that one
    assert OnnxDetector(out).name != OnnxDetector(KIDNEY).name
    with pytest.raises(OutputPathError):
        shift_onnx_scores(KIDNEY, out, shift)


@pytest.mark.realdata
def test_the_tool_recalibrates_on_a_staged_split_and_refuses_test(shared_data, tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("ECHO_AGENT_DATA", str(shared_data))
    spec = importlib.util.spec_from_file_location("recalibrate_detector", REPO / "tools" / "recalibrate_detector.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "breast_recal.onnx"
    assert tool.main(["--organ", "breast", "--center", "breast_lesions_usg", "--split", "val", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert out.is_file() and report["n_images"] >= 10 and report["best_threshold"] in THRESHOLDS
    with pytest.raises(SystemExit):
        tool.main(["--organ", "breast", "--center", "breast_lesions_usg", "--split", "test", "--out", str(tmp_path / "t.onnx")])
    with pytest.raises(SystemExit):
        tool.main(["--organ", "breast", "--center", "breast_lesions_usg", "--split", "val", "--out", str(out)])
