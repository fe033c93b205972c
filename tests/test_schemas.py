"""Schemas: the one box conversion, Diagnosis validation and JSON schema."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from echo_agent.messages import diagnosis_from_model, diagnosis_to_model
from echo_agent.schemas import MODEL_BOX_SCALE, Box, ClinicalContext, Diagnosis, Finding


def test_box_validation_and_geometry():
    b = Box(x1=10, y1=20, x2=110, y2=70)
    assert (b.width, b.height, b.area, b.center) == (100, 50, 5000, (60, 45))
    assert b.iou(b) == 1.0 and b.iou(Box(x1=200, y1=200, x2=210, y2=210)) == 0.0
    assert Box(x1=0, y1=0, x2=10, y2=10).iou(Box(x1=5, y1=0, x2=15, y2=10)) == pytest.approx(50 / 150)
    for bad in ([5, 5, 5, 10], [10, 0, 0, 10], [0, 0, float("nan"), 1]):
        with pytest.raises(ValidationError):
            Box.from_xyxy(bad)
    with pytest.raises(ValueError, match="4 numbers"):
        Box.from_xyxy([1, 2, 3])
    assert b.clip(50, 50).to_list() == [10, 20, 50, 50]


def test_model_convention_known_values():
    assert Box(x1=0, y1=0, x2=200, y2=100).to_model(200, 100) == [0, 0, 1000, 1000]
    assert Box.from_model([250, 500, 750, 1000], 400, 200).to_list() == [100, 100, 300, 200]
    # out-of-range model coordinates are clamped, not trusted
    assert Box.from_model([-10, 0, 1200, 500], 100, 100).to_list() == [0, 0, 100, 50]
    with pytest.raises(ValueError):
        Box.from_model([0, 0, 10, 10], 0, 10)


@given(
    w=st.integers(16, 4000), h=st.integers(16, 4000),
    a=st.floats(0, 0.9), b=st.floats(0, 0.9), dw=st.floats(0.05, 0.1), dh=st.floats(0.05, 0.1),
)
def test_model_round_trip_within_a_thousandth(w, h, a, b, dw, dh):
    box = Box(x1=a * w, y1=b * h, x2=(a + dw) * w, y2=(b + dh) * h)
    back = Box.from_model(box.to_model(w, h), w, h)
    assert abs(back.x1 - box.x1) <= w / MODEL_BOX_SCALE / 2 + 1e-6
    assert abs(back.y2 - box.y2) <= h / MODEL_BOX_SCALE / 2 + 1e-6


def _dx(**kw):
    base = dict(organ="breast", label="malignant", probabilities={"normal": 0.1, "benign": 0.2, "malignant": 0.7},
                findings=[Finding(box=Box(x1=10, y1=10, x2=60, y2=40), label="malignant", score=0.9)],
                image_width=200, image_height=100)
    base.update(kw)
    return Diagnosis(**base)


def test_diagnosis_validation():
    dx = _dx()
    assert dx.probability == 0.7 and dx.box == Box(x1=10, y1=10, x2=60, y2=40)
    with pytest.raises(ValidationError, match="sum to 1"):
        _dx(probabilities={"normal": 0.5, "benign": 0.2, "malignant": 0.7})
    with pytest.raises(ValidationError, match="not one of the probability keys"):
        _dx(label="cyst")
    with pytest.raises(ValidationError):
        _dx(surprise=1)


def test_diagnosis_json_round_trip_and_schema():
    dx = _dx(category="4C", category_system="BI-RADS")
    data = json.loads(dx.model_dump_json())
    assert data["probability"] == 0.7 and data["box"]["x1"] == 10
    assert Diagnosis.model_validate(data) == dx
    schema = Diagnosis.json_schema()
    assert {"organ", "label", "probabilities"} <= set(schema["required"])
    assert "indeterminate" in schema["properties"]


def test_model_facing_diagnosis_uses_0_1000_boxes():
    dx = _dx()
    m = diagnosis_to_model(dx)
    assert m["findings"][0]["box"] == [50, 100, 300, 400]
    assert "box" not in m and "probability" not in m
    back = diagnosis_from_model(json.dumps(m), 200, 100)
    assert back.findings[0].box == dx.findings[0].box and back.label == dx.label


def test_clinical_context():
    c = ClinicalContext(age=52, symptoms="  palpable lump ")
    assert c.symptoms == "palpable lump" and "age 52" in c.as_text()
    assert ClinicalContext().is_empty()
    with pytest.raises(ValidationError):
        ClinicalContext(age=300)


def test_clinical_free_text_loses_control_and_bidi_characters():
    from echo_agent.schemas import ClinicalContext

    c = ClinicalContext(notes="lump\x00 \x1b[31mred\u202e evil\nline2\ttab", symptoms="\u2066pain\u2069")
    assert c.notes is not None and not any(ch in c.notes for ch in "\x00\x1b\u202e")
    assert "\n" in c.notes and "\t" in c.notes  # ordinary layout characters stay
    assert c.symptoms == "pain"


def test_detection_boxes_by_candidate_id():
    from echo_agent.schemas import (
        Box,
        Detection,
        DetectorReport,
        ImageContext,
        detection_boxes,
        detection_candidates,
    )

    b = Box(x1=1, y1=2, x2=30, y2=40)
    rep = DetectorReport(id="det2", organ="breast", detector="d", score_threshold=0.25, image_width=50, image_height=50,
                         detections=[Detection(id="det2:0", box=b, label="benign", score=0.4)])
    ctx = ImageContext(id="desc1", organ="breast", image_width=50, image_height=50)
    assert detection_boxes([rep, ctx]) == {"det2:0": b}
    assert detection_boxes([rep.model_dump(), ctx.model_dump()]) == {"det2:0": b}  # graph state's dict form
    assert detection_boxes([]) == {}
    assert detection_candidates([rep.model_dump(), ctx]) == {"det2:0": rep.detections[0]}  # the whole candidate
