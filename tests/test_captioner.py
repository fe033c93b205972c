"""The pixel captioner: synthetic shapes with known answers, robustness, agreement maths, real images."""

from __future__ import annotations

import csv
import json
import math
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from echo_agent.errors import ChannelLayoutError, EchoInputError
from echo_agent.evidence import PixelCaptioner
from echo_agent.evidence._descriptors_stats import cohen_kappa, confusion
from echo_agent.organs import get_organ
from echo_agent.schemas import Box, ImageContext

# -- synthetic images ----------------------------------------------------------------------------


def _speckle(h: int, w: int, level: float, seed: int) -> np.ndarray:
    """Rayleigh speckle (fully developed), lightly smoothed, with the given mean level."""
    rng = np.random.default_rng(seed)
    s = cv2.GaussianBlur(rng.rayleigh(1.0, size=(h, w)).astype(np.float32), (0, 0), 1.0)
    return level * s / s.mean()


def _rgb(f: np.ndarray) -> np.ndarray:
    g = np.clip(f, 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def oval_cyst(seed: int = 0, enhancement: float = 1.6) -> tuple[np.ndarray, Box]:
    """Oval, wider than tall, anechoic region with a brighter band below it (posterior enhancement)."""
    bg = _speckle(320, 400, 110.0, seed)
    m = np.zeros(bg.shape, np.uint8)
    cv2.ellipse(m, (200, 110), (70, 35), 0, 0, 360, 1, -1)
    img = bg.copy()
    img[m > 0] = 6 + np.random.default_rng(seed + 1).normal(0, 2, int(m.sum()))
    img[150:, 140:261] *= enhancement
    return _rgb(img), Box.from_xyxy([128, 73, 273, 147])


def spiky_mass(seed: int = 0, shadow: float = 0.35) -> tuple[np.ndarray, Box]:
    """Star-shaped (spiculated), taller-than-wide, hypoechoic region with a dark band below (shadowing)."""
    bg = _speckle(360, 400, 120.0, seed)
    n = 11
    ang = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, 0.55)
    pts = np.stack([200 + 38 * r * np.cos(ang), 120 + 62 * r * np.sin(ang)], axis=1).astype(np.int32)
    m = np.zeros(bg.shape, np.uint8)
    cv2.fillPoly(m, [pts], 1)
    img = np.where(m > 0, _speckle(360, 400, 45.0, seed + 2), bg)
    img[185:, 165:236] *= shadow
    ys, xs = np.nonzero(m)
    return _rgb(img), Box.from_xyxy([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def kidney(seed: int = 0, pocket: bool = True) -> tuple[np.ndarray, Box]:
    """A kidney-like echogenic ellipse, optionally with an anechoic collecting-system pocket."""
    bg = _speckle(300, 400, 70.0, seed)
    k = np.zeros(bg.shape, np.uint8)
    cv2.ellipse(k, (200, 140), (120, 70), 0, 0, 360, 1, -1)
    img = np.where(k > 0, _speckle(300, 400, 120.0, seed + 1), bg)
    if pocket:
        p = np.zeros(bg.shape, np.uint8)
        cv2.ellipse(p, (200, 140), (60, 32), 0, 0, 360, 1, -1)
        img[p > 0] = 5.0
    return _rgb(img), Box.from_xyxy([80, 70, 320, 210])


@pytest.fixture(scope="module")
def cap() -> PixelCaptioner:
    return PixelCaptioner()


def _values(ctx: ImageContext, i: int = 0) -> dict[str, object]:
    return {k: d.value for k, d in ctx.regions[i].descriptors.items()}


# -- known answers -------------------------------------------------------------------------------


def test_oval_parallel_anechoic_cyst_with_enhancement(cap: PixelCaptioner) -> None:
    img, box = oval_cyst()
    v = _values(cap.describe(img, organ="breast", regions=[box]))
    assert v["shape"] == "oval"
    assert v["orientation"] == "parallel"
    assert v["margin"] == "circumscribed"
    assert v["echo_pattern"] == "anechoic"
    assert v["posterior_features"] == "enhancement"


def test_irregular_taller_than_wide_hypoechoic_mass_with_shadowing(cap: PixelCaptioner) -> None:
    img, box = spiky_mass()
    ctx = cap.describe(img, organ="breast", regions=[box])
    v = _values(ctx)
    assert v["shape"] == "irregular"
    assert v["orientation"] == "not parallel"
    assert v["margin_circumscribed"] is False
    assert v["margin"] in {"indistinct", "angular", "microlobulated", "spiculated"}
    assert v["echo_pattern"] == "hypoechoic"
    assert v["posterior_features"] == "shadowing"
    cap_text = ctx.regions[0].caption
    for word in ("irregular", "not parallel", "hypoechoic", "shadowing"):
        assert word in cap_text.lower()


def test_descriptor_values_come_from_the_organ_vocabulary(cap: PixelCaptioner) -> None:
    vocab = get_organ("breast").descriptor_vocabulary
    for img, box in (oval_cyst(), spiky_mass()):
        ctx = cap.describe(img, organ="breast", regions=[box])
        for name, d in ctx.regions[0].descriptors.items():
            assert 0.0 <= d.confidence <= 1.0
            if name in vocab:
                assert d.value in vocab[name], (name, d.value)


def test_confidence_follows_the_decision_margin(cap: PixelCaptioner) -> None:
    strong = cap.describe(oval_cyst(enhancement=2.0)[0], organ="breast", regions=[oval_cyst()[1]])
    weak = cap.describe(oval_cyst(enhancement=1.45)[0], organ="breast", regions=[oval_cyst()[1]])
    s, w = strong.regions[0].descriptors["posterior_features"], weak.regions[0].descriptors["posterior_features"]
    assert s.value == "enhancement"
    assert s.confidence > w.confidence
    none = cap.describe(oval_cyst(enhancement=1.0)[0], organ="breast", regions=[oval_cyst()[1]])
    assert none.regions[0].descriptors["posterior_features"].value != "enhancement"


def test_size_in_mm_with_pixel_spacing(cap: PixelCaptioner) -> None:
    img, box = oval_cyst()
    ctx = cap.describe(img, organ="breast", regions=[box], pixel_spacing_mm=(0.1, 0.1))
    d = ctx.regions[0].descriptors
    # the ellipse has 140 x 70 px axes -> 14 x 7 mm
    assert d["size_mm"].unit == "mm"
    assert d["size_mm"].value == pytest.approx(14.0, rel=0.1)
    assert d["size_short_mm"].value == pytest.approx(7.0, rel=0.15)
    assert ctx.global_descriptors["depth_mm"].value == pytest.approx(32.0, abs=0.5)
    assert "mm" in ctx.regions[0].caption
    no_spacing = cap.describe(img, organ="breast", regions=[box]).regions[0].descriptors
    assert "size_mm" not in no_spacing and no_spacing["size_px"].value == pytest.approx(140.0, rel=0.1)


def test_kidney_fluid_pocket(cap: PixelCaptioner) -> None:
    img, box = kidney(pocket=True)
    v = _values(cap.describe(img, organ="kidney", regions=[box]))
    assert v["collecting_system_fluid"] == "present"
    # the pocket covers pi*60*32 / (240*140) ~ 18 % of the box: mild (5-20 %) or moderate (20-40 %)
    assert v["fluid_extent"] in {"mild", "moderate"}
    assert v["acoustic_shadowing"] == "absent"
    vocab = get_organ("kidney").descriptor_vocabulary
    for name in vocab:
        assert v[name] in vocab[name]
    dry = _values(cap.describe(kidney(pocket=False)[0], organ="kidney", regions=[box]))
    assert dry["collecting_system_fluid"] == "absent"
    assert dry["fluid_extent"] == "none"


def test_global_descriptors_fov_geometry_and_quality(cap: PixelCaptioner) -> None:
    img, _ = oval_cyst()
    g = cap.describe(img, organ="breast").global_descriptors
    assert g["fov_geometry"].value == "linear"
    assert g["field_of_view"].value == "[0, 0, 400, 320]"
    assert 0.0 <= float(g["organ_plausibility"].value) <= 1.0
    # a fan-shaped field on black
    fan = np.zeros((300, 400, 3), np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    cv2.ellipse(mask, (200, -40), (330, 330), 0, 55, 125, 1, -1)
    fan[mask > 0] = _rgb(_speckle(300, 400, 100.0, 3))[mask > 0]
    gf = cap.describe(fan, organ=None).global_descriptors
    assert gf["fov_geometry"].value == "sector"
    assert "organ_plausibility" not in gf
    # over-gained image
    sat = np.full((200, 200, 3), 255, np.uint8)
    sat[:, :100] = 120
    assert cap.describe(sat, organ=None).global_descriptors["gain_saturation"].note == "over-gained"


def test_burned_in_annotations_are_reported(cap: PixelCaptioner) -> None:
    img = _rgb(_speckle(300, 400, 90.0, 5))
    clean = cap.describe(img, organ="breast").global_descriptors["annotations"]
    marked = img.copy()
    for x in range(40, 360, 40):  # yellow caliper crosses and a green measurement line
        cv2.drawMarker(marked, (x, 150), (255, 255, 0), cv2.MARKER_CROSS, 12, 2)
    cv2.line(marked, (40, 200), (360, 200), (0, 255, 0), 2)
    cv2.putText(marked, "L 2.31cm", (30, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
    ann = cap.describe(marked, organ="breast").global_descriptors["annotations"]
    assert clean.value == "absent"
    assert ann.value == "present"


# -- robustness ----------------------------------------------------------------------------------


def test_deterministic_and_input_not_mutated(cap: PixelCaptioner) -> None:
    img, box = spiky_mass(seed=4)
    before = img.copy()
    img.flags.writeable = False  # must not need to write
    a = cap.describe(img, organ="breast", regions=[box], detection_ids=["det1:0"], evidence_id="desc7")
    b = PixelCaptioner().describe(img, organ="breast", regions=[box], detection_ids=["det1:0"], evidence_id="desc7")
    assert np.array_equal(img, before)
    da, db = a.model_dump(), b.model_dump()
    da.pop("elapsed_ms"), db.pop("elapsed_ms")
    assert da == db
    assert a.id == "desc7" and a.regions[0].detection_id == "det1:0"
    assert a.captioner.startswith("pixel-captioner/")


@pytest.mark.parametrize(
    "xyxy",
    [
        [200.0, 100.0, 201.5, 101.0],  # tiny box
        [0.0, 0.0, 30.0, 20.0],  # at the corner
        [380.0, 300.0, 450.0, 400.0],  # partly outside the image
        [0.0, 0.0, 400.0, 320.0],  # the whole image
        [10.0, 150.0, 390.0, 158.0],  # very flat
    ],
)
def test_tiny_and_edge_boxes(cap: PixelCaptioner, xyxy: list[float]) -> None:
    img, _ = oval_cyst()
    ctx = cap.describe(img, organ="breast", regions=[Box.from_xyxy(xyxy)])
    d = ctx.regions[0].descriptors
    for key in ("shape", "orientation", "margin", "echo_pattern", "posterior_features"):
        assert key in d and 0.0 <= d[key].confidence <= 1.0
    feats = cap.features(img, xyxy)
    assert all(isinstance(v, float) and math.isfinite(v) for v in feats.values())


def test_invalid_inputs_raise_typed_errors(cap: PixelCaptioner) -> None:
    img, box = oval_cyst()
    with pytest.raises(ChannelLayoutError):
        cap.describe(img[:, :, 0], organ="breast")
    with pytest.raises(ChannelLayoutError):
        cap.describe(img.astype(np.float32), organ="breast")
    with pytest.raises(EchoInputError, match="detection_ids"):
        cap.describe(img, organ="breast", regions=[box], detection_ids=["a", "b"])
    with pytest.raises(EchoInputError, match="outside"):
        cap.describe(img, organ="breast", regions=[Box.from_xyxy([500, 500, 600, 600])])
    with pytest.raises(EchoInputError, match="pixel_spacing_mm"):
        cap.describe(img, organ="breast", regions=[box], pixel_spacing_mm=(0.0, 0.1))


def test_features_expose_raw_numbers(cap: PixelCaptioner) -> None:
    img, box = spiky_mass()
    f = cap.features(img, box)
    for key in ("solidity", "height_width_ratio", "echo_ratio", "posterior_log_ratio", "fluid_fraction"):
        assert key in f
    assert f["height_width_ratio"] > 1.2
    assert f["posterior_log_ratio"] < -0.3
    # a given mask replaces the segmentation
    m = np.zeros(img.shape[:2], bool)
    m[int(box.y1) : int(box.y2), int(box.x1) : int(box.x2)] = True
    assert cap.features(img, box, mask=m)["solidity"] > 0.95


@pytest.mark.parametrize("no_defects", ["none", "empty", "raises"])
def test_convex_region_has_no_concavity_on_every_opencv(
    cap: PixelCaptioner, monkeypatch: pytest.MonkeyPatch, no_defects: str
) -> None:
    """A convex mask: OpenCV 4 says ``None``, OpenCV 5 an empty array, some builds raise."""
    from echo_agent.evidence import _descriptors

    def fake(cnt, hull):  # noqa: ANN001 - cv2's signature
        if no_defects == "raises":
            raise cv2.error("degenerate hull")
        return None if no_defects == "none" else np.zeros((0, 1, 4), np.int32)

    monkeypatch.setattr(_descriptors.cv2, "convexityDefects", fake)
    img, box = spiky_mass()
    m = np.zeros(img.shape[:2], bool)
    m[int(box.y1) : int(box.y2), int(box.x1) : int(box.x2)] = True
    f = cap.features(img, box, mask=m)
    assert f["n_concavities"] == 0.0 and f["max_concavity"] == 0.0
    assert f["solidity"] > 0.95


def test_real_convex_region_through_installed_opencv(cap: PixelCaptioner) -> None:
    img, box = spiky_mass()
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    m = ((xx - cx) / max(1.0, (box.x2 - box.x1) / 2)) ** 2 + ((yy - cy) / max(1.0, (box.y2 - box.y1) / 2)) ** 2 <= 1
    f = cap.features(img, box, mask=m)
    assert f["max_concavity"] < 0.08


def test_thresholds_are_plain_json_and_complete() -> None:
    path = Path(__file__).resolve().parent.parent / "echo_agent" / "assets" / "captioner" / "thresholds.json"
    data = json.loads(path.read_text())
    for key in ("shape_irregular", "shape_round", "orientation", "margin_not_circumscribed", "echo", "posterior"):
        assert key in data["breast"]
    rule = data["breast"]["shape_irregular"]
    assert len(rule["features"]) == len(rule["weights"]) == len(rule["mean"]) == len(rule["scale"])
    assert {"kidney", "quality", "organ_plausibility"} <= set(data)


# -- agreement statistics ------------------------------------------------------------------------


def test_cohen_kappa_by_hand() -> None:
    # 2x2 table [[20, 5], [10, 15]]: po = 0.7, pe = (25*30 + 25*20) / 50^2 = 0.5 -> kappa 0.4
    t = ["a"] * 25 + ["b"] * 25
    p = ["a"] * 20 + ["b"] * 5 + ["a"] * 10 + ["b"] * 15
    assert cohen_kappa(t, p) == pytest.approx(0.4)
    assert confusion(t, p, ["a", "b"]).tolist() == [[20, 5], [10, 15]]
    assert cohen_kappa(t, t) == 1.0
    assert cohen_kappa(["a", "a"], ["a", "a"]) == 1.0


def test_cohen_kappa_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = ["oval", "round", "irregular"]
    t = list(rng.choice(labels, 200))
    p = [x if rng.random() < 0.6 else str(rng.choice(labels)) for x in t]
    assert cohen_kappa(t, p, labels) == pytest.approx(metrics.cohen_kappa_score(t, p, labels=labels))


# -- real images ---------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_breast_images_smoke(shared_data: Path, cap: PixelCaptioner) -> None:
    from PIL import Image

    base = shared_data / "BrEaST-Lesions_USG"
    rows = [r for r in csv.DictReader(open(base / "boxes.csv", newline="")) if r["mask_kind"] == "tumor"][:4]
    vocab = get_organ("breast").descriptor_vocabulary
    for r in rows:
        img = np.array(Image.open(base / r["image"]).convert("RGB"))
        box = Box.from_xyxy([float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max")])
        ctx = cap.describe(img, organ="breast", regions=[box], pixel_spacing_mm=(0.078, 0.078))
        d = ctx.regions[0].descriptors
        for name in vocab:
            assert d[name].value in vocab[name]
        assert d["segmentation"].value in {"dark", "bright"}
        assert 0.5 < d["size_mm"].value < 100.0
        assert ctx.caption and ctx.regions[0].caption
        assert ctx.global_descriptors["fov_geometry"].value in {"linear", "sector"}
        ImageContext.model_validate(ctx.model_dump())


# -- the validation tool's mapping and split -----------------------------------------------------


def _validation_tool():  # noqa: ANN202 - a script module
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / "validate_captioner.py"
    spec = importlib.util.spec_from_file_location("validate_captioner", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_radiologist_vocabulary_mapping() -> None:
    tool = _validation_tool()
    row = {
        "Shape": "irregular",
        "Margin": "not circumscribed - spiculated&angular&indistinct",
        "Echogenicity": "complex cystic/solid",
        "Posterior_features": "no",
        "Pixel_size": "0.0078125",
    }
    ref = tool.map_reference(row)
    assert ref["shape"] == "irregular"
    assert ref["margin"] == "not circumscribed"
    assert ref["margin_subtypes"] == {"spiculated", "angular", "indistinct"}
    assert ref["echo"] == "complex cystic/solid"
    assert ref["posterior"] == "none"
    assert ref["spacing_mm"] == pytest.approx(0.078125)
    assert tool.map_reference({**row, "Shape": "not applicable"}) is None
    assert tool.map_reference({**row, "Margin": "circumscribed"})["margin_subtypes"] == set()


def test_patient_split_is_fixed_and_disjoint() -> None:
    tool = _validation_tool()
    cases = [{"case": i} for i in range(1, 101)]
    a, b = tool.split(cases, seed=7)
    assert (a, b) == tool.split(cases, seed=7)
    assert not set(a) & set(b) and len(a) == len(b) == 50
    assert tool.split(cases, seed=8) != (a, b)


# -- whole-image analysis started ahead of describe() -------------------------------------------


def _dump(ctx: ImageContext) -> dict[str, object]:
    d = ctx.model_dump()
    d.pop("elapsed_ms")
    return d


def test_prefetched_analysis_gives_the_same_description() -> None:
    img, box = spiky_mass(seed=5)
    img.flags.writeable = False
    cap = PixelCaptioner()
    assert cap.prefetch(img) is True
    assert cap.prefetch(img) is False  # already pending: no second job
    got = cap.describe(img, organ="breast", regions=[box], evidence_id="d")
    assert not cap._pending  # taken by describe, not kept
    want = PixelCaptioner().describe(img, organ="breast", regions=[box], evidence_id="d")
    assert _dump(got) == _dump(want)
    # a different image of the same content still gets its own (equal) analysis
    other = img.copy()
    assert _dump(cap.describe(other, organ="breast", regions=[box], evidence_id="d")) == _dump(want)


@pytest.mark.parametrize("organ, spacing", [("breast", None), ("kidney", (0.1, 0.1)), (None, None)])
def test_prefetched_regions_give_the_same_description_and_are_taken_once(organ, spacing) -> None:
    img, box = spiky_mass(seed=6)
    img.flags.writeable = False
    other = Box(x1=5, y1=5, x2=40, y2=30)
    cap = PixelCaptioner()
    assert cap.prefetch_regions(img, [box, other], organ=organ, pixel_spacing_mm=spacing) == 2
    assert cap.prefetch_regions(img, [box], organ=organ, pixel_spacing_mm=spacing) == 0  # already pending
    assert cap._pending  # the whole-image analysis the regions need was started too
    calls = []
    real = cap._region_features
    inline = lambda: threading.current_thread() is threading.main_thread()  # noqa: E731
    cap._region_features = lambda *a, **k: (calls.append(a[2]) if inline() else None) or real(*a, **k)
    got = cap.describe(img, organ=organ, regions=[box, other], pixel_spacing_mm=spacing, evidence_id="d")
    assert calls == [] and not cap._pending_regions and not cap._pending  # both taken, none redone
    want = PixelCaptioner().describe(img, organ=organ, regions=[box, other], pixel_spacing_mm=spacing, evidence_id="d")
    assert _dump(got) == _dump(want)
    # a region analysed for other settings (or never prefetched) is analysed inline, the same
    cap.prefetch_regions(img, [box], organ="breast" if organ == "kidney" else "kidney", pixel_spacing_mm=spacing)
    again = cap.describe(img, organ=organ, regions=[box, other], pixel_spacing_mm=spacing, evidence_id="d")
    assert _dump(again) == _dump(want) and len(calls) == 2


def test_a_forked_child_forgets_the_parents_pending_analyses(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    from concurrent.futures import Future

    img, box = oval_cyst(seed=3)
    img.flags.writeable = False
    cap = PixelCaptioner()
    cap.prefetch(img)
    cap.prefetch_regions(img, [box], organ="breast")
    cap._pending[id(img)][1].result()
    never: Future = Future()
    never.set_running_or_notify_cancel()  # a job the parent's thread was running when it forked
    cap._pending[id(img)] = (img, never)
    cap._pending_regions = type(cap._pending_regions)((k, (img, never)) for k in cap._pending_regions)
    monkeypatch.setattr(os, "getpid", lambda: -1)
    got = cap.describe(img, organ="breast", regions=[box], evidence_id="d")  # computed here, no wait
    assert _dump(got) == _dump(PixelCaptioner().describe(img, organ="breast", regions=[box], evidence_id="d"))
    assert not cap._pending and not cap._pending_regions


def test_region_prefetch_skips_writable_arrays_and_failures_surface_in_describe() -> None:
    img, box = oval_cyst()
    cap = PixelCaptioner()
    assert cap.prefetch_regions(img, [box], organ="breast") == 0  # writable: could change before describe()
    img.flags.writeable = False
    outside = Box(x1=5000, y1=5000, x2=5100, y2=5100)
    assert cap.prefetch_regions(img, [outside], organ="breast") == 1  # fails (or is empty) in the background ...
    with pytest.raises(EchoInputError, match="outside"):  # ... describe() still refuses it with its own error
        cap.describe(img, organ="breast", regions=[outside])


def test_prefetch_skips_writable_arrays_and_bad_images_still_raise_typed_errors() -> None:
    from echo_agent.errors import ImageTooSmallError

    cap = PixelCaptioner()
    img, _ = oval_cyst()
    assert cap.prefetch(img) is False  # writable: its pixels could change before describe()
    tiny = np.zeros((4, 4, 3), np.uint8)
    tiny.flags.writeable = False
    assert cap.prefetch(tiny) is True  # fails in the background thread ...
    with pytest.raises(ImageTooSmallError):  # ... and describe() raises the typed error itself
        cap.describe(tiny, organ="breast")


def test_prefetch_keeps_a_bounded_number_of_pending_analyses() -> None:
    cap = PixelCaptioner()
    cap.prefetch_capacity = 3
    imgs = []
    for seed in range(5):
        img, _ = oval_cyst(seed=seed)
        img.flags.writeable = False
        imgs.append(img)
        cap.prefetch(img)
    assert len(cap._pending) == 3
    # an evicted image is analysed inline, with the same result
    a = cap.describe(imgs[0], organ="breast")
    b = PixelCaptioner().describe(imgs[0], organ="breast")
    assert _dump(a) == _dump(b)


def test_captioner_copies_and_pickles_without_its_thread() -> None:
    import copy
    import pickle

    cap = PixelCaptioner()
    img, box = oval_cyst()
    img.flags.writeable = False
    cap.prefetch(img)
    assert cap.prefetch([[1, 2, 3]]) is False  # not an array: nothing to do
    for clone in (copy.deepcopy(cap), pickle.loads(pickle.dumps(cap))):
        assert clone.thresholds == cap.thresholds and not clone._pending
        assert _dump(clone.describe(img, organ="breast", regions=[box])) == _dump(cap.describe(img, organ="breast", regions=[box]))
