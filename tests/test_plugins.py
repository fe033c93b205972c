"""The general mechanisms an organ plug-in relies on, exercised with a toy organ ("toy"), so no test
here depends on a real plug-in being installed: dataset centers, asset references, category heads,
descriptor sets and router heads."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from echo_agent.errors import ModelLoadError
from echo_agent.eval.datasets import (
    CenterSpec,
    DatasetBuild,
    center_organ,
    compute_splits,
    get_center,
    list_centers,
    load_split,
    register_center,
    unregister_center,
)
from echo_agent.eval.manifest import ManifestImage
from echo_agent.eval.splits import write_split_file
from echo_agent.organs import load_spec_yaml, register_organ, resolve_asset, unregister_organ
from echo_agent.schemas import Box, ClassificationResult, Finding, RegionClassification

TOY_YAML = """
name: toy
image_labels: [normal, nodule]
detector_labels: [nodule]
positive_label: nodule
category_system: TOY-RADS
category_source: classifier
categories:
  - {name: "1", description: "low", management: "follow up"}
  - {name: "2", description: "mid"}
  - {name: "3", description: "high", management: "sample it"}
"""


@pytest.fixture
def toy_spec():
    spec = register_organ(load_spec_yaml(TOY_YAML), replace=True)
    yield spec
    unregister_organ("toy")


# -- centers -----------------------------------------------------------------------------------------
def test_a_registered_center_loads_by_name_with_its_split(tmp_path: Path, toy_spec, monkeypatch) -> None:
    monkeypatch.setenv("ECHO_AGENT_DATA", str(tmp_path))
    (tmp_path / "TOY").mkdir()
    from PIL import Image

    for i in range(12):  # distinct pixels: the splitter merges pixel-identical images into one group
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(tmp_path / "TOY" / f"{i}.png")

    def adapter(root=None) -> DatasetBuild:
        ims = [ManifestImage(image=tmp_path / "TOY" / f"{i}.png", organ="toy", label="nodule", center="toy_center",
                             group=f"case{i // 2}", category=str(1 + i % 3)) for i in range(12)]
        return DatasetBuild(center="toy_center", images=ims)

    split_csv = tmp_path / "toy_center.csv"
    spec = CenterSpec("toy_center", "toy", "TOY", adapter, split_csv, stratify_by="category")
    register_center(spec)
    try:
        assert "toy_center" in list_centers() and center_organ("toy_center") == "toy"
        assert get_center("toy_center") is spec
        assignment = compute_splits(adapter())
        # the two images of a case never cross splits
        for i in range(0, 12, 2):
            key_a, key_b = (adapter().images[j].key for j in (i, i + 1))
            assert assignment[key_a] == assignment[key_b]
        write_split_file(assignment, split_csv)
        train = load_split("toy_center", "train")
        assert train and all(im.split == "train" and im.organ == "toy" for im in train)
        assert len(load_split("toy_center")) == 12
        with pytest.raises(ValueError, match="already registered"):
            register_center(CenterSpec("toy_center", "toy", "OTHER", adapter, split_csv))
    finally:
        unregister_center("toy_center")
    with pytest.raises(ValueError, match="unknown center 'toy_center'"):
        get_center("toy_center")


def test_center_spec_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lower-case identifier"):
        CenterSpec("Bad Name", "toy", "X", lambda root=None: None, tmp_path / "x.csv")
    with pytest.raises(TypeError, match="adapter must be callable"):
        CenterSpec("ok", "toy", "X", "not callable", tmp_path / "x.csv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stratify_by"):
        CenterSpec("ok", "toy", "X", lambda root=None: None, tmp_path / "x.csv", stratify_by="age")


def test_the_old_birads_column_still_reads(tmp_path: Path) -> None:
    from echo_agent.eval.manifest import load_manifest

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "m.csv").write_text("image,organ,label,birads\na.png,breast,benign,4A\n")
    (im,) = load_manifest(tmp_path / "m.csv", check_files=False)
    assert im.category == "4A" and im.birads == "4A"


# -- asset references ----------------------------------------------------------------------------------
def test_resource_references_point_into_installed_packages() -> None:
    p = resolve_asset("resource:echo_agent/assets/organs/breast.yaml")
    assert p.is_file() and p == resolve_asset("package:organs/breast.yaml")
    with pytest.raises(ValueError, match="not installed"):
        resolve_asset("resource:no_such_package_xyz/a.onnx")
    with pytest.raises(ValueError, match="must look like"):
        resolve_asset("resource:echo_agent")


# -- category heads ------------------------------------------------------------------------------------
def test_category_head_labels_sums_and_median(toy_spec) -> None:
    assert toy_spec.classifier_labels == ("normal", "1", "2", "3")
    labels, cats = toy_spec.split_classifier_output({"normal": 0.2, "1": 0.08, "2": 0.4, "3": 0.32})
    assert labels == pytest.approx({"normal": 0.2, "nodule": 0.8})
    assert cats == pytest.approx({"1": 0.1, "2": 0.5, "3": 0.4})
    assert toy_spec.category_from_distribution(cats) == "2"  # cumulative 0.1, 0.6: the median is "2"
    assert toy_spec.category_from_distribution({"1": 0.1, "2": 0.1, "3": 0.8}) == "3"
    assert toy_spec.split_classifier_output({"normal": 1.0, "1": 0.0, "2": 0.0, "3": 0.0})[1] is None
    # a probability cannot give a category head's category
    assert toy_spec.category_for(0.9) is None and toy_spec.band("3").management == "sample it"


def test_agreement_readout_answers_the_middle_when_unsure_and_the_head_when_sure(toy_spec) -> None:
    from echo_agent.organs import category_readout_index

    agree = toy_spec.model_copy(update={"category_readout": "agreement"})
    flat = {"1": 0.4, "2": 0.2, "3": 0.4}
    # the median of a flat-ish head is its lower half ("2" here by the cumulative rule); agreement
    # scores 2 p(k) + p(k-1) + p(k+1): "1" 1.0, "2" 1.2, "3" 1.0 -> the middle
    assert agree.category_from_distribution(flat) == "2"
    assert agree.category_from_distribution({"1": 0.05, "2": 0.05, "3": 0.9}) == "3"  # 1.85 vs 1.0
    # where they differ: median "2" (cumulative 0.3, 0.55); agreement 0.85 / 0.8 / 0.7 / 0.9 -> the last
    assert category_readout_index([0.3, 0.25, 0.0, 0.45], "median") == 1
    assert category_readout_index([0.3, 0.25, 0.0, 0.45], "agreement") == 3
    assert category_readout_index([0.3, 0.3, 0.0, 0.4], "agreement") == 0  # 0.9 ties 0.9: the lower wins
    assert category_readout_index([0.0, 0.0, 0.0], "agreement") == 1  # all zero reads uniform: the middle
    with pytest.raises(ValueError, match="unknown category read-out"):
        category_readout_index([0.5, 0.5], "mode")
    with pytest.raises(ValueError, match="at least one"):
        category_readout_index([], "median")
    with pytest.raises(ValueError, match="category_readout"):
        toy_spec.model_validate({**toy_spec.model_dump(), "category_readout": "mode"})


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ("category_source: probability", "need low and high"),
        ("category_labels: {'9': nodule}", "category_labels maps"),
        ("categories: []", "needs the categories"),
    ],
)
def test_category_head_spec_errors(patch: str, message: str) -> None:
    key = patch.split(":")[0]
    lines = [ln for ln in TOY_YAML.strip().splitlines() if not ln.startswith(key)]
    if key == "categories":
        lines = [ln for ln in lines if not ln.startswith("  - ")]
    with pytest.raises(ValueError, match=message):
        load_spec_yaml("\n".join([*lines, patch]))


def test_the_diagnosis_takes_the_category_of_the_leading_finding(toy_spec) -> None:
    from echo_agent.fusion.diagnosis import head_category
    from echo_agent.fusion.evidence import RunEvidence

    box = Box(x1=10, y1=10, x2=40, y2=40)
    res = ClassificationResult(
        id="cls1", organ="toy", classifier="t", image_width=100, image_height=100,
        regions=[RegionClassification(box=box, detection_id="det1:0", probabilities={"normal": 0.1, "nodule": 0.9},
                                      categories={"1": 0.1, "2": 0.2, "3": 0.7}),
                 RegionClassification(box=None, probabilities={"normal": 0.5, "nodule": 0.5},
                                      categories={"1": 0.8, "2": 0.1, "3": 0.1})],
    )
    ev = RunEvidence.of([res])
    linked = Finding(box=Box(x1=60, y1=60, x2=90, y2=90), label="nodule", score=0.8, detection_ids=["det1:0"])
    by_box = Finding(box=Box(x1=11, y1=11, x2=40, y2=40), label="nodule", score=0.8)
    elsewhere = Finding(box=Box(x1=60, y1=60, x2=90, y2=90), label="nodule", score=0.8)
    assert head_category(toy_spec, ev, linked) == "3"
    assert head_category(toy_spec, ev, by_box) == "3"
    assert head_category(toy_spec, ev, elsewhere) == "1"  # the whole image's distribution
    assert head_category(toy_spec, RunEvidence.of([]), elsewhere) is None


# -- categories counted from the look ------------------------------------------------------------------
COUNTED_YAML = TOY_YAML + """
descriptor_vocabulary:
  tone: [darker, brighter]
  edge: [smooth, rough]
suspicious_descriptors:
  tone: [darker]
  edge: [rough]
category_by_suspicious_count: ["1", "2", "3"]
"""


def _described(box: Box, **values: str):
    from echo_agent.schemas import Descriptor, ImageContext, RegionDescription

    return ImageContext(id="desc1", organ="toy", image_width=100, image_height=100, regions=[
        RegionDescription(box=box, descriptors={k: Descriptor(value=v) for k, v in values.items()})])


def test_a_category_counted_from_suspicious_descriptors() -> None:
    from echo_agent.schemas import Descriptor

    spec = load_spec_yaml(COUNTED_YAML)
    assert [spec.category_for_count(n) for n in range(5)] == ["1", "2", "3", "3", "3"]  # past the end: the last
    assert spec.suspicious_hits({"tone": Descriptor(value="darker"), "edge": Descriptor(value="smooth")}) == ["tone darker"]
    assert spec.suspicious_hits({}) == []
    assert not spec.category_from_probability
    assert load_spec_yaml(TOY_YAML).category_for_count(2) is None
    with pytest.raises(ValueError, match="cannot be negative"):
        spec.category_for_count(-1)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ('category_by_suspicious_count: ["1", "9"]', "not categories"),
        ('category_by_suspicious_count: ["2", "1"]', "must not go down"),
    ],
)
def test_category_by_count_spec_errors(patch: str, message: str) -> None:
    lines = [ln for ln in COUNTED_YAML.strip().splitlines() if not ln.startswith("category_by_suspicious_count")]
    with pytest.raises(ValueError, match=message):
        load_spec_yaml("\n".join([*lines, patch]))
    no_suspicious = TOY_YAML + 'category_by_suspicious_count: ["1", "2"]\n'
    with pytest.raises(ValueError, match="counts suspicious_descriptors"):
        load_spec_yaml(no_suspicious)


def test_the_diagnosis_counts_the_leading_findings_look_and_says_so() -> None:
    from echo_agent.fusion.diagnosis import assemble_diagnosis
    from echo_agent.fusion.evidence import RunEvidence

    spec = load_spec_yaml(COUNTED_YAML)
    box = Box(x1=10, y1=10, x2=40, y2=40)
    head = ClassificationResult(
        id="cls1", organ="toy", classifier="t", image_width=100, image_height=100,
        regions=[RegionClassification(box=None, probabilities={"normal": 0.2, "nodule": 0.8},
                                      categories={"1": 0.8, "2": 0.1, "3": 0.1})])
    lead = Finding(box=box, label="nodule", score=0.9)
    other = Finding(box=Box(x1=60, y1=60, x2=90, y2=90), label="nodule", score=0.5)

    def dx(evidence):
        return assemble_diagnosis(spec, RunEvidence.of(evidence), label="nodule",
                                  probabilities={"normal": 0.2, "nodule": 0.8}, findings=[lead, other], refs=[],
                                  rationale="Read as nodule.", clinical=None, lesion_found=True, min_confidence=0.5,
                                  reasoner="test", image_size=(100, 100))

    counted = dx([head, _described(box, tone="darker", edge="rough")])
    assert counted.category == "3" and counted.findings[0].category == "3"
    assert "shows 2 of 2 suspicious features (tone darker, edge rough)" in counted.rationale
    assert counted.findings[1].category == "1"  # never described: the head's category stands
    calm = dx([head, _described(box, tone="brighter", edge="smooth")])
    assert calm.category == "1" and "shows 0 of 2 suspicious features." in calm.rationale
    undescribed = dx([head])
    assert undescribed.category == "1" and "suspicious features" not in undescribed.rationale


def test_the_finalizer_prompt_of_an_organ_without_probability_bands() -> None:
    """A category head's or a counted category has no probability band to quote (this formatted
    None as a number and raised before)."""
    from _fakes import ScriptedChatModel
    from langchain_core.messages import HumanMessage

    from echo_agent.reasoners.llm_finalizer import LLMFinalizer
    from echo_agent.schemas import Diagnosis

    base = Diagnosis(organ="toy", label="nodule", probabilities={"normal": 0.2, "nodule": 0.8}, category="2",
                     category_system="TOY-RADS", rationale="r", recommendation="x", reasoner="t",
                     image_width=8, image_height=8)
    for yaml, how in ((TOY_YAML, "category distribution"), (COUNTED_YAML, "number of suspicious features")):
        spec = register_organ(load_spec_yaml(yaml), replace=True)
        try:
            state = {"evidence": [], "messages": [HumanMessage(content="Read this toy image.")]}
            msgs = LLMFinalizer(ScriptedChatModel()).build_messages(state, spec, base)
        finally:
            unregister_organ("toy")
        system = msgs[0].content if isinstance(msgs[0].content, str) else str(msgs[0].content)
        assert "category of the leading finding (1, 2, 3)" in system and how in system


# -- descriptor sets -----------------------------------------------------------------------------------
TOY_SET_MODULE = '''
from echo_agent.schemas import Descriptor

class ToySet:
    name = "toy-set/1"

    def describe(self, region):
        inside = region.roi[region.mask]
        around = region.roi[region.surround]
        darker = float(inside.mean()) < float(around.mean())
        return {"tone": Descriptor(value="darker" if darker else "brighter", confidence=0.9)}

    def caption(self, descriptors):
        return f"a {descriptors['tone'].value} toy lesion"

TOY_SET = ToySet()
NOT_A_SET = object()
'''


def test_a_plugin_descriptor_set_describes_the_organs_regions(tmp_path: Path, monkeypatch) -> None:
    from echo_agent.evidence.captioner import PixelCaptioner
    from echo_agent.evidence.descriptor_sets import load_descriptor_set

    (tmp_path / "toy_descriptors_mod.py").write_text(textwrap.dedent(TOY_SET_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = load_spec_yaml(TOY_YAML + "descriptor_set: toy_descriptors_mod:TOY_SET\n")
    register_organ(spec, replace=True)
    try:
        img = np.full((120, 120, 3), 140, np.uint8)
        img[40:80, 40:80] = 30  # a dark square "lesion"
        ctx = PixelCaptioner().describe(img, organ="toy", regions=[Box(x1=35, y1=35, x2=85, y2=85)])
        region = ctx.regions[0]
        assert region.descriptors["tone"].value == "darker"
        assert region.caption == "a darker toy lesion"
        assert "size_px" in region.descriptors and "segmentation" in region.descriptors
        assert "shape" not in region.descriptors  # the breast lexicon is not mixed in
    finally:
        unregister_organ("toy")
    with pytest.raises(ModelLoadError, match="lacks name/describe"):
        load_descriptor_set("toy_descriptors_mod:NOT_A_SET")
    with pytest.raises(ModelLoadError, match="has no attribute"):
        load_descriptor_set("toy_descriptors_mod:MISSING")
    with pytest.raises(ModelLoadError, match="cannot import"):
        load_descriptor_set("no_such_module_xyz:SET")


# -- router heads --------------------------------------------------------------------------------------
def _head_params(organ: str, logit: float) -> dict:
    """A router head whose decision does not depend on the image: ``logit`` for the organ vs unknown."""
    from echo_agent.organs.routing import FEATURE_NAMES, FEATURE_VERSION

    n = len(FEATURE_NAMES) + 1
    return {"feature_version": FEATURE_VERSION, "classes": [organ, "unknown"], "threshold": 0.6,
            "feature_mean": [0.0] * n, "feature_scale": [1.0] * n, "pca_mean": [0.0] * 256,
            "pca_components": [[0.0] * 256], "layers": [{"weight": [[0.0] * n, [0.0] * n], "bias": [logit, 0.0]}]}


@pytest.mark.parametrize(("logit", "routed"), [(6.0, True), (-6.0, False)])
def test_a_plugin_router_head_claims_its_images(tmp_path: Path, logit: float, routed: bool) -> None:
    from echo_agent.detectors.router_head import route_image

    head = tmp_path / f"head_{logit}.json"
    head.write_text(json.dumps(_head_params("toy", logit)))
    img = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    before = route_image(img)
    register_organ(load_spec_yaml(TOY_YAML + f"router_head: {head}\n"), replace=True)
    try:
        after = route_image(img)
    finally:
        unregister_organ("toy")
    if routed:
        assert after.organ == "toy" and after.confidence > 0.99 and "plug-in" in after.reason
    else:
        assert (after.organ, after.confidence) == (before.organ, before.confidence)


def test_a_head_that_recognises_another_organ_is_refused(tmp_path: Path) -> None:
    from echo_agent.detectors.router_head import route_image

    head = tmp_path / "wrong.json"
    head.write_text(json.dumps(_head_params("liver", 6.0)))
    register_organ(load_spec_yaml(TOY_YAML + f"router_head: {head}\n"), replace=True)
    try:
        with pytest.raises(ModelLoadError, match="recognises its own organ only"):
            route_image(np.zeros((64, 64, 3), np.uint8) + 100)
    finally:
        unregister_organ("toy")


def test_the_most_confident_accepting_head_wins_and_a_rejecting_head_changes_nothing() -> None:
    from echo_agent.organs.routing import RoutingResult, combine_heads

    base = RoutingResult("breast", 0.99, {"breast": 0.99}, "routed to breast")
    no = RoutingResult(None, 0.8, {}, "")
    assert combine_heads(base, [("liver", no)]) is base
    liver, spleen = RoutingResult("liver", 0.7, {}, ""), RoutingResult("spleen", 0.9, {}, "")
    r = combine_heads(base, [("liver", liver), ("spleen", spleen), ("pancreas", no)])
    assert (r.organ, r.confidence) == ("spleen", 0.9)
    assert r.scores["liver"] == 0.7 and "packaged router alone: breast" in r.reason


def test_an_onnx_router_head_routes_by_its_own_threshold(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from _fakes import tiny_classifier

    from echo_agent.detectors.router_head import OnnxRouterHead, load_router_head, route_image

    meta = {"labels": ["toy", "unknown"], "input_size": 32, "margin": 0.0, "offset": 127.0, "scale": 128.0,
            "temperature": 1.0, "accept_threshold": 0.7}
    head = tiny_classifier(tmp_path / "head.onnx", labels=("toy", "unknown"), meta=meta)  # darker: more "toy"
    dark = np.full((80, 80, 3), 5, np.uint8)
    bright = np.full((80, 80, 3), 250, np.uint8)
    h = load_router_head(head, "toy")
    assert isinstance(h, OnnxRouterHead) and h.threshold == 0.7
    assert h.decide(dark).organ == "toy" and h.decide(bright).organ is None
    register_organ(load_spec_yaml(TOY_YAML + f"router_head: {head}\n"), replace=True)
    try:
        assert route_image(dark).organ == "toy"
        assert route_image(bright).organ != "toy"
    finally:
        unregister_organ("toy")
    no_threshold = tiny_classifier(tmp_path / "nt.onnx", labels=("toy", "unknown"),
                                   meta={k: v for k, v in meta.items() if k != "accept_threshold"})
    with pytest.raises(ModelLoadError, match="accept_threshold"):
        OnnxRouterHead(no_threshold, "toy")
    with pytest.raises(ModelLoadError, match="must have"):
        OnnxRouterHead(head, "liver")


def test_the_linear_router_head_is_chosen_on_val_groups() -> None:
    pytest.importorskip("sklearn")
    from echo_agent.training.router_head import fit_linear_head

    rng = np.random.default_rng(0)

    def data(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (np.arange(n) % 3 == 0).astype(int)  # a third are the organ
        x = rng.normal(size=(n, 8)) + y[:, None] * 1.5
        return x, y

    (xt, yt), (xv, yv) = data(300), data(90)
    groups = np.where(yv == 1, "organ_center", np.where(np.arange(90) % 2 == 0, "busi", "negatives"))
    head = fit_linear_head(xt, yt, xv, yv, cs=(0.1, 1.0), groups_val=groups)
    assert head.c in (0.1, 1.0) and 0.3 <= head.threshold <= 0.95
    assert head.val_balanced_accuracy > 0.9
    p = head.probability(xv)
    assert ((p >= head.threshold) == yv).mean() > 0.9


def _train_router_tool():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "train_router.py"
    spec = importlib.util.spec_from_file_location("train_router_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["logreg", "mlp16"])
def test_a_binary_head_fitted_by_the_router_tool_loads_as_two_classes(kind: str, monkeypatch) -> None:
    pytest.importorskip("sklearn")
    from echo_agent.organs.routing import OrganRouter

    tool = _train_router_tool()
    monkeypatch.setattr(tool, "CLASSES", ("toy", "unknown"))
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    x = rng.normal(size=(200, 5)) + y[:, None] * 2.0
    layers = tool.fit_model(x, y, kind, 0.1 if kind.startswith("mlp") else 1.0, 0, np.ones(200))
    assert len(layers[-1]["weight"]) == 2 and len(layers[-1]["bias"]) == 2  # one row per class, as the router reads
    # the two rows give the same probabilities as the binary model: class 1 ("unknown") for y == 1
    router = object.__new__(OrganRouter)
    router._mean, router._scale = np.zeros(5), np.ones(5)
    router._layers = [(np.asarray(la["weight"]), np.asarray(la["bias"])) for la in layers]
    p = router.probabilities_from_vectors(x)
    assert ((p[:, 1] > 0.5) == (y == 1)).mean() > 0.9
