"""A pool of second looks written as one ONNX region classifier."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from echo_agent.training.classifier_pool import pool_probabilities

pytest.importorskip("onnx")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from _fakes import tiny_classifier  # noqa: E402


def test_pool_probabilities_is_the_mean_of_the_log_odds() -> None:
    p = pool_probabilities([{"normal": 0.2, "lesion": 0.8}, {"normal": 0.6, "lesion": 0.4}])
    odds = np.sqrt((0.8 / 0.2) * (0.4 / 0.6))
    assert p["lesion"] == pytest.approx(odds / (1 + odds)) and sum(p.values()) == pytest.approx(1.0)
    assert pool_probabilities([{"a": 0.3, "b": 0.7}]) == pytest.approx({"a": 0.3, "b": 0.7})
    with pytest.raises(ValueError, match="disagree on the labels"):
        pool_probabilities([{"a": 0.5, "b": 0.5}, {"a": 0.5, "c": 0.5}])
    with pytest.raises(ValueError, match="nothing to pool"):
        pool_probabilities([])


def test_the_pooled_file_answers_as_the_pool_of_its_members(tmp_path: Path) -> None:
    from echo_agent.detectors import OnnxRegionClassifier
    from echo_agent.schemas import Box
    from echo_agent.training.classifier_pool import pool_region_classifiers

    a = tiny_classifier(tmp_path / "a.onnx", temperature=1.0)
    b = tiny_classifier(tmp_path / "b.onnx", temperature=4.0)  # the same net, softer: the pool differs from both
    out = pool_region_classifiers([a, b], tmp_path / "pool.onnx")
    pooled, ca, cb = (OnnxRegionClassifier(p) for p in (out, a, b))
    assert pooled.labels == ca.labels and pooled.info["kind"] == "pool" and pooled.info["temperature"] == 1.0
    assert [m["file"] for m in pooled.info["members"]] == ["a.onnx", "b.onnx"]
    img = np.zeros((60, 80, 3), np.uint8)
    img[:, 40:] = 230
    boxes = [None, Box(x1=45, y1=10, x2=75, y2=50), Box(x1=0, y1=0, x2=30, y2=30)]
    got = pooled.classify(img, boxes)
    for g, pa, pb in zip(got, ca.classify(img, boxes), cb.classify(img, boxes), strict=True):
        assert g == pytest.approx(pool_probabilities([pa, pb]), abs=1e-5)
        assert g != pytest.approx(pa, abs=1e-3) and g != pytest.approx(pb, abs=1e-3)


def _lopsided(path: Path, size: int = 32) -> Path:
    """A tiny classifier whose answer depends on where the bright pixels are (left counts, right not),
    so a crop and its mirror image get different answers."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(tiny_classifier(path, size=size)))
    ramp = np.linspace(2.0, 0.0, size, dtype=np.float32).reshape(1, 1, 1, size)
    m.graph.initializer.append(numpy_helper.from_array(ramp, "ramp"))
    m.graph.node.insert(0, helper.make_node("Mul", ["images", "ramp"], ["weighted"]))
    m.graph.node[1].input[0] = "weighted"
    onnx.save(m, str(path))
    return path


def test_a_mirror_pool_averages_the_crop_and_its_mirror_image(tmp_path: Path) -> None:
    from echo_agent.detectors import OnnxRegionClassifier
    from echo_agent.schemas import Box
    from echo_agent.training.classifier_pool import pool_region_classifiers

    a = _lopsided(tmp_path / "a.onnx")
    out = pool_region_classifiers([a], tmp_path / "mirror.onnx", mirror=True)
    one, both = OnnxRegionClassifier(a), OnnxRegionClassifier(out)
    import onnx

    weights = [i.name for i in onnx.load(str(out)).graph.initializer if i.name.endswith(("ramp", "W"))]
    assert both.info["mirror"] is True and len(weights) == 2  # the member's weights once: one batched pass
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :30] = 220  # bright on the left
    box = Box(x1=0, y1=0, x2=40, y2=40)
    flipped, fbox = np.ascontiguousarray(img[:, ::-1]), Box(x1=40, y1=0, x2=80, y2=40)
    for b, fb in ((None, None), (box, fbox)):
        p, q = one.classify(img, [b])[0], one.classify(flipped, [fb])[0]
        assert p != pytest.approx(q, abs=1e-3)  # the model is lopsided
        assert both.classify(img, [b])[0] == pytest.approx(pool_probabilities([p, q]), abs=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        pool_region_classifiers([a], tmp_path / "p.onnx")


def test_members_of_different_opsets_are_brought_to_one(tmp_path: Path) -> None:
    import onnx

    from echo_agent.detectors import OnnxRegionClassifier
    from echo_agent.training.classifier_pool import pool_region_classifiers

    a = tiny_classifier(tmp_path / "a.onnx")
    old = onnx.load(str(tiny_classifier(tmp_path / "b.onnx", temperature=3.0)))
    old.opset_import[0].version = 17  # opset 17's ReduceMean takes its axes as an attribute
    node = old.graph.node[0]
    del node.input[1]
    node.attribute.append(onnx.helper.make_attribute("axes", [2, 3]))
    del old.graph.initializer[2]
    onnx.save(old, str(tmp_path / "b17.onnx"))
    out = pool_region_classifiers([a, tmp_path / "b17.onnx"], tmp_path / "pool.onnx")
    img = np.full((40, 40, 3), 200, np.uint8)
    got = OnnxRegionClassifier(out).classify(img, [None])[0]
    want = pool_probabilities([OnnxRegionClassifier(p).classify(img, [None])[0] for p in (a, tmp_path / "b17.onnx")])
    assert got == pytest.approx(want, abs=1e-5)


def test_members_must_see_the_same_crop(tmp_path: Path) -> None:
    from echo_agent.training.classifier_pool import pool_region_classifiers

    a = tiny_classifier(tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="differ in 'input_size'"):
        pool_region_classifiers([a, tiny_classifier(tmp_path / "b.onnx", size=48)], tmp_path / "p.onnx")
    with pytest.raises(ValueError, match="differ in 'labels'"):
        pool_region_classifiers([a, tiny_classifier(tmp_path / "c.onnx", labels=("normal", "lesion"))], tmp_path / "p.onnx")
    with pytest.raises(ValueError, match="at least two"):
        pool_region_classifiers([a], tmp_path / "p.onnx")
    with pytest.raises(ValueError, match="not a region classifier"):
        pool_region_classifiers([a, tiny_classifier(tmp_path / "d.onnx", meta={})], tmp_path / "p.onnx")


def test_the_tool_refuses_to_overwrite_a_member(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pool_classifiers

    a, b = tiny_classifier(tmp_path / "a.onnx"), tiny_classifier(tmp_path / "b.onnx", temperature=2.0)
    before = a.read_bytes()
    with pytest.raises(SystemExit):
        pool_classifiers.main([str(a), str(b), "--output", str(a)])
    assert a.read_bytes() == before and "must not be one of the members" in capsys.readouterr().err
    assert pool_classifiers.main([str(a), str(b), "--output", str(tmp_path / "p.onnx")]) == 0
    assert (tmp_path / "p.onnx").is_file()
