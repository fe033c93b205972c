"""8-bit static quantization of the agent's ONNX models (echo_agent.training.quantize)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from _fakes import speckle_image, tiny_classifier  # noqa: E402

from echo_agent.detectors import OnnxRegionClassifier  # noqa: E402
from echo_agent.detectors.onnx import WEIGHTS_VERSION_KEY, OnnxDetector  # noqa: E402
from echo_agent.schemas import Box  # noqa: E402
from echo_agent.training.quantize import (  # noqa: E402
    QUANT_META_KEY,
    classifier_calibration_inputs,
    compute_nodes,
    detector_calibration_inputs,
    fp32_source,
    quantize_onnx,
)


def _with_version(path):
    import onnx

    m = onnx.load(str(path))
    m.metadata_props.add(key=WEIGHTS_VERSION_KEY, value="v7")
    onnx.save(m, str(path))
    return path


def _images(n=6):
    return [speckle_image(90 + 7 * i, 120, seed=i) for i in range(n)]


def test_quantized_classifier_loads_keeps_metadata_and_probabilities(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quantizer must not leave files in the working directory
    src = _with_version(tiny_classifier(tmp_path / "src.onnx", temperature=1.5))
    clf = OnnxRegionClassifier(src)
    cases = [(img, [None, Box(x1=10, y1=10, x2=60, y2=50)]) for img in _images()]
    inputs = classifier_calibration_inputs(clf, cases)
    assert len(inputs) == 12 and inputs[0].shape == (1, 3, 32, 32) and inputs[0].dtype == np.float32

    out = tmp_path / "q" / "int8.onnx"
    report = quantize_onnx(src, out, inputs)
    assert report.calibration_inputs == 12 and report.method == "minmax" and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src.onnx"]

    q = OnnxRegionClassifier(out)
    assert q.labels == clf.labels and q.info["temperature"] == 1.5  # the source's metadata came along
    import onnxruntime as ort

    meta = ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map
    assert WEIGHTS_VERSION_KEY not in meta  # its outputs are not the source's
    rec = json.loads(meta[QUANT_META_KEY])
    assert rec["source_sha256"] == report.source_sha256 and rec["calibration_inputs"] == 12
    ops = {n.op_type for n in __import__("onnx").load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops

    img = _images(1)[0]
    boxes = [None, Box(x1=5, y1=5, x2=40, y2=40)]
    for a, b in zip(clf.classify(img, boxes), q.classify(img, boxes), strict=True):
        assert max(abs(a[k] - b[k]) for k in a) < 0.05


def test_exclusions_and_op_types_are_honoured(tmp_path):
    src = tiny_classifier(tmp_path / "src.onnx")
    clf = OnnxRegionClassifier(src)
    inputs = classifier_calibration_inputs(clf, [(img, [None]) for img in _images(3)])
    assert compute_nodes(src) and all(isinstance(n, str) for n in compute_nodes(src))
    import onnx

    kept = quantize_onnx(src, tmp_path / "kept.onnx", inputs, exclude_nodes=compute_nodes(src))
    ops = {n.op_type for n in onnx.load(kept.output).graph.node}
    assert "QuantizeLinear" not in ops  # the only compute node was kept in float
    none = quantize_onnx(src, tmp_path / "none.onnx", inputs, op_types=("Conv",))  # no Conv in this model
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(none.output).graph.node}


def test_bad_requests_are_refused_with_the_reason(tmp_path):
    src = tiny_classifier(tmp_path / "src.onnx")
    good = [np.zeros((1, 3, 32, 32), np.float32)]
    with pytest.raises(ValueError, match="unknown calibration method"):
        quantize_onnx(src, tmp_path / "a.onnx", good, method="entropy-ish")
    with pytest.raises(ValueError, match="no calibration inputs"):
        quantize_onnx(src, tmp_path / "a.onnx", [])
    with pytest.raises(ValueError, match="takes"):
        quantize_onnx(src, tmp_path / "a.onnx", [np.zeros((1, 3, 16, 16), np.float32)])
    with pytest.raises(ValueError, match="overwrite its source"):
        quantize_onnx(src, src, good)
    with pytest.raises(FileNotFoundError):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "a.onnx", good)
    (tmp_path / "exists.onnx").write_bytes(b"keep me")
    with pytest.raises(ValueError, match="exists"):
        quantize_onnx(src, tmp_path / "exists.onnx", good)
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep me"  # nothing the user had is lost


def test_an_8bit_file_is_not_quantized_again_and_leads_back_to_its_source(tmp_path):
    src = tiny_classifier(tmp_path / "cls.onnx")
    inputs = classifier_calibration_inputs(OnnxRegionClassifier(src), [(img, [None]) for img in _images(2)])
    q = tmp_path / "cls_int8.onnx"
    quantize_onnx(src, q, inputs)
    with pytest.raises(ValueError, match="already quantized.*cls.onnx"):
        quantize_onnx(q, tmp_path / "again.onnx", inputs)
    assert fp32_source(q) == src and fp32_source(src) == src
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "cls_int8.onnx").write_bytes(q.read_bytes())
    assert fp32_source(moved / "cls_int8.onnx") == moved / "cls_int8.onnx"  # no source beside it


def test_detector_network_input_is_what_the_detector_runs():
    from echo_agent.organs import get_organ

    det = OnnxDetector(get_organ("breast").resolve_weights())
    img = speckle_image(100, 140)
    x = det.network_input([img])
    s = det.input_size
    assert x.shape == (1, 3, s, s) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    raw, _ = det.predict_raw([img])
    direct = det._session.run(None, {det._session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(direct, raw, rtol=0, atol=0)
    both = detector_calibration_inputs(det, [img])
    assert len(both) == 2 and np.array_equal(both[0], x)
    assert np.array_equal(both[1], det.network_input([np.ascontiguousarray(img[:, ::-1])]))
