"""Category heads in the second-look classifier trainer (``category_source: classifier``).

A toy organ whose categories come from its classifier: the trainer's labels must be
``OrganSpec.classifier_labels``, lesion and whole-image crops carry the image's reader category,
background crops ``normal``, and lesion images without a category are left out.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from echo_agent.eval.manifest import ManifestImage
from echo_agent.organs import OrganSpec, register_organ, unregister_organ
from echo_agent.schemas import Box
from echo_agent.training.region_classifier import (
    ClassifierTrainConfig,
    _val_metrics,
    build_samples,
    category_head_images,
    check_classifier_labels,
    is_category_head,
    median_categories,
    ordinal_targets,
    prepare_cases,
)

TOY = "toycat"
LABELS = ["normal", "2", "3", "4a"]


@pytest.fixture
def toy_organ() -> Iterator[OrganSpec]:
    spec = OrganSpec(
        name=TOY, image_labels=("normal", "nodule"), detector_labels=("nodule",), positive_label="nodule",
        category_system="TOY-RADS", category_source="classifier",
        categories=({"name": "2"}, {"name": "3"}, {"name": "4a"}),
    )
    register_organ(spec)
    try:
        yield spec
    finally:
        unregister_organ(TOY)


def _image(tmp_path: Path, name: str, label: str, category: str | None, box: bool = True) -> ManifestImage:
    from echo_agent.imaging import save_png

    rng = np.random.default_rng(sum(map(ord, name)))
    g = rng.integers(60, 120, size=(160, 200), dtype=np.uint8)
    boxes: tuple[Box, ...] = ()
    if box:
        g[60:100, 80:120] = 20  # a dark nodule in the middle
        boxes = (Box(x1=80, y1=60, x2=120, y2=100),)
    path = tmp_path / f"{name}.png"
    save_png(np.repeat(g[:, :, None], 3, axis=2), path)
    return ManifestImage(image=path, organ=TOY, label=label, boxes=boxes if label != "normal" else (),
                         category=category, center="toy", group=name)


def _config(**kw) -> ClassifierTrainConfig:
    return ClassifierTrainConfig(organ=TOY, labels=list(LABELS), centers=["toy"], **kw)


def test_labels_must_be_the_category_heads(toy_organ: OrganSpec) -> None:
    assert toy_organ.classifier_labels == tuple(LABELS)
    assert check_classifier_labels(_config()) == toy_organ and is_category_head(_config())
    for bad in (["normal", "nodule"], ["normal", "3", "2", "4a"], ["2", "3", "4a"]):
        with pytest.raises(ValueError, match=r"not the 'toycat' classifier labels \['normal', '2', '3', '4a'\].*category"):
            check_classifier_labels(ClassifierTrainConfig(organ=TOY, labels=bad, centers=["toy"]))
    # organs without a category head: the image labels, as before
    assert not is_category_head(ClassifierTrainConfig(organ="breast", labels=["normal", "benign", "malignant"], centers=[]))
    with pytest.raises(ValueError, match="image labels"):
        check_classifier_labels(ClassifierTrainConfig(organ="breast", labels=["normal", "malignant"], centers=[]))


def test_tool_refuses_a_config_with_wrong_labels(toy_organ: OrganSpec, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import train_classifier
    finally:
        sys.path.pop(0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"organ: {TOY}\nlabels: [normal, nodule]\ncenters: [toy]\n")
    with pytest.raises(SystemExit):
        train_classifier.main([str(cfg)])
    assert "classifier labels" in capsys.readouterr().err


def test_samples_carry_the_reader_category(toy_organ: OrganSpec, tmp_path: Path) -> None:
    images = [
        _image(tmp_path, "a", "nodule", "4a"),
        _image(tmp_path, "b", "nodule", "2"),
        _image(tmp_path, "c", "nodule", None),  # no category: left out
        _image(tmp_path, "d", "nodule", "4A", box=False),  # case-insensitive; whole image only
        _image(tmp_path, "e", "normal", None),
        _image(tmp_path, "f", "nodule", "4c"),  # not a category of this organ: left out
    ]
    kept, left = category_head_images(images, LABELS)
    assert [im.group for im in kept] == ["a", "b", "d", "e"] and [im.group for im in left] == ["c", "f"]
    with pytest.raises(ValueError, match="category_head_images"):
        prepare_cases(images, LABELS, category_head=True)
    cases = prepare_cases(kept, LABELS, category_head=True)
    assert [LABELS[c.label] for c in cases] == ["4a", "2", "4a", "normal"]
    assert [c.category for c in cases] == ["4a", "2", "4A", None]
    samples = build_samples(cases, random.Random(0), normal_index=0, background_per_image=1, background_shrink=2)
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for ci, _, lbl, kind in samples:
        by_kind.setdefault(kind, []).append((cases[ci].group, LABELS[lbl]))
    assert sorted(by_kind["whole"]) == [("a", "4a"), ("b", "2"), ("d", "4a"), ("e", "normal")]
    assert sorted(by_kind["lesion"]) == [("a", "4a"), ("b", "2")]
    assert by_kind["background"] and all(lbl == "normal" for _, lbl in by_kind["background"])
    # without the category head the same images keep their image labels
    plain = prepare_cases(kept, ["normal", "nodule"])
    assert [c.label for c in plain] == [1, 1, 1, 0]


def test_background_shrink_only_adds_regions(toy_organ: OrganSpec, tmp_path: Path) -> None:
    from echo_agent.training.region_classifier import PreparedCase

    arr = np.full((100, 100, 3), 90, np.uint8)
    big = PreparedCase("k", "g", arr, 1, [Box(x1=35, y1=5, x2=95, y2=95)])  # fills most of the frame
    plain = build_samples([big], random.Random(0), normal_index=0, background_per_image=3)
    again = build_samples([big], random.Random(0), normal_index=0, background_per_image=3, background_shrink=0)
    assert plain == again and not [s for s in plain if s[3] == "background"]
    shrunk = build_samples([big], random.Random(0), normal_index=0, background_per_image=3, background_shrink=3)
    assert any(s[3] == "background" for s in shrunk)


def test_median_category_matches_the_organ_spec(toy_organ: OrganSpec) -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(len(LABELS)) * 0.5, size=200)
    med = median_categories(p)
    for row, m in zip(p, med, strict=True):
        assert LABELS[m] == toy_organ.category_from_distribution(dict(zip(LABELS[1:], row[1:], strict=True)))
    assert median_categories(np.array([[1.0, 0, 0, 0]])).tolist() == [3]  # no category mass: the last, as the spec


def test_ordinal_targets() -> None:
    t = ordinal_targets(np.array([0, 1, 2, 3]), 4, 0.2)
    np.testing.assert_allclose(t, [[1, 0, 0, 0], [0, 0.8, 0.2, 0], [0, 0.1, 0.8, 0.1], [0, 0, 0.2, 0.8]], atol=1e-6)
    np.testing.assert_allclose(ordinal_targets(np.array([2]), 4, 0.0), [[0, 0, 1, 0]])


def test_val_metrics_of_a_category_head() -> None:
    # lesion boxes with truth 2, 3, 4a, 4a; predictions (median) 2, 4a, 2, 4a -> exact 2/4, within one 3/4
    def one_hot(i: int, normal: float = 0.0) -> list[float]:
        row = [0.0] * 4
        row[i] = 1.0 - normal
        row[0] += normal
        return row

    p = np.array([one_hot(1, 0.1), one_hot(3, 0.2), one_hot(1, 0.3), one_hot(3, 0.1),
                  one_hot(0), one_hot(1, 0.9),  # background regions
                  one_hot(3, 0.05)])  # a whole image
    z = np.log(np.clip(p, 1e-9, None))
    y = np.array([1, 2, 3, 3, 0, 0, 3])
    samples = [(0, None, int(lbl), kind) for lbl, kind in zip(y, ["lesion"] * 4 + ["background"] * 2 + ["whole"], strict=True)]
    m = _val_metrics(z, y, samples, LABELS, category_head=True)
    assert m["n_category_lesion"] == 4 and m["category_exact_lesion"] == pytest.approx(0.5)
    assert m["category_within_one_lesion"] == pytest.approx(0.75)
    assert m["category_exact_whole"] == 1.0 and m["n_category_whole"] == 1
    # lesion-vs-background AUC of 1 - p(normal): lesions 0.9, 0.8, 0.7, 0.9 vs background 0, 0.1
    assert m["auc_lesion_vs_background"] == pytest.approx(1.0)
    assert "auc_whole_lesion_vs_normal" not in m  # no normal whole image
    assert not any(k.startswith("auc_lesion_4a") for k in m)


@pytest.mark.heavy
def test_a_category_head_trains_and_exports(toy_organ: OrganSpec, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    import json

    from echo_agent.detectors import OnnxRegionClassifier
    from echo_agent.training.region_classifier import export_onnx, train_classifier

    images = [_image(tmp_path, f"i{i}", "nodule", ["2", "3", "4a"][i % 3]) for i in range(6)]
    cases = prepare_cases(images, LABELS, category_head=True)
    cfg = _config(pretrained=False, input_size=64, epochs=1, batch_size=8, background_shrink=2,
                  ordinal_smoothing=0.2, threads=1)
    model, report = train_classifier(cfg, cases[:4], cases[4:], log=lambda s: None)
    assert report["category_head"] and "category_exact_lesion" in report["val"]
    assert report["val_category_baseline"]["n_category_lesion"] == 2
    path = export_onnx(model, tmp_path / "head.onnx", cfg, report)
    clf = OnnxRegionClassifier(path)
    assert clf.labels == tuple(LABELS) == toy_organ.classifier_labels
    probs = clf.classify(cases[0].array, [None, *cases[0].boxes])
    labels, cats = toy_organ.split_classifier_output(probs[1])
    assert set(labels) == {"normal", "nodule"} and cats is not None and set(cats) == {"2", "3", "4a"}
    assert json.loads(json.dumps(clf.info))["config"]["ordinal_smoothing"] == 0.2
    with pytest.raises(ValueError, match="category heads only"):
        train_classifier(ClassifierTrainConfig(organ="breast", labels=["normal", "benign", "malignant"], centers=[],
                                               ordinal_smoothing=0.1), [], [])


def test_eval_tool_reads_a_category_head(toy_organ: OrganSpec, tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import eval_classifier
    finally:
        sys.path.pop(0)

    class Fake:  # says "3" with some doubt about "4a"; whole images a little less sure there is a nodule
        def classify(self, image, boxes):  # noqa: ANN001, ANN202
            return [{"normal": 0.3 if b is None else 0.1, "2": 0.0, "3": 0.5, "4a": 0.2 if b is None else 0.4}
                    for b in boxes]

    images = [_image(tmp_path, "a", "nodule", "3"), _image(tmp_path, "b", "nodule", "4a"),
              _image(tmp_path, "c", "nodule", None)]
    res = eval_classifier.evaluate(Fake(), images, toy_organ)
    assert res["n_category_lesion"] == 2 and res["category_exact_lesion"] == 0.5
    assert res["category_within_one_lesion"] == 1.0 and res["n_category_whole"] == 2
    assert res["n_lesion_boxes"] == 3 and res["acc_lesion_boxes"] == 1.0  # nodule = 0.9 on boxes


def test_thyroid_plugin_classifier_is_its_category_head() -> None:
    """The thyroid plug-in's packaged classifier (where installed) has the organ's classifier labels."""
    from echo_agent.organs import get_organ

    try:
        spec = get_organ("thyroid")
    except Exception:  # noqa: BLE001 - the plug-in is optional
        pytest.skip("the thyroid plug-in is not installed")
    path = spec.resolve_classifier_weights()
    if path is None or not path.is_file():
        pytest.skip("the thyroid plug-in has no classifier file")
    from echo_agent.detectors import OnnxRegionClassifier

    clf = OnnxRegionClassifier(path)
    assert spec.category_source == "classifier" and clf.labels == spec.classifier_labels
    assert path.stat().st_size <= 15 * 2**20 and clf.info["trained_on"]["split"] == "train"
    assert clf.info["initial_weights"].startswith("ImageNet")


@pytest.mark.heavy
def test_a_linear_probe_exports_what_it_computes(tmp_path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from echo_agent.detectors import OnnxRegionClassifier
    from echo_agent.training.linear_probe import Lite0Features, export_linear_onnx

    features = Lite0Features(input_size=96)
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(scale=0.05, size=(3, 1280)), rng.normal(size=3)
    path = export_linear_onnx(features, weight, bias, tmp_path / "p.onnx",
                              {"labels": ["normal", "a", "b"], "margin": 0.25})
    clf = OnnxRegionClassifier(path)
    image = rng.integers(0, 255, (120, 150, 3), dtype=np.uint8)
    expected = features([features.crop(image)]) @ weight.T + bias
    assert clf.labels == ("normal", "a", "b")
    np.testing.assert_allclose(clf.logits(image, [None]), expected, atol=0.05, rtol=0.02)  # fp16 weight storage
    # the probe's training samples: a box's crop with its margin, plain or augmented
    import random

    from echo_agent.detectors.region_classifier import square_crop
    from echo_agent.schemas import Box
    from echo_agent.training.region_classifier import PreparedCase

    case = PreparedCase(key="k", group="g", array=image, label=1)
    box = Box(x1=10, y1=20, x2=90, y2=100)
    plain = features.of_samples([case], [(0, box, 1, "lesion")], margin=0.25)
    crop = square_crop(image, box, margin=0.25, size=96)
    np.testing.assert_allclose(plain, features([crop]), rtol=1e-5, atol=1e-5)
    jittered = features.of_samples([case], [(0, box, 1, "lesion")], margin=0.25, rng=random.Random(3))
    assert plain.shape == jittered.shape == (1, 1280) and not np.allclose(plain, jittered)


def test_a_linear_probe_refuses_an_unknown_class_weighting(toy_organ) -> None:
    from echo_agent.training.linear_probe import train_linear_probe

    with pytest.raises(ValueError, match="probe_class_weight"):
        train_linear_probe(_config(probe_class_weight="inverse"), [], [])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_rows_reproduce_the_fitted_probabilities(n_classes: int) -> None:
    """The probe's per-label rows give scikit-learn's own probabilities, for a two-label organ (kidney:
    one fitted row) as for a multinomial one; a label absent from training gets no mass."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression

    from echo_agent.training.linear_probe import class_rows

    rng = np.random.default_rng(1)
    y = rng.integers(0, n_classes, 300)
    x = rng.normal(size=(300, 8)) + y[:, None] * 0.8
    m = LogisticRegression(max_iter=2000).fit(x, y)
    k = n_classes + 1  # one more label than the training samples show
    w, b = class_rows(m.coef_, m.intercept_, m.classes_, k)
    z = x @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(p[:, :n_classes], m.predict_proba(x), atol=1e-9)
    assert p[:, n_classes].max() < 1e-12 and p[:, :n_classes].std() > 0.05
    with pytest.raises(ValueError, match="coefficient rows"):
        class_rows(np.zeros((2, 8)), np.zeros(2), [0, 1, 2], 3)
