"""The organ router: plain-JSON parameters, determinism, rejection of non-ultrasound images, and
routing of real breast and kidney images (skipped without the shared data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from echo_agent.errors import ChannelLayoutError, ImageTooSmallError, ModelLoadError
from echo_agent.organs.routing import (
    FEATURE_NAMES,
    UNKNOWN,
    OrganRouter,
    RoutingResult,
    default_router,
    default_router_path,
    extract_features,
    load_router,
)

REPO = Path(__file__).resolve().parent.parent


def _colour_photo(seed: int, h: int = 360, w: int = 480) -> np.ndarray:
    """A colourful 'photograph': a smooth colour field with a few filled shapes."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(
        rng.integers(0, 256, size=(4, 5, 3)).astype(np.uint8), (w, h), interpolation=cv2.INTER_CUBIC
    )
    for _ in range(8):
        c = tuple(int(v) for v in rng.integers(0, 256, size=3))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(15, 90)), int(rng.integers(15, 90)))
        cv2.ellipse(field, centre, axes, 0, 0, 360, c, -1)
    return cv2.GaussianBlur(field, (0, 0), 1.5)


def test_packaged_router_is_plain_json_with_its_metadata() -> None:
    params = json.loads(default_router_path().read_text(encoding="utf-8"))
    assert params["classes"][-1] == UNKNOWN and {"breast", "kidney"} <= set(params["classes"])
    assert 0.0 < params["threshold"] < 1.0
    assert params["version"]
    n_in = len(FEATURE_NAMES) + len(params["pca_components"])
    assert len(params["feature_mean"]) == len(params["feature_scale"]) == n_in
    router = load_router()
    assert router is load_router()  # cached
    assert router.organs == ("breast", "kidney")


def test_import_pulls_no_training_libraries() -> None:
    code = (
        "import sys, numpy as np; from echo_agent.organs import routing as r; "
        "r.default_router(np.zeros((64, 64, 3), np.uint8)); "
        "print(sorted(m for m in ('sklearn', 'torch', 'pickle_mixin', 'joblib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "name, image",
    [
        ("black frame", np.zeros((480, 640, 3), np.uint8)),
        ("grey frame", np.full((300, 300, 3), 128, np.uint8)),
        ("white frame", np.full((200, 320, 3), 255, np.uint8)),
        ("uniform noise", np.random.default_rng(0).integers(0, 256, size=(400, 400, 3), dtype=np.uint8)),
        (
            "grey uniform noise",
            np.repeat(np.random.default_rng(1).integers(0, 256, size=(256, 320, 1), dtype=np.uint8), 3, 2),
        ),
        ("colour photo", _colour_photo(0)),
        ("another colour photo", _colour_photo(7, 600, 800)),
    ],
)
def test_non_ultrasound_images_are_unknown(name: str, image: np.ndarray) -> None:
    organ, confidence = default_router(image)
    assert organ is None, f"{name} was routed to {organ}"
    assert confidence is not None and 0.0 <= confidence <= 1.0


def test_routing_is_deterministic_and_scores_are_probabilities() -> None:
    img = _colour_photo(3)
    a, b = load_router().route(img), load_router().route(img.copy())
    assert isinstance(a, RoutingResult)
    assert a == b
    assert set(a.scores) == set(load_router().classes)
    assert abs(sum(a.scores.values()) - 1.0) < 1e-9
    assert a.reason


def test_features_are_finite_and_accept_grayscale() -> None:
    grey = np.random.default_rng(2).integers(0, 256, size=(120, 90), dtype=np.uint8)
    f2, t2 = extract_features(grey)
    f3, t3 = extract_features(np.repeat(grey[:, :, None], 3, axis=2))
    assert f2.shape == (len(FEATURE_NAMES),) and t2.shape == (256,)
    assert np.isfinite(f2).all() and np.array_equal(f2, f3) and np.array_equal(t2, t3)


def test_bad_inputs_raise_typed_errors() -> None:
    with pytest.raises(ChannelLayoutError):
        default_router(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(ImageTooSmallError):
        default_router(np.zeros((4, 100, 3), np.uint8))


def test_bad_router_files_raise_model_load_error(tmp_path: Path) -> None:
    params = json.loads(default_router_path().read_text(encoding="utf-8"))
    bad = tmp_path / "router.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        OrganRouter.from_file(bad)
    with pytest.raises(ModelLoadError, match="feature version"):
        OrganRouter({**params, "feature_version": 999})
    with pytest.raises(ModelLoadError, match="malformed"):
        OrganRouter({k: v for k, v in params.items() if k != "layers"})
    with pytest.raises(ModelLoadError, match="cannot read"):
        OrganRouter.from_file(tmp_path / "missing.json")


def test_threshold_rejects_a_low_confidence_organ() -> None:
    router = OrganRouter(load_router().params)
    probs = np.array([0.45, 0.30, 0.25])  # breast wins, but weakly
    router.threshold = 0.6
    r = router.decide(probs)
    assert r.organ is None and "threshold" in r.reason and r.confidence == pytest.approx(0.55)
    router.threshold = 0.4
    assert router.decide(probs).organ == "breast"
    assert router.decide(np.array([0.2, 0.3, 0.5])).organ is None


def _test_images(center: str, n: int) -> list[np.ndarray]:
    from PIL import Image

    from echo_agent.eval.datasets import load_split

    items = load_split(center, "test")
    picks = [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]
    return [np.asarray(Image.open(im.image).convert("RGB")) for im in picks]


@pytest.mark.parametrize(
    "center, organ", [("busi", "breast"), ("breast_lesions_usg", "breast"), ("hydronephrosis_ncnu", "kidney")]
)
def test_real_test_split_images_route_to_their_organ(shared_data: Path, center: str, organ: str) -> None:
    images = _test_images(center, 12)
    routed = [default_router(im)[0] for im in images]
    assert sum(r == organ for r in routed) >= 11, routed
    assert not any(r not in (organ, None) for r in routed), routed  # never the other organ


def test_routing_does_not_depend_on_the_frame_size(shared_data: Path) -> None:
    # A 224x224 kidney crop placed in a larger black frame (as other scanners export it) is still
    # kidney; a breast scan squeezed to 224x224 is still breast.
    kidney = _test_images("hydronephrosis_ncnu", 4)
    breast = _test_images("busi", 4)
    framed = [cv2.copyMakeBorder(k, 60, 120, 150, 150, cv2.BORDER_CONSTANT, value=(0, 0, 0)) for k in kidney]
    squeezed = [cv2.resize(b, (224, 224), interpolation=cv2.INTER_AREA) for b in breast]
    assert [default_router(im)[0] for im in framed].count("kidney") >= 3
    assert [default_router(im)[0] for im in squeezed].count("breast") >= 3
