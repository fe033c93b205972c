"""Class-agnostic merging of detector candidates (one box per lesion for breast) and what it feeds."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from _fakes import FakeDetector

from echo_agent.fusion import class_score, fusion_features
from echo_agent.messages import report_to_model
from echo_agent.organs import get_organ
from echo_agent.schemas import Box, Detection, DetectorReport
from echo_agent.tools import toolkit
from echo_agent.tools.toolkit import merge_across_classes, run_detector


def _det(box, label, score):
    return Detection(box=Box.from_xyxy(box), label=label, score=score)


def test_doctest():
    assert doctest.testmod(toolkit, optionflags=doctest.ELLIPSIS).failed == 0


def test_overlapping_boxes_of_two_classes_become_one_with_both_scores():
    a = _det([10, 10, 50, 50], "benign", 0.7)
    b = _det([12, 10, 50, 52], "malignant", 0.5)  # IoU with a = 0.86
    c = _det([100, 100, 140, 140], "malignant", 0.3)  # elsewhere: untouched
    out = merge_across_classes([c, b, a])
    assert [(d.label, d.score) for d in out] == [("benign", 0.7), ("malignant", 0.3)]
    assert out[0].class_scores == {"benign": 0.7, "malignant": 0.5}
    assert out[0].box == a.box  # the kept box is the best one, not an average
    assert out[1].class_scores is None


def test_same_class_duplicates_keep_the_best_score_and_iou_threshold_is_strict():
    a = _det([0, 0, 10, 10], "benign", 0.9)
    b = _det([0, 0, 10, 10], "malignant", 0.6)
    b2 = _det([0, 0, 10, 10], "malignant", 0.8)
    out = merge_across_classes([a, b, b2])
    assert len(out) == 1 and out[0].class_scores == {"benign": 0.9, "malignant": 0.8}
    # IoU exactly 0.5 is not "above" the threshold: both boxes stay
    left = _det([0, 0, 10, 10], "benign", 0.9)
    half = _det([0, 0, 10, 5], "malignant", 0.5)  # IoU = 50 / 100 = 0.5
    assert len(merge_across_classes([left, half])) == 2


def test_run_detector_merges_for_breast_but_not_for_kidney():
    img = np.full((120, 160, 3), 90, np.uint8)
    two = [([20, 20, 60, 60], "benign", 0.6), ([22, 20, 60, 62], "malignant", 0.55)]
    breast = run_detector("breast", img, detector=FakeDetector(two), preprocess=False)
    assert len(breast) == 1 and breast[0].class_scores == {"benign": 0.6, "malignant": 0.55}
    assert get_organ("breast").detector_agnostic_nms and not get_organ("kidney").detector_agnostic_nms
    one_class = [([20, 20, 60, 60], "hydronephrosis", 0.6), ([22, 20, 60, 62], "hydronephrosis", 0.55)]
    kidney = run_detector(
        "kidney", img, detector=FakeDetector(one_class, labels=("hydronephrosis",)), preprocess=False
    )
    assert len(kidney) == 2  # no merging configured: the detector's own NMS decides


def test_class_scores_reach_the_model_and_the_fusion_features():
    merged = merge_across_classes([_det([20, 20, 60, 60], "benign", 0.6), _det([22, 20, 60, 62], "malignant", 0.55)])
    report = DetectorReport(id="det1", organ="breast", detector="fake", detections=merged, score_threshold=0.25,
                            image_width=160, image_height=120)
    cand = report_to_model(report)["candidates"][0]
    assert cand["class_scores"] == {"benign": 0.6, "malignant": 0.55}
    assert class_score(merged[0], "malignant") == pytest.approx(0.55)
    assert class_score(_det([0, 0, 5, 5], "benign", 0.4), "malignant") == 0.0
    feats = fusion_features(get_organ("breast"), [report], None, (160, 120))
    assert feats["det_max_benign"] == pytest.approx(0.6) and feats["det_max_malignant"] == pytest.approx(0.55)
    plain = report_to_model(report.model_copy(update={"detections": [_det([0, 0, 5, 5], "benign", 0.4)]}))
    assert "class_scores" not in plain["candidates"][0]


@pytest.mark.parametrize("organ", ["breast", "kidney"])
def test_documented_input_size_matches_the_packaged_weights(organ):
    from echo_agent.detectors import load_detector

    spec = get_organ(organ)
    assert spec.detector_input_size == load_detector(spec).input_size
