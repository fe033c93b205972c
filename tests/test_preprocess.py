"""Field-of-view cropping and annotation masking on synthetic ultrasound-like images."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from echo_agent.errors import ChannelLayoutError
from echo_agent.imaging.preprocess import prepare_for_detection
from echo_agent.schemas import Box

H, W = 500, 600


def _fan(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A sector-shaped speckle field on black with a dark lesion; returns (rgb, fan mask)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((H, W), np.uint8)
    cv2.ellipse(mask, (300, 40), (420, 420), 0, 55, 125, 1, -1)  # apex at top, opening downwards
    cv2.rectangle(mask, (0, 0), (W, 60), 0, -1)
    tissue = rng.normal(110, 25, (H, W)).clip(30, 180).astype(np.uint8)
    tissue = cv2.GaussianBlur(tissue, (3, 3), 0)
    cv2.ellipse(tissue, (300, 260), (40, 25), 0, 0, 360, 35, -1)  # hypoechoic lesion
    gray = np.where(mask > 0, tissue, 0).astype(np.uint8)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), mask.astype(bool)


def _annotate(rgb: np.ndarray) -> np.ndarray:
    out = rgb.copy()
    cv2.putText(out, "LT BREAST 3CM", (20, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
    cv2.putText(out, "12 MHz", (500, 480), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
    for x, y in ((250, 260), (350, 260)):  # white '+' calipers at the lesion edges
        cv2.line(out, (x - 6, y), (x + 6, y), (255, 255, 255), 1)
        cv2.line(out, (x, y - 6), (x, y + 6), (255, 255, 255), 1)
    for x in range(256, 346, 6):  # dotted measurement line
        out[260, x : x + 2] = 255
    cv2.rectangle(out, (230, 220), (370, 300), (230, 230, 0), 1)  # yellow ROI box
    return out


def test_crop_finds_the_fan_and_blacks_out_text_outside() -> None:
    clean, fan = _fan()
    prep = prepare_for_detection(_annotate(clean))
    ys, xs = np.nonzero(fan)
    x0, y0 = prep.crop
    h, w = prep.array.shape[:2]
    # the crop hugs the fan (within the half-resolution step) ...
    assert abs(x0 - xs.min()) <= 3 and abs(y0 - ys.min()) <= 3
    assert abs(x0 + w - (xs.max() + 1)) <= 3 and abs(y0 + h - (ys.max() + 1)) <= 3
    # ... so the text above the fan is gone, and the text beside it (outside the fan) is black
    assert prep.original_size == (W, H)
    assert prep.fov_mask.shape == (h, w) and prep.fov_mask.mean() > 0.5
    assert prep.array.dtype == np.uint8 and prep.array.shape[2] == 3
    assert (prep.array[~prep.fov_mask] == 0).all()


def test_calipers_lines_and_roi_box_are_removed() -> None:
    clean, _ = _fan()
    annotated = _annotate(clean)
    prep = prepare_for_detection(annotated)
    x0, y0 = prep.crop
    ref = cv2.cvtColor(clean, cv2.COLOR_RGB2GRAY)[y0 : y0 + prep.array.shape[0], x0 : x0 + prep.array.shape[1]]
    drawn = (np.abs(annotated.astype(int) - clean.astype(int)).sum(axis=2) > 0)[
        y0 : y0 + prep.array.shape[0], x0 : x0 + prep.array.shape[1]
    ] & prep.fov_mask
    out = prep.array[:, :, 0].astype(int)
    assert drawn.sum() > 300
    # nearly every drawn pixel was masked and now looks like the surrounding tissue
    assert prep.annotation_mask[drawn].mean() > 0.95
    assert (out[drawn] >= 200).mean() < 0.02
    assert np.abs(out[drawn] - ref[drawn]).mean() < 45
    assert 0 < prep.annotation_fraction < 0.05


def test_clean_image_is_nearly_untouched() -> None:
    clean, _ = _fan(seed=3)
    prep = prepare_for_detection(clean)
    assert prep.annotation_fraction < 0.002
    x0, y0 = prep.crop
    ref = clean[y0 : y0 + prep.array.shape[0], x0 : x0 + prep.array.shape[1]]
    inside = prep.fov_mask
    assert (prep.array[inside] == ref[inside]).mean() > 0.99


def test_full_frame_image_is_not_cropped() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(40, 200, (224, 224, 3), dtype=np.uint8)
    img[:] = img[:, :, :1]  # gray
    prep = prepare_for_detection(img)
    assert prep.crop == (0, 0) and prep.array.shape == (224, 224, 3) and prep.fov_mask.all()


def test_box_round_trip_and_clipping() -> None:
    clean, _ = _fan()
    prep = prepare_for_detection(_annotate(clean))
    x0, y0 = prep.crop
    box = Box(x1=260, y1=235, x2=340, y2=285)
    inner = prep.from_original(box)
    assert inner == Box(x1=260 - x0, y1=235 - y0, x2=340 - x0, y2=285 - y0)
    assert prep.to_original(inner) == box
    w, h = prep.size
    clipped = prep.from_original(Box(x1=0, y1=0, x2=x0 + 10, y2=y0 + 10))
    assert (clipped.x1, clipped.y1, clipped.x2, clipped.y2) == (0, 0, 10, 10)
    big = prep.to_original(Box(x1=0, y1=0, x2=w + 50, y2=h + 50))
    assert big.x2 <= W and big.y2 <= H
    assert y0 > 40  # the fan starts below the text band, so the crop is real
    with pytest.raises(ValueError):
        prep.from_original(Box(x1=100, y1=0, x2=200, y2=y0 - 5))  # entirely above the field


def test_deterministic_and_accepts_gray_and_rgba() -> None:
    clean, _ = _fan()
    a = prepare_for_detection(_annotate(clean))
    b = prepare_for_detection(_annotate(clean))
    assert np.array_equal(a.array, b.array) and a.crop == b.crop
    gray = prepare_for_detection(clean[:, :, 0])
    rgba = prepare_for_detection(np.dstack([clean, np.full((H, W), 255, np.uint8)]))
    ref = prepare_for_detection(clean)
    assert np.array_equal(gray.array, ref.array) and np.array_equal(rgba.array, ref.array)
    with pytest.raises(ChannelLayoutError):
        prepare_for_detection(clean.astype(np.float32))
    with pytest.raises(ChannelLayoutError):
        prepare_for_detection(np.zeros((10, 10, 2), np.uint8))


def test_fast_enough() -> None:
    img = _annotate(_fan()[0])
    prepare_for_detection(img)
    t = time.perf_counter()
    for _ in range(5):
        prepare_for_detection(img)
    per_call = (time.perf_counter() - t) / 5
    assert per_call < 0.1  # target is ~5 ms on an idle core; generous bound for shared CI machines
