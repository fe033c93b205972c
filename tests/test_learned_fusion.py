"""Learned fusion: features, fitting, JSON parameters (no pickle), diagnoses and citations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from echo_agent.errors import ModelLoadError
from echo_agent.organs import get_organ
from echo_agent.reasoners.fusion_training import RunRecord, fit_fusion
from echo_agent.reasoners.learned_fusion import (
    FusionParams,
    LearnedFusion,
    fusion_features,
    merged_candidates,
)
from echo_agent.schemas import (
    Box,
    ClinicalContext,
    Descriptor,
    Detection,
    DetectorReport,
    ImageContext,
    RegionDescription,
)

BREAST = get_organ("breast")


def _evidence(label: str | None, score: float, shape: str = "oval", tta: bool = False, eid: str = "det1"):
    dets = []
    if label is not None:
        dets = [Detection(id=f"{eid}:0", box=Box(x1=40, y1=30, x2=120, y2=80), label=label, score=score)]
    rep = DetectorReport(id=eid, organ="breast", detector="t", detections=dets, score_threshold=0.25, tta=tta,
                         image_width=200, image_height=160)
    regs = [RegionDescription(box=d.box, detection_id=d.id,
                              descriptors={"shape": Descriptor(value=shape, confidence=0.8)}) for d in dets]
    ctx = ImageContext(id="desc1", organ="breast", image_width=200, image_height=160, regions=regs,
                       global_descriptors={"annotations": Descriptor(value=False)})
    return [rep, ctx]


def _records(n: int = 90, seed: int = 0) -> list[RunRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        truth = ["normal", "benign", "malignant"][i % 3]
        if truth == "normal":
            ev = _evidence(None, 0.0) if rng.random() < 0.8 else _evidence("benign", 0.3)
        elif truth == "benign":
            ev = _evidence("benign" if rng.random() < 0.8 else "malignant", rng.uniform(0.4, 0.9), shape="oval")
        else:
            ev = _evidence("malignant" if rng.random() < 0.7 else "benign", rng.uniform(0.4, 0.9), shape="irregular")
        out.append(RunRecord(key=f"k{i}", group=f"g{i // 2}", organ="breast", label=truth, width=200, height=160,
                             evidence=[e.model_dump(mode="json") for e in ev], clinical={"age": 40 + i % 30}))
    return out


def test_features_are_named_and_bounded():
    f = fusion_features(BREAST, _evidence("malignant", 0.8, "irregular"), ClinicalContext(age=65, symptoms="palpable lump"), (200, 160))
    assert f["det_max_malignant"] == 0.8 and f["det_max_benign"] == 0.0
    assert f["desc_shape=irregular"] == 0.8 and f["desc_shape=oval"] == 0.0
    assert f["palpable"] == 1.0 and f["age"] == pytest.approx(1.0)
    assert not any(k.startswith("global_") for k in f) and "age_known" not in f  # center shortcuts
    empty = fusion_features(BREAST, _evidence(None, 0), None, (200, 160))
    assert empty["det_top"] == 0.0 and empty["age"] == 0.0


def test_merged_candidates_fuse_repeated_calls():
    a = _evidence("malignant", 0.8)[0]
    b = _evidence("malignant", 0.6, tta=True, eid="det2")[0]
    merged = merged_candidates([a, b])
    assert len(merged) == 1 and merged[0].id in ("det1:0", "det2:0")
    assert 0.6 <= merged[0].score <= 0.8


def test_fit_predicts_and_round_trips_through_json(tmp_path):
    params = fit_fusion(_records(), organ="breast", folds=3)
    assert params.training["oof_accuracy"] > 0.6
    path = tmp_path / "breast.json"
    path.write_text(params.to_json())
    raw = path.read_text()
    assert raw.lstrip().startswith("{")  # plain JSON, not a pickle
    loaded = FusionParams.from_json(raw)
    fusion = LearnedFusion({"breast": loaded})
    mal = fusion.fuse(BREAST, _evidence("malignant", 0.9, "irregular"), clinical=None, image_size=(200, 160))
    ben = fusion.fuse(BREAST, _evidence("benign", 0.9, "oval"), clinical=None, image_size=(200, 160))
    nor = fusion.fuse(BREAST, _evidence(None, 0.0), clinical=None, image_size=(200, 160))
    assert mal.label == "malignant" and ben.label == "benign" and nor.label == "normal"
    assert mal.probabilities["malignant"] > ben.probabilities["malignant"]
    assert nor.findings == [] and nor.category == "1"
    assert mal.category == BREAST.category_for(mal.probabilities["malignant"])
    assert "driven by" in mal.rationale and mal.findings[0].label == "malignant"
    # determinism
    assert fusion.fuse(BREAST, _evidence("malignant", 0.9, "irregular"), clinical=None, image_size=(200, 160)) == mal


def test_fused_label_overrides_a_disagreeing_detector_label():
    params = fit_fusion(_records(), organ="breast", folds=3)
    dx = LearnedFusion({"breast": params}).fuse(BREAST, _evidence("benign", 0.5, "irregular"), clinical=None, image_size=(200, 160))
    if dx.label == "malignant":
        assert dx.findings[0].label == "malignant" and dx.findings[0].detection_ids == ["det1:0"]


def test_without_params_falls_back_to_heuristic():
    dx = LearnedFusion({}).fuse(BREAST, _evidence("malignant", 0.8), clinical=None, image_size=(200, 160))
    assert dx.reasoner.startswith("heuristic")


def test_bad_parameter_files_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError):
        FusionParams.from_json("not json")
    good = json.loads(fit_fusion(_records(), organ="breast", folds=3).to_json())
    good["weights"] = good["weights"][:1]
    with pytest.raises(ModelLoadError, match="inconsistent"):
        FusionParams.from_json(json.dumps(good))
    with pytest.raises(ValueError, match="at least 10"):
        fit_fusion(_records(6), organ="breast")
