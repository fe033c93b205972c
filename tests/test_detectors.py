"""Tests of echo_agent.detectors with tiny hand-built ONNX models (no torch, no weights)."""

from __future__ import annotations

import doctest
import hashlib
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from echo_agent.detectors import (  # noqa: E402
    Detector,
    DetectorConfig,
    OnnxDetector,
    batched_nms,
    clear_detector_cache,
    decode_yolo,
    get_detector,
    letterbox,
    load_detector,
    nms,
    postprocess,  # noqa: E402
    tta_merge,
    unletterbox_boxes,
    weighted_box_fusion,
)
from echo_agent.detectors import base as det_base  # noqa: E402
from echo_agent.detectors.postprocess import (  # noqa: E402
    box_iou,
    decode_end2end,
    flip_detections_horizontal,
    letterbox_boxes,
    letterbox_info,
)
from echo_agent.errors import ChannelLayoutError, EchoInputError, ModelLoadError  # noqa: E402
from echo_agent.organs import OrganSpec, register_organ, unregister_organ  # noqa: E402
from echo_agent.schemas import Box, Detection  # noqa: E402

NAMES = "{0: 'benign', 1: 'malignant'}"


# ---------------------------------------------------------------------------------------------
# tiny ONNX models
# ---------------------------------------------------------------------------------------------
def _save(graph, path: Path, meta: dict[str, str] | None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta:
        helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _image_input(batch: int | str = "batch", size: int | str = "size"):
    return helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])


def constant_model(
    path: Path,
    const: np.ndarray,
    *,
    meta: dict[str, str] | None = None,
    batch: int | str = "batch",
    size: int | str = "size",
) -> Path:
    """A model whose output is ``const`` (shape (1, R, N)) broadcast over the batch."""
    const = np.asarray(const, dtype=np.float32)
    r, n = const.shape[1:]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape3"], ["m3"]),
        helper.make_node("Mul", ["m3", "zero"], ["z"]),
        helper.make_node("Add", ["z", "const"], ["output0"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape3"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(const, "const"),
    ]
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, r, n])
    graph = helper.make_graph(nodes, "const", [_image_input(batch, size)], [out], inits)
    return _save(graph, path, meta)


def rect_model(path: Path, *, meta: dict[str, str] | None = None, batch: int | str = "batch") -> Path:
    """A 'detector' that boxes the bright pixels of channel 0 (one anchor; class 1 scores 0.9, class 0 0.1)."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Slice", ["images", "c0", "c1", "ax1"], ["ch0"]),
        helper.make_node("Greater", ["ch0", "half"], ["gt"]),
        helper.make_node("Cast", ["gt"], ["mask"], to=f),
        helper.make_node("ReduceMax", ["mask"], ["col"], axes=[1, 2], keepdims=0),
        helper.make_node("ReduceMax", ["mask"], ["row"], axes=[1, 3], keepdims=0),
    ]
    for prof, lo, hi in (("col", "x1", "x2"), ("row", "y1", "y2")):
        nodes += [
            helper.make_node("ArgMax", [prof], [lo + "i"], axis=1, keepdims=1),
            helper.make_node("ArgMax", [prof], [hi + "l"], axis=1, keepdims=1, select_last_index=1),
            helper.make_node("Cast", [lo + "i"], [lo], to=f),
            helper.make_node("Cast", [hi + "l"], [hi + "f"], to=f),
            helper.make_node("Add", [hi + "f", "one"], [hi]),
        ]
    nodes += [
        helper.make_node("Add", ["x1", "x2"], ["sx"]),
        helper.make_node("Mul", ["sx", "half"], ["cx"]),
        helper.make_node("Add", ["y1", "y2"], ["sy"]),
        helper.make_node("Mul", ["sy", "half"], ["cy"]),
        helper.make_node("Sub", ["x2", "x1"], ["w"]),
        helper.make_node("Sub", ["y2", "y1"], ["h"]),
        helper.make_node("Mul", ["cx", "zero"], ["z"]),
        helper.make_node("Add", ["z", "s_lo"], ["s0"]),
        helper.make_node("Add", ["z", "s_hi"], ["s1"]),
        helper.make_node("Concat", ["cx", "cy", "w", "h", "s0", "s1"], ["cat"], axis=1),
        helper.make_node("Unsqueeze", ["cat", "ax2"], ["output0"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "c0"),
        numpy_helper.from_array(np.array([1], np.int64), "c1"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(np.array([2], np.int64), "ax2"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s_lo"),
        numpy_helper.from_array(np.array(0.9, np.float32), "s_hi"),
    ]
    out = helper.make_tensor_value_info("output0", f, [batch, 6, 1])
    graph = helper.make_graph(nodes, "rect", [_image_input(batch)], [out], inits)
    return _save(graph, path, meta)


def yolo_const(boxes_scores: list[tuple[float, float, float, float, float, float]]) -> np.ndarray:
    """(1, 6, N) YOLO head output from rows (x1, y1, x2, y2, score_benign, score_malignant)."""
    cols = []
    for x1, y1, x2, y2, s0, s1 in boxes_scores:
        cols.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, s0, s1])
    return np.asarray(cols, np.float32).T[None]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    meta = {"names": NAMES, "imgsz": "[64, 64]", "stride": "32", "task": "detect", "end2end": "False"}
    rows = [
        (4, 4, 20, 20, 0.90, 0.05),  # benign, best
        (6, 6, 22, 22, 0.80, 0.10),  # benign, IoU ~0.62 with the first -> suppressed at 0.5
        (5, 5, 21, 21, 0.10, 0.70),  # malignant over the same place -> kept (class-aware)
        (40, 40, 60, 60, 0.02, 0.50),  # exactly 0.5 -> dropped at threshold 0.5 (strict >)
        (30, 2, 50, 12, 0.30, 0.00),
        (2, 40, 12, 60, 0.20, 0.01),
    ]
    return {
        "const": constant_model(d / "const.onnx", yolo_const(rows), meta=meta),
        "const_fixed": constant_model(d / "const_fixed.onnx", yolo_const(rows), meta=meta, batch=1, size=64),
        "rect": rect_model(d / "rect.onnx", meta={"names": NAMES, "imgsz": "[640, 640]"}),
        "rect_fixed_batch": rect_model(
            d / "rect1.onnx", meta={"names": NAMES, "imgsz": "[640, 640]"}, batch=1
        ),
        "bad_layout": constant_model(d / "bad.onnx", np.zeros((1, 3, 5), np.float32), meta=meta),
        "wrong_nc": constant_model(
            d / "wrong_nc.onnx", np.zeros((1, 7, 5), np.float32), meta=meta
        ),  # 3 classes, names has 2
        "no_meta": constant_model(d / "no_meta.onnx", yolo_const(rows), size=64),
        "segment": constant_model(d / "seg.onnx", yolo_const(rows), meta={**meta, "task": "segment"}),
        "end2end": constant_model(
            d / "e2e.onnx",
            np.array([[[4, 4, 20, 20, 0.9, 1], [30, 2, 50, 12, 0.3, 0], [0, 0, 0, 0, 0.0, 0]]], np.float32),
            meta={**meta, "end2end": "True"},
        ),
    }


def blank(h: int, w: int) -> np.ndarray:
    return np.zeros((h, w, 3), np.uint8)


# ---------------------------------------------------------------------------------------------
# letterbox
# ---------------------------------------------------------------------------------------------
def test_doctests_of_postprocess_and_base():
    for mod in (postprocess, det_base):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0 and res.attempted > 0, mod.__name__


@pytest.mark.parametrize(
    "h,w,size",
    [
        (100, 200, 64),
        (200, 100, 64),
        (64, 64, 64),
        (37, 91, 64),
        (31, 64, 64),
        (64, 29, 64),
        (480, 640, 640),
        (1, 500, 32),
    ],
)
def test_letterbox_geometry(h, w, size):
    img = np.full((h, w, 3), 7, np.uint8)
    padded, info = letterbox(img, size)
    assert padded.shape == (size, size, 3) and padded.dtype == np.uint8
    assert max(info.new_w, info.new_h) == size and min(info.new_w, info.new_h) >= 1
    assert info.pad_x + info.new_w <= size and info.pad_y + info.new_h <= size
    # padding is centred; an odd pixel of padding goes right / bottom (as in ultralytics' LetterBox)
    assert 0 <= (size - info.new_w - info.pad_x) - info.pad_x <= 1
    assert 0 <= (size - info.new_h - info.pad_y) - info.pad_y <= 1
    inner = padded[info.pad_y : info.pad_y + info.new_h, info.pad_x : info.pad_x + info.new_w]
    assert (inner == 7).all()
    border = padded.copy()
    border[info.pad_y : info.pad_y + info.new_h, info.pad_x : info.pad_x + info.new_w] = 114
    assert (border == 114).all()


def test_letterbox_out_buffer_and_errors():
    img = blank(30, 60)
    buf = np.zeros((32, 32, 3), np.uint8)
    out, _ = letterbox(img, 32, out=buf)
    assert out is buf
    with pytest.raises(ValueError):
        letterbox(img, 32, out=np.zeros((31, 32, 3), np.uint8))
    with pytest.raises(ValueError):
        letterbox(img, 0)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 2000),
    w=st.integers(1, 2000),
    size=st.sampled_from([32, 64, 320, 640]),
    fx=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    fy=st.tuples(st.floats(0, 1), st.floats(0, 1)),
)
def test_letterbox_box_mapping_round_trips(h, w, size, fx, fy):
    info = letterbox_info(h, w, size)
    x1, x2 = sorted(v * w for v in fx)
    y1, y2 = sorted(v * h for v in fy)
    boxes = np.array([[x1, y1, x2, y2]])
    fwd = letterbox_boxes(boxes, info)
    assert (fwd[:, [0, 2]] >= info.pad_x - 1e-9).all() and (
        fwd[:, [0, 2]] <= info.pad_x + info.new_w + 1e-9
    ).all()
    back = unletterbox_boxes(fwd, info)
    np.testing.assert_allclose(back, boxes, atol=1e-6 * max(h, w))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(20, 400),
    w=st.integers(20, 400),
    data=st.data(),
)
def test_letterbox_pixels_round_trip(h, w, data):
    """A bright rectangle found in the letterboxed image maps back onto itself (to the pixel scale)."""
    size = 64
    x1 = data.draw(st.integers(0, w - 8))
    y1 = data.draw(st.integers(0, h - 8))
    x2 = data.draw(st.integers(x1 + 8, w))
    y2 = data.draw(st.integers(y1 + 8, h))
    img = blank(h, w)
    img[y1:y2, x1:x2] = 255
    padded, info = letterbox(img, size)
    ys, xs = np.nonzero(padded[..., 0] > 127)
    if xs.size == 0:  # rectangle thinner than a pixel after downscaling
        return
    found = unletterbox_boxes(np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]), info)[0]
    tol_x, tol_y = 1.0 / info.gain_x + 1, 1.0 / info.gain_y + 1
    assert abs(found[0] - x1) <= tol_x and abs(found[2] - x2) <= tol_x
    assert abs(found[1] - y1) <= tol_y and abs(found[3] - y2) <= tol_y


# ---------------------------------------------------------------------------------------------
# NMS
# ---------------------------------------------------------------------------------------------
def test_nms_hand_made():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 5], [20, 20, 30, 30], [21, 20, 31, 30]], float
    )
    scores = np.array([0.9, 0.8, 0.85, 0.3, 0.6])
    # IoU(0,1) = 81/119 = 0.68; IoU(0,2) = 0.5; IoU(3,4) = 90/110 = 0.82
    assert nms(boxes, scores, 0.5).tolist() == [0, 2, 4]  # IoU exactly 0.5 is kept (suppress only > thr)
    assert nms(boxes, scores, 0.49).tolist() == [0, 4]
    assert nms(boxes, scores, 0.7).tolist() == [0, 2, 1, 4]
    assert nms(boxes, scores, 1.0).tolist() == [0, 2, 1, 4, 3]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    # equal scores: lower index first
    assert nms(boxes[:2], np.array([0.5, 0.5]), 0.5).tolist() == [0]
    with pytest.raises(ValueError):
        nms(boxes, scores[:2], 0.5)


def test_batched_nms_is_class_aware():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]], float)
    scores = np.array([0.9, 0.8, 0.7])
    classes = np.array([0, 0, 1])
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.5).tolist() == [0]
    assert batched_nms(boxes, scores, np.array([0, 1, 2]), 0.5).tolist() == [0, 1, 2]


box_strategy = st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(1, 60), st.floats(1, 60)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)


@settings(max_examples=80, deadline=None)
@given(
    boxes=st.lists(box_strategy, min_size=0, max_size=30),
    data=st.data(),
    thr=st.floats(0.05, 0.95),
)
def test_nms_invariants(boxes, data, thr):
    n = len(boxes)
    b = np.asarray(boxes, float).reshape(-1, 4)
    scores = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)), float)
    classes = np.asarray(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), int)
    keep = batched_nms(b, scores, classes, thr)
    assert len(set(keep.tolist())) == len(keep)
    assert (np.diff(scores[keep]) <= 0).all()  # best first
    iou = box_iou(b, b)
    kept = set(keep.tolist())
    for i in keep:
        for j in keep:
            if i != j and classes[i] == classes[j]:
                assert iou[i, j] <= thr + 1e-12
    for j in set(range(n)) - kept:  # every dropped box is covered by a kept, not-worse box of its class
        assert any(classes[i] == classes[j] and iou[i, j] > thr and scores[i] >= scores[j] for i in kept)
    # stopping early gives a prefix of the full result
    k = data.draw(st.integers(0, 5))
    assert batched_nms(b, scores, classes, thr, max_keep=k).tolist() == keep[:k].tolist()
    assert nms(b, scores, thr, max_keep=k).tolist() == nms(b, scores, thr)[:k].tolist()
    # idempotent
    again = batched_nms(b[keep], scores[keep], classes[keep], thr)
    assert sorted(again.tolist()) == list(range(len(keep)))


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
def test_decode_yolo_layout_and_thresholds():
    out = yolo_const([(0, 0, 10, 10, 0.9, 0.1), (50, 50, 60, 70, 0.2, 0.6), (0, 0, 10, 10, 0.1, 0.3)])
    (d,) = decode_yolo(out, score_threshold=0.25, iou_threshold=0.5, max_detections=10)
    assert d.class_ids.tolist() == [0, 1, 1]
    np.testing.assert_allclose(d.boxes[0], [0, 0, 10, 10])
    np.testing.assert_allclose(d.boxes[1], [50, 50, 60, 70])
    np.testing.assert_allclose(d.scores, [0.9, 0.6, 0.3], rtol=1e-6)
    (d,) = decode_yolo(out, score_threshold=0.25, iou_threshold=0.5, max_detections=10, agnostic=True)
    assert d.class_ids.tolist() == [0, 1]
    (d,) = decode_yolo(out, score_threshold=0.95)
    assert d.boxes.shape == (0, 4)
    with pytest.raises(ValueError):
        decode_yolo(out, num_classes=3)
    with pytest.raises(ValueError):
        decode_yolo(np.zeros((1, 4, 3)))


def test_decode_end2end():
    out = np.array([[[1, 2, 11, 12, 0.9, 1], [0, 0, 5, 5, 0.1, 0], [3, 3, 9, 9, 0.5, 0]]], np.float32)
    (d,) = decode_end2end(out, score_threshold=0.2, max_detections=5)
    assert d.class_ids.tolist() == [1, 0]
    np.testing.assert_allclose(d.boxes[0], [1, 2, 11, 12])


# ---------------------------------------------------------------------------------------------
# WBF and TTA
# ---------------------------------------------------------------------------------------------
def det(x1, y1, x2, y2, score, label="x") -> Detection:
    return Detection(box=Box(x1=x1, y1=y1, x2=x2, y2=y2), label=label, score=score)


def test_wbf_two_models_hand_computed():
    a, b = det(0, 0, 10, 10, 0.8), det(2, 0, 12, 10, 0.4)  # IoU = 80 / 120
    (f,) = weighted_box_fusion([[a], [b]], iou_thr=0.55)
    np.testing.assert_allclose(f.box.to_list(), [0.8 / 1.2, 0, 12.8 / 1.2, 10])
    assert f.score == pytest.approx(0.6) and f.source == "wbf" and f.label == "x" and f.id == ""
    # above the IoU threshold they stay apart and each keeps half its score
    fused = weighted_box_fusion([[a], [b]], iou_thr=0.7)
    assert [d.score for d in fused] == pytest.approx([0.4, 0.2])
    # weights 3:1
    (f,) = weighted_box_fusion([[a], [b]], iou_thr=0.55, weights=[3, 1])
    assert f.box.x1 == pytest.approx(0.8 / 2.8) and f.score == pytest.approx(2.8 / 4)
    # skip_thr drops the weak box before fusion
    (f,) = weighted_box_fusion([[a], [b]], iou_thr=0.55, skip_thr=0.5)
    assert f.box.to_list() == a.box.to_list() and f.score == pytest.approx(0.4)


def test_wbf_labels_clusters_and_same_model():
    a, b = det(0, 0, 10, 10, 0.8, "p"), det(0, 0, 10, 10, 0.6, "q")
    fused = weighted_box_fusion([[a], [b]])
    assert sorted((d.label, round(d.score, 6)) for d in fused) == [("p", 0.4), ("q", 0.3)]
    # two boxes of ONE model in a cluster: that model's mean score, divided over 2 models
    c = det(1, 0, 11, 10, 0.6, "p")
    (f,) = weighted_box_fusion([[a, c], []])
    assert f.score == pytest.approx((0.8 + 0.6) / 2 / 2)
    np.testing.assert_allclose(f.box.to_list(), [0.6 / 1.4, 0, 10 + 0.6 / 1.4, 10])
    # a third box joins the cluster through the *fused* box
    d3 = det(0.5, 0, 10.5, 10, 1.0, "p")
    (f,) = weighted_box_fusion([[a], [c], [d3]])
    assert f.score == pytest.approx((0.8 + 0.6 + 1.0) / 3)
    assert weighted_box_fusion([]) == [] and weighted_box_fusion([[], []]) == []
    with pytest.raises(ValueError):
        weighted_box_fusion([[a], [b]], weights=[1])


def test_tta_flip_mapping():
    w = 100
    d = det(10, 20, 30, 40, 0.8)
    (m,) = flip_detections_horizontal([d], w)
    assert m.box.to_list() == [70, 20, 90, 40]
    assert flip_detections_horizontal([m], w)[0].box == d.box
    # the mirror view saw the same lesion (in mirror coordinates) -> one box, mean score
    (f,) = tta_merge([d], [det(70, 20, 90, 40, 0.6)], w)
    assert f.source == "tta" and f.score == pytest.approx(0.7)
    np.testing.assert_allclose(f.box.to_list(), [10, 20, 30, 40])
    # seen only in the original -> half the score
    (f,) = tta_merge([d], [], w)
    assert f.score == pytest.approx(0.4)
    assert len(tta_merge([d, det(50, 50, 60, 60, 0.5)], [], w, max_detections=1)) == 1


# ---------------------------------------------------------------------------------------------
# OnnxDetector
# ---------------------------------------------------------------------------------------------
def test_protocol_metadata_and_name(models):
    d = OnnxDetector(models["const"])
    assert not d.loaded  # lazy
    assert isinstance(d, Detector)
    assert d.labels == ("benign", "malignant") and d.input_size == 64 and d.loaded
    sha = hashlib.sha256(models["const"].read_bytes()).hexdigest()[:8]
    assert d.name == f"const-onnx@{sha}"
    assert d.dynamic_batch
    named = OnnxDetector(models["const"], labels=("a", "b"), name="x")
    assert isinstance(named, Detector) and named.labels == ("a", "b") and named.name == "x"
    assert not named.loaded  # explicit labels: protocol checks do not load the model
    assert named.load().labels == ("a", "b")
    assert OnnxDetector(models["no_meta"]).labels == ("class_0", "class_1")
    assert OnnxDetector(models["no_meta"]).input_size == 64  # from the fixed input shape


def test_thresholds_nms_and_max_detections(models):
    d = OnnxDetector(models["const"])
    img = blank(64, 64)  # same size as the input: letterbox is the identity
    dets = d.detect(img, score_threshold=0.25, iou_threshold=0.5)
    got = [(x.label, round(x.score, 4), x.box.to_list()) for x in dets]
    assert got == [
        ("benign", 0.9, [4, 4, 20, 20]),
        ("malignant", 0.7, [5, 5, 21, 21]),
        ("malignant", 0.5, [40, 40, 60, 60]),
        ("benign", 0.3, [30, 2, 50, 12]),
    ]
    assert all(x.source == "detector" and x.id == "" for x in dets)
    # strict threshold: 0.5 is dropped at 0.5
    assert [round(x.score, 4) for x in d.detect(img, score_threshold=0.5)] == [0.9, 0.7]
    # looser NMS keeps the overlapping benign box
    assert len(d.detect(img, score_threshold=0.25, iou_threshold=0.7)) == 5
    assert [round(x.score, 4) for x in d.detect(img, score_threshold=0.0, max_detections=3)] == [
        0.9,
        0.7,
        0.5,
    ]
    assert d.detect(img, score_threshold=0.95) == []


def test_end2end_export(models):
    d = OnnxDetector(models["end2end"])
    dets = d.detect(blank(128, 128), score_threshold=0.25)  # 2x the input size
    assert [(x.label, round(x.score, 4), x.box.to_list()) for x in dets] == [
        ("malignant", 0.9, [8, 8, 40, 40]),
        ("benign", 0.3, [60, 4, 100, 24]),
    ]
    assert len(d.detect(blank(64, 64), score_threshold=0.25, max_detections=1)) == 1


def test_const_boxes_scale_to_other_image_sizes(models):
    d = OnnxDetector(models["const"])
    img = blank(128, 256)  # ratio 0.25 -> 64x32 resized, 16 px padding top and bottom
    top = d.detect(img)[0]
    assert top.box.to_list() == pytest.approx([16, 0, 80, 16])  # (4,4,20,20) -> x*4, (y-16)*4 clipped


@pytest.mark.parametrize("h,w", [(300, 500), (480, 640), (640, 300), (200, 200), (123, 457), (600, 599)])
def test_known_boxes_map_back_within_one_pixel(models, h, w):
    d = OnnxDetector(models["rect"])
    rng = np.random.default_rng(h * 1000 + w)
    x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    x2, y2 = int(rng.integers(x1 + 20, w)), int(rng.integers(y1 + 20, h))
    img = blank(h, w)
    img[y1:y2, x1:x2] = 255
    (top,) = d.detect(img, max_detections=1)
    assert top.label == "malignant" and top.score == pytest.approx(0.9, abs=1e-6)
    np.testing.assert_allclose(top.box.to_list(), [x1, y1, x2, y2], atol=1.0)


def test_large_image_maps_back_within_the_pixel_scale(models):
    d = OnnxDetector(models["rect"])
    h, w = 1500, 1100
    img = blank(h, w)
    img[200:900, 333:1000] = 255
    (top,) = d.detect(img, max_detections=1)
    tol = max(h, w) / 640 + 1
    np.testing.assert_allclose(top.box.to_list(), [333, 200, 1000, 900], atol=tol)


def test_tta_on_a_detector(models):
    d = OnnxDetector(models["rect"])
    img = blank(240, 320)
    img[30:90, 20:140] = 255  # off-centre, so a wrong flip-back would not overlap
    (f,) = d.detect(img, tta=True, score_threshold=0.5)
    assert f.source == "tta" and f.score == pytest.approx(0.9, abs=1e-6)
    np.testing.assert_allclose(f.box.to_list(), [20, 30, 140, 90], atol=1.0)


@pytest.mark.parametrize("key", ["rect", "rect_fixed_batch"])
def test_batch_equals_per_image(models, key):
    d = OnnxDetector(models[key], max_batch=2, cache_size=0)  # count every forward pass
    calls = []
    forward = d._forward
    d._forward = lambda batch: calls.append(len(batch)) or forward(batch)
    rng = np.random.default_rng(0)
    images = []
    for h, w in [(100, 150), (333, 222), (64, 64), (500, 400), (90, 300)]:
        img = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)
        y, x = h // 4, w // 5
        img[y : 3 * y, x : 3 * x] = 255
        images.append(img)
    for tta in (False, True):
        calls.clear()
        batched = d.detect_batch(images, tta=tta)
        if key == "rect":  # dynamic batch axis: chunks of max_batch images (originals + mirrors with TTA)
            assert calls == ([2, 2, 2, 2, 2] if tta else [2, 2, 1])
        else:  # fixed batch of one: one run per image
            assert calls == [1] * (10 if tta else 5)
        single = [d.detect(img, tta=tta) for img in images]
        assert batched == single
    assert d.detect_batch([]) == []


def test_output_cache_skips_repeated_views_and_keeps_results(models):
    d = OnnxDetector(models["rect"], max_batch=4)
    cold = OnnxDetector(models["rect"], cache_size=0)
    calls = []
    forward = d._forward
    d._forward = lambda batch: calls.append(len(batch)) or forward(batch)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 100, (h, w, 3), dtype=np.uint8) for h, w in [(120, 160), (200, 90), (64, 64)]]
    for img in images:
        img[20:50, 20:60] = 255
    first = d.detect(images[0], score_threshold=0.25)
    assert calls == [1]
    again = d.detect(images[0], score_threshold=0.1, tta=True)  # the original view is cached: only the mirror runs
    assert calls == [1, 1]
    assert first == cold.detect(images[0], score_threshold=0.25)
    assert again == cold.detect(images[0], score_threshold=0.1, tta=True)
    calls.clear()
    d.prefetch(images[1:])  # one batched pass for the two new images
    assert calls == [2]
    assert d.detect_batch(images) == cold.detect_batch(images) and calls == [2]
    calls.clear()
    d.detect_batch([images[1], images[1].copy()])  # equal pixels, different arrays: both hits
    assert calls == []
    modified = images[1].copy()
    modified[0, 0] = 255 - modified[0, 0]  # a different input must not hit
    d.detect(modified)
    assert calls == [1]
    d.clear_cache()
    calls.clear()
    d.detect(images[0])
    assert calls == [1]


def test_background_pass_is_waited_for_not_repeated_and_gives_the_same_detections(models):
    import threading

    d = OnnxDetector(models["rect"])
    cold = OnnxDetector(models["rect"], cache_size=0)
    calls, entered, gate = [], threading.Event(), threading.Event()
    forward = d._forward

    def slow_forward(batch):
        calls.append(threading.current_thread().name)
        if calls[-1].startswith("echo-detector"):
            entered.set()
            gate.wait(5)  # the background pass is still running when detect() asks for its input
        return forward(batch)

    d._forward = slow_forward
    rng = np.random.default_rng(2)
    img = rng.integers(0, 100, (140, 180, 3), dtype=np.uint8)
    img[30:70, 40:100] = 255
    import cv2

    fut = d.prefetch_in_background(cv2.flip(img, 1))
    assert fut is not None and not fut.done()
    assert d.prefetch_in_background(cv2.flip(img, 1)) is None  # already running: not started twice
    assert entered.wait(5)
    threading.Timer(0.2, gate.set).start()
    got = d.detect(img, score_threshold=0.1, tta=True)  # the mirror is the background pass's
    assert got == cold.detect(img, score_threshold=0.1, tta=True)
    assert len(calls) == 2 and calls[0].startswith("echo-detector") and not calls[1].startswith("echo-detector")
    assert d.prefetch_in_background(cv2.flip(img, 1)) is None  # cached now
    assert len(calls) == 2
    d.detect(img, tta=True)
    assert len(calls) == 2


def test_failed_background_pass_falls_back_and_clear_cache_waits_for_running_passes(models):
    import threading

    d = OnnxDetector(models["rect"])
    cold = OnnxDetector(models["rect"], cache_size=0)
    forward, gate = d._forward, threading.Event()

    def flaky(batch):  # the background pass fails; the caller's own pass works
        if threading.current_thread().name.startswith("echo-detector"):
            gate.wait(5)
            raise RuntimeError("transient")
        return forward(batch)

    d._forward = flaky
    img = np.full((64, 80, 3), 40, np.uint8)
    img[10:40, 20:60] = 250
    fut = d.prefetch_in_background(img)
    gate.set()
    assert d.detect(img) == cold.detect(img)  # waited, saw the failure, ran the input itself
    with pytest.raises(RuntimeError):
        fut.result()
    slow = threading.Event()
    d._forward = lambda batch: slow.wait(5) and forward(batch)
    other = img.copy()
    other[0, 0] = 0
    late = d.prefetch_in_background(other)
    threading.Timer(0.2, slow.set).start()
    d.clear_cache()  # waits for the running pass: nothing lands in the cache afterwards
    assert late.done() and len(d._cache) == 0
    assert OnnxDetector(models["rect"], cache_size=0).prefetch_in_background(img) is None  # no cache, no speculation


def test_a_forked_child_forgets_the_parents_background_passes(models, monkeypatch):
    import os
    from concurrent.futures import Future

    d = OnnxDetector(models["rect"])
    img = np.full((64, 80, 3), 60, np.uint8)
    d.load()
    key = __import__("hashlib").sha256(d._letterboxed([img])[0][0].data).digest()
    d._inflight[key] = Future()  # a pass of the parent's thread, which a forked child does not have
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as seen from the child
    assert d.detect(img) == OnnxDetector(models["rect"], cache_size=0).detect(img)  # runs it, does not wait forever
    assert d._inflight == {} and d._background is None


def test_output_cache_is_bounded_and_read_only(models):
    d = OnnxDetector(models["rect"], cache_size=2)
    imgs = [np.full((64, 64, 3), v, np.uint8) for v in (10, 20, 30)]
    for img in imgs:
        d.detect(img)
    assert len(d._cache) == 2
    raw, _ = d.predict_raw(imgs[2:])
    assert not next(iter(d._cache.values())).flags.writeable
    raw[...] = 0  # the returned batch is the caller's own copy
    assert d.predict_raw(imgs[2:])[0].any()
    with pytest.raises(ValueError, match="cache_size"):
        OnnxDetector(models["rect"], cache_size=-1)


def test_concurrent_first_use_creates_one_session(models, monkeypatch):
    import onnxruntime as ort

    created = []
    real = ort.InferenceSession

    def counting(*a, **k):
        created.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    d = OnnxDetector(models["const"])
    results, errors = [], []

    def work():
        try:
            results.append(d.detect(blank(64, 64)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(created) == 1
    assert all(r == results[0] for r in results)


def test_session_options(models):
    d = OnnxDetector(models["const"], intra_op_threads=1).load()
    assert d._session.get_providers() == ["CPUExecutionProvider"]


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxDetector(tmp_path / "nope.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model" * 10)
    d = OnnxDetector(garbage)
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        d.detect(blank(10, 10))


def test_unexpected_output_layouts(models):
    with pytest.raises(ModelLoadError, match="4 \\+ num_classes"):
        OnnxDetector(models["bad_layout"]).load()
    with pytest.raises(ModelLoadError, match="3 classes"):
        OnnxDetector(models["wrong_nc"]).load()
    with pytest.raises(ModelLoadError, match="3 labels"):
        OnnxDetector(models["const"], labels=("a", "b", "c")).load()
    with pytest.raises(ModelLoadError, match="'segment' model"):
        OnnxDetector(models["segment"]).load()
    with pytest.raises(ModelLoadError, match="fixed 64x64"):
        OnnxDetector(models["const_fixed"], input_size=128).load()


def test_bad_inputs(models):
    d = OnnxDetector(models["const"])
    with pytest.raises(ChannelLayoutError):
        d.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ChannelLayoutError):
        d.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ChannelLayoutError):
        d.detect([[0]])  # type: ignore[arg-type]
    with pytest.raises(EchoInputError):
        d.detect(blank(10, 10), score_threshold=1.5)
    with pytest.raises(EchoInputError):
        d.detect(blank(10, 10), max_detections=0)
    with pytest.raises(EchoInputError):
        DetectorConfig(iou_threshold=-0.1)


# ---------------------------------------------------------------------------------------------
# load_detector / get_detector
# ---------------------------------------------------------------------------------------------
def _spec(name: str, weights: str | None) -> OrganSpec:
    return OrganSpec(
        name=name,
        image_labels=("normal", "benign", "malignant"),
        detector_labels=("benign", "malignant"),
        detector_weights=weights,
    )


def test_load_detector_paths_and_specs(models, tmp_path):
    assert isinstance(load_detector(models["const"]), OnnxDetector)
    assert isinstance(load_detector(str(models["const"])), OnnxDetector)
    with pytest.raises(ModelLoadError, match="no detector backend"):
        load_detector(tmp_path / "weights.bin")
    d = load_detector(_spec("testorgan", str(models["no_meta"])))
    assert d.labels == ("benign", "malignant")  # the spec's detector labels
    assert d.intra_op_threads is None  # the backend's default
    threaded = _spec("testorgan", str(models["no_meta"])).model_copy(update={"detector_threads": 2})
    assert load_detector(threaded).intra_op_threads == 2
    assert load_detector(threaded, intra_op_threads=1).intra_op_threads == 1  # an explicit argument wins
    with pytest.raises(ValueError):
        OrganSpec(name="x", image_labels=("normal", "a"), detector_labels=("a",), detector_threads=0)
    missing = tmp_path / "missing.onnx"
    with pytest.raises(
        ModelLoadError, match=r"'testorgan' detector weights are missing: expected .*missing\.onnx"
    ):
        load_detector(_spec("testorgan", str(missing)))
    with pytest.raises(ModelLoadError, match="no detector weights configured"):
        load_detector(_spec("testorgan", None))


def test_get_detector_caches_per_organ(models):
    register_organ(_spec("zz_test_organ", str(models["const"])), replace=True)
    try:
        clear_detector_cache()
        a = get_detector("zz_test_organ")
        assert get_detector("zz_test_organ") is a
        assert load_detector("zz_test_organ") is not a  # load_detector never caches
        clear_detector_cache()
        assert get_detector("zz_test_organ") is not a
    finally:
        unregister_organ("zz_test_organ")
        clear_detector_cache()


def test_import_is_light():
    code = (
        "import sys, echo_agent.detectors; "
        "heavy = [m for m in ('onnxruntime', 'cv2', 'torch', 'ultralytics') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_ultralytics_backend_without_the_extra(tmp_path, monkeypatch):
    from echo_agent.detectors import UltralyticsDetector, configure_ultralytics_offline
    from echo_agent.errors import MissingExtraError

    # pretend the train extra is absent (and keep this light test from importing torch)
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    for var in ("YOLO_CONFIG_DIR", "YOLO_OFFLINE", "YOLO_AUTOINSTALL"):
        monkeypatch.setenv(var, "")
    cfg = configure_ultralytics_offline(tmp_path / "cfg")
    assert cfg == (tmp_path / "cfg").resolve()
    assert Path(os.environ["YOLO_CONFIG_DIR"]) == cfg
    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "false"
    if importlib.util.find_spec("matplotlib") is not None:  # the font comes from matplotlib
        assert (cfg / "Ultralytics" / "Arial.ttf").stat().st_size > 10_000
    arch = tmp_path / "yolov8n.yaml"
    arch.write_text("nc: 2\n")
    det = UltralyticsDetector(arch)
    with pytest.raises(MissingExtraError, match=r"echo-agent\[train\]"):
        det.detect(blank(32, 32))
