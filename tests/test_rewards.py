"""GRPO rewards: hand-computed cases and geometry properties (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_agent.training.rewards import (
    ECHO_DIAG,
    ECHO_GROUND,
    box_diou,
    box_iou,
    classification_reward,
    format_reward,
    get_preset,
    localization_reward,
    parse_answer,
    shape_reward,
    tool_calls_of,
    tool_cost_reward,
)


def dx(label: str = "malignant", boxes: list[list[int]] | None = None, organ: str = "breast") -> str:
    probs = {"normal": 0.05, "benign": 0.05, "malignant": 0.05}
    probs[label] = 0.9
    findings = [{"box": b, "label": label, "score": 0.9} for b in boxes or []]
    return json.dumps({"organ": organ, "label": label, "probabilities": probs, "findings": findings})


def call(name: str, args: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": args}}


# -- hand-computed geometry ------------------------------------------------------------------------
def test_iou_and_diou_hand_computed() -> None:
    # overlap 5x10 = 50; union 100 + 100 - 50 = 150
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    # centres 5 apart, enclosing box 15x10 -> diagonal^2 325
    assert box_diou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3 - 25 / 325)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges do not overlap


def test_localization_thresholds_and_false_positives() -> None:
    gt = [[[0, 0, 100, 100]]]
    # IoU 0.6: hits at 0.3 and 0.5, not 0.75
    assert localization_reward([dx(boxes=[[0, 0, 100, 60]])], gt_boxes=gt) == pytest.approx([2 / 3])
    # the same plus a far false positive: half of the boxes are FPs -> minus 0.25
    two = dx(boxes=[[0, 0, 100, 60], [800, 800, 900, 900]])
    assert localization_reward([two], gt_boxes=gt) == pytest.approx([2 / 3 - 0.25])
    assert localization_reward([dx(boxes=[])], gt_boxes=[[]]) == [1.0]
    assert localization_reward(["not json"], gt_boxes=gt) == [0.0]
    # geometry in pixels: IoU is scale-invariant per axis, so width/height do not change it
    assert localization_reward([dx(boxes=[[0, 0, 100, 60]])], gt_boxes=gt, width=[640], height=[480]) == pytest.approx([2 / 3])


def test_classification_is_gated_by_iou() -> None:
    gt = [[[100, 100, 300, 300]]]
    assert classification_reward([dx("malignant", [[100, 100, 300, 300]])], gt_label=["malignant"], gt_boxes=gt) == [1.0]
    assert classification_reward([dx("malignant", [[600, 600, 700, 700]])], gt_label=["malignant"], gt_boxes=gt) == [0.25]
    assert classification_reward([dx("benign", [[100, 100, 300, 300]])], gt_label=["malignant"], gt_boxes=gt) == [0.0]
    assert classification_reward([dx("normal")], gt_label=["normal"], gt_boxes=[[]]) == [1.0]


def test_shape_reward_uses_diou() -> None:
    gt = [[[0, 0, 100, 100]]]
    exact, shifted = dx(boxes=[[0, 0, 100, 100]]), dx(boxes=[[200, 0, 300, 100]])
    r = shape_reward([exact, shifted], gt_boxes=gt * 2)
    # disjoint by 100: centre distance 200, enclosing 300x100 -> DIoU = -40000/100000 = -0.4 -> 0.3
    assert r == pytest.approx([1.0, 0.3])


def test_tool_cost_spares_strategic_rechecks() -> None:
    redundant = [{"role": "assistant", "content": "", "tool_calls": [call("detect_breast_lesions", {"tta": False})]},
                 {"role": "tool", "content": "{}"},
                 {"role": "assistant", "content": "", "tool_calls": [call("detect_breast_lesions", {"tta": False})]}]
    strategic = [{"role": "assistant", "content": "", "tool_calls": [call("detect_breast_lesions", {})]},
                 {"role": "tool", "content": "{}"},
                 {"role": "assistant", "content": "", "tool_calls": [
                     call("detect_breast_lesions", {"tta": True, "score_threshold": 0.1})]}]
    # text-form calls (what a model writes before TRL parses them) count the same way
    text = '<tool_call>\n{"name": "describe_image", "arguments": {}}\n</tool_call>' * 3
    assert tool_cost_reward([redundant, strategic, text]) == [-0.5, 0.0, -1.0]
    assert tool_cost_reward([strategic], budget=1) == [-0.5]
    assert len(tool_calls_of(text)) == 3


def test_format_reward_checks_calls_and_diagnosis() -> None:
    good_call = [{"role": "assistant", "content": "", "tool_calls": [call("detect_breast_lesions", {"tta": True})]},
                 {"role": "tool", "content": "{}"}, {"role": "assistant", "content": dx("benign")}]
    bad_call = [{"role": "assistant", "content": "", "tool_calls": [call("detect_breast_lesions", {"score_threshold": 7})]},
                {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "I think it is benign."}]
    wrong_labels = dx("benign").replace('"normal"', '"cyst"')
    organs = ["breast"] * 3
    assert format_reward([good_call, bad_call, wrong_labels], organ=organs) == [1.0, 0.0, 0.0]
    truncated = good_call[:2]  # valid call, no final answer yet
    assert format_reward([truncated], organ=["breast"]) == [0.5]
    assert format_reward(['{"box": [1, 2, 30, 40]}'], organ=["breast"], task=["rec"]) == [1.0]
    assert parse_answer(dx("benign", organ="kidney"), "breast", 100, 100) is None  # wrong organ


def test_rewards_read_findings_that_cite_candidates() -> None:
    """A finding may give detection ids instead of a box (as LLMFinalizer allows); the rewards take the
    box of the first cited candidate from the row's ``detections`` column."""
    by_id = json.dumps({"organ": "breast", "label": "malignant",
                        "probabilities": {"normal": 0.05, "benign": 0.05, "malignant": 0.9},
                        "findings": [{"label": "malignant", "score": 0.9, "detection_ids": ["det1:0"]}]})
    cols = {"organ": ["breast"], "width": [200], "height": [100]}
    dets = [json.dumps({"det1:0": [100, 100, 400, 400]})]
    assert parse_answer(by_id, "breast", 200, 100, dets[0])["boxes"] == [[100, 100, 400, 400]]
    assert parse_answer(by_id, "breast", 200, 100) is None  # no box and nothing to take it from
    assert parse_answer(by_id, "breast", 200, 100, {"det2:0": [0, 0, 10, 10]}) is None  # an unknown id
    assert localization_reward([by_id], gt_boxes=[[[100, 100, 400, 400]]], detections=dets, **cols) == [1.0]
    assert classification_reward([by_id], gt_label=["malignant"], gt_boxes=[[[100, 100, 400, 400]]],
                                 detections=dets, **cols) == [1.0]
    assert format_reward([by_id], detections=dets, **cols) == [1.0]
    assert format_reward([by_id], **cols) == [0.0]


def test_presets() -> None:
    assert ECHO_GROUND.weights["localization"] > ECHO_GROUND.weights["classification"]
    assert ECHO_DIAG.weights["classification"] > ECHO_DIAG.weights["localization"]
    assert [f.__name__ for f in ECHO_DIAG.funcs()] == [f"{n}_reward" for n in ECHO_DIAG.names]
    assert len(ECHO_DIAG.weight_list()) == len(ECHO_DIAG.funcs())
    with pytest.raises(ValueError, match="unknown reward preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown reward"):
        get_preset({"iou": 1.0})


# -- properties ----------------------------------------------------------------------------------------
coord = st.floats(min_value=0, max_value=1000, allow_nan=False, allow_infinity=False)


@st.composite
def boxes(draw: st.DrawFn) -> list[float]:
    x1, y1 = draw(coord), draw(coord)
    w = draw(st.floats(min_value=1e-3, max_value=1000, allow_nan=False))
    h = draw(st.floats(min_value=1e-3, max_value=1000, allow_nan=False))
    return [x1, y1, x1 + w, y1 + h]


@settings(max_examples=300, deadline=None)
@given(boxes(), boxes())
def test_iou_properties(a: list[float], b: list[float]) -> None:
    i = box_iou(a, b)
    assert 0.0 <= i <= 1.0 + 1e-12
    assert i == pytest.approx(box_iou(b, a))
    d = box_diou(a, b)
    assert -1.0 - 1e-9 <= d <= i + 1e-12
    assert d == pytest.approx(box_diou(b, a))


@settings(max_examples=100, deadline=None)
@given(boxes(), st.floats(min_value=0.1, max_value=10), st.floats(min_value=0.1, max_value=10))
def test_iou_self_and_scale_invariance(a: list[float], sx: float, sy: float) -> None:
    assert box_iou(a, a) == pytest.approx(1.0)
    assert box_diou(a, a) == pytest.approx(1.0)
    b = [a[0] + 1, a[1], a[2] + 1, a[3]]
    scaled = lambda z: [z[0] * sx, z[1] * sy, z[2] * sx, z[3] * sy]  # noqa: E731
    assert box_iou(scaled(a), scaled(b)) == pytest.approx(box_iou(a, b), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(boxes(), min_size=0, max_size=3), st.lists(boxes(), min_size=1, max_size=3))
def test_rewards_stay_in_range(pred: list[list[float]], gt: list[list[float]]) -> None:
    ints = lambda bs: [[int(round(v)) for v in b] for b in bs if round(b[2]) > round(b[0]) and round(b[3]) > round(b[1])]  # noqa: E731
    pred, gt = ints([[min(v, 1000) for v in b] for b in pred]), ints([[min(v, 1000) for v in b] for b in gt])
    c = [dx(boxes=pred)]
    for f in (localization_reward, shape_reward):
        (r,) = f(c, gt_boxes=[gt])
        assert 0.0 <= r <= 1.0
    (r,) = classification_reward(c, gt_label=["malignant"], gt_boxes=[gt])
    assert r in (0.0, 0.25, 1.0)
