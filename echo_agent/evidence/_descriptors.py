"""Pixel measurements behind the captioner: region segmentation and raw numeric features.

Everything here is plain numpy + OpenCV, deterministic and GPU-free. The public face is
:mod:`echo_agent.evidence.captioner`; this module only measures (numbers), it never decides
(lexicon words). Regions are analysed at a fixed working scale (the box's long side resampled to
``WORK_SIZE`` pixels) so that the cost per region does not grow with the image resolution and
the shape features are comparable across images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..detectors.base import check_image
from ..errors import ImageTooSmallError

#: Long side of a region's box after resampling to the working scale (pixels).
WORK_SIZE = 64
#: Gray level under which a pixel counts as outside the ultrasound field of view.
FOV_LEVEL = 8
#: Long side of the downsampled copy used for whole-image statistics.
GLOBAL_SIZE = 320
#: Angular sectors used for the per-direction margin contrast.
N_SECTORS = 16

_EPS = 1e-6
# segmentation parameters (chosen on the calibration half of BrEaST, see docs/captioner.md)
_SEG_ELLIPSE = 1.3
_SEG_CLOSE = 5
_SEG_SIGMA = 1.2
_POST_BAND = 0.6
_SEG_METHOD = "ard"
_SEG_ARD_SIGMA = 1.6
_SEG_ARD_LEVELS = 12
_POST_GAP = 2
_POST_STAT = "mean"
_POST_LAT_GAP = 0.15
_POST_LAT_WIDTH = 0.5


def to_gray(image: np.ndarray) -> np.ndarray:
    """Validate a canonical HxWx3 uint8 RGB array and return its luminance (HxW uint8)."""
    check_image(image, "the image to describe")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ImageTooSmallError(
            f"image of {image.shape[1]}x{image.shape[0]} px is too small to describe; give at least 8x8 px"
        )
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


# ------------------------------------------------------------------------------------------------
# whole image
# ------------------------------------------------------------------------------------------------


@dataclass
class GlobalAnalysis:
    """Whole-image measurements (pixel units of the original image)."""

    fov_box: tuple[int, int, int, int]
    fov_mask: np.ndarray  # full-resolution bool mask of the field of view
    features: dict[str, float] = field(default_factory=dict)


def fov_mask(gray: np.ndarray) -> np.ndarray:
    """Boolean mask of the ultrasound field of view: the largest non-black region, holes filled."""
    return _fov_mask_and_small(gray)[0]


def _global_small(gray: np.ndarray) -> np.ndarray:
    """The downsampled copy (long side :data:`GLOBAL_SIZE`) behind the whole-image statistics."""
    h, w = gray.shape
    s = min(1.0, GLOBAL_SIZE / max(h, w))
    return cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _fov_mask_and_small(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fov_mask` and the :func:`_global_small` copy it was found on (shared, not recomputed)."""
    h, w = gray.shape
    s = min(1.0, GLOBAL_SIZE / max(h, w))
    small0 = _global_small(gray)
    small = cv2.medianBlur(small0, 5)
    m = (small >= FOV_LEVEL).astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return np.ones_like(gray, dtype=bool), small0
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    m = (lab == k).astype(np.uint8)
    m = _fill_holes(m)
    if s < 1.0:
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    return m.astype(bool), small0


def analyse_image(image: np.ndarray, gray: np.ndarray) -> GlobalAnalysis:
    """Field of view, quality and layout statistics of the whole image."""
    h, w = gray.shape
    fov, small = _fov_mask_and_small(gray)
    n_fov = int(np.count_nonzero(fov))
    if n_fov == 0:  # pragma: no cover - fov_mask never returns an empty mask
        fov = np.ones_like(gray, dtype=bool)
        n_fov = fov.size
    rows_any = np.flatnonzero(fov.any(axis=1))
    cols_any = np.flatnonzero(fov.any(axis=0))
    fx1, fy1, fx2, fy2 = int(cols_any[0]), int(rows_any[0]), int(cols_any[-1]) + 1, int(rows_any[-1]) + 1
    f: dict[str, float] = {}
    f["fov_x1"], f["fov_y1"], f["fov_x2"], f["fov_y2"] = float(fx1), float(fy1), float(fx2), float(fy2)
    f["fov_fraction"] = float(n_fov / fov.size)
    bbox_area = float((fx2 - fx1) * (fy2 - fy1))
    f["fov_fill"] = float(n_fov / max(bbox_area, 1.0))
    rows = fov[fy1:fy2, fx1:fx2]
    rh = rows.shape[0]
    top = rows[int(rh * 0.05) : max(int(rh * 0.15), int(rh * 0.05) + 1)].sum(axis=1).mean()
    bot = rows[int(rh * 0.80) : max(int(rh * 0.90), int(rh * 0.80) + 1)].sum(axis=1).mean()
    f["fov_top_bottom_width_ratio"] = float(top / max(bot, 1.0))
    f["depth_px"] = float(fy2 - fy1)

    # quality statistics on a downsampled copy restricted to the field of view
    sh, sw = small.shape  # the same INTER_AREA copy the field of view was found on
    sfov = cv2.resize(fov.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST).astype(bool)
    inner = cv2.erode(sfov.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    if inner.sum() < 64:
        inner = sfov
    v = small[inner].astype(np.float32)
    p5, p50, p95 = np.percentile(v, [5, 50, 95])
    f["contrast"] = float((p95 - p5) / 255.0)
    f["rms_contrast"] = float(v.std() / max(v.mean(), 1.0))
    f["median_level"] = float(p50)
    # Immerkaer's fast noise estimate (Laplacian-difference mask), on the full-resolution FOV
    full_inner = cv2.erode(fov.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    lap = cv2.filter2D(gray.astype(np.float32), -1, _IMMERKAER)
    sel = np.abs(lap[full_inner]) if full_inner.any() else np.abs(lap).ravel()
    f["noise_sigma"] = float(math.sqrt(math.pi / 2.0) * sel.mean() / 6.0) if sel.size else 0.0
    # speckle index: median over 8x8 blocks of local std / local mean
    bs = 8
    bh, bw = sh // bs, sw // bs
    if bh >= 1 and bw >= 1:
        blk = small[: bh * bs, : bw * bs].astype(np.float32).reshape(bh, bs, bw, bs)
        bm = blk.mean(axis=(1, 3))
        bsd = blk.std(axis=(1, 3))
        bf = inner[: bh * bs, : bw * bs].reshape(bh, bs, bw, bs).all(axis=(1, 3)) & (bm > 10)
        f["speckle_index"] = float(np.median(bsd[bf] / bm[bf])) if bf.any() else 0.0
    else:
        f["speckle_index"] = 0.0
    f["saturation_fraction"] = float(np.count_nonzero((gray >= 250) & fov) / n_fov)
    f["dark_fraction"] = float(np.count_nonzero((gray <= 3) & fov) / n_fov)
    f["annotation_fraction"] = _annotation_fraction(image, gray, fov)
    f["layering"] = _horizontal_layering(small, inner)
    return GlobalAnalysis(fov_box=(fx1, fy1, fx2, fy2), fov_mask=fov, features=f)


_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)


def _annotation_fraction(image: np.ndarray, gray: np.ndarray, fov: np.ndarray) -> float:
    """Share of the field of view covered by burned-in annotations (the imaging layer's detector)."""
    from ..imaging.preprocess import annotation_mask

    n = int(fov.sum())
    if n == 0:
        return 0.0
    return float((annotation_mask(image, gray) & fov).sum() / n)


def _horizontal_layering(small: np.ndarray, inner: np.ndarray) -> float:
    """Share of gradient energy that is vertical (horizontal layers) in the upper half of the FOV."""
    g = cv2.GaussianBlur(small, (0, 0), 1.5).astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    ys = np.nonzero(inner.any(axis=1))[0]
    if ys.size < 4:
        return 0.5
    y1, y2 = ys[0], ys[0] + (ys[-1] - ys[0]) // 2
    sel = inner[y1:y2]
    ex = float((gx[y1:y2][sel] ** 2).sum())
    ey = float((gy[y1:y2][sel] ** 2).sum())
    return ey / max(ex + ey, _EPS)


# ------------------------------------------------------------------------------------------------
# one region
# ------------------------------------------------------------------------------------------------


@dataclass
class RegionAnalysis:
    """Segmentation and raw features of one region, at the working scale."""

    box: tuple[int, int, int, int]  # clipped integer box in original pixels
    scale: float  # working pixels per original pixel
    mask: np.ndarray  # bool mask in ROI coordinates (working scale)
    roi_origin: tuple[int, int]  # (x, y) of the ROI in original pixels
    features: dict[str, float]
    segmentation: str  # "dark", "bright", "ellipse" or "given"
    contour_mm: tuple[float, float] | None = None
    roi: np.ndarray | None = None  # grey ROI at the working scale (the mask's frame)


def _fill_holes(m: np.ndarray) -> np.ndarray:
    h, w = m.shape
    # background padded by one pixel so a single flood fill from the corner reaches all of it
    bg = np.ones((h + 2, w + 2), np.uint8)
    bg[1:-1, 1:-1] = (m == 0).astype(np.uint8)
    cv2.floodFill(bg, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 2)
    holes = bg[1:-1, 1:-1] == 1
    out = m.copy()
    out[holes] = 1
    return out


def clip_box(box: tuple[float, float, float, float], width: int, height: int, min_size: int = 4) -> tuple[int, int, int, int]:
    """Round a float pixel box to integers inside the image, grown to at least ``min_size`` px."""
    x1, y1, x2, y2 = box
    x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
    y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
    ix1, iy1, ix2, iy2 = int(math.floor(x1)), int(math.floor(y1)), int(math.ceil(x2)), int(math.ceil(y2))
    if ix2 - ix1 < min_size:
        c = (ix1 + ix2) // 2
        ix1 = max(0, min(c - min_size // 2, width - min_size))
        ix2 = min(width, ix1 + min_size)
    if iy2 - iy1 < min_size:
        c = (iy1 + iy2) // 2
        iy1 = max(0, min(c - min_size // 2, height - min_size))
        iy2 = min(height, iy1 + min_size)
    return ix1, iy1, ix2, iy2


def _component_near_centre(cand: np.ndarray, centre_weight: np.ndarray) -> np.ndarray | None:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(cand.astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    score = np.bincount(lab.ravel(), weights=centre_weight.ravel(), minlength=n)
    score[0] = -1
    k = int(np.argmax(score))
    if score[k] <= 0:
        return None
    return (lab == k).astype(np.uint8)


def segment(g: np.ndarray, bx: tuple[int, int, int, int]) -> tuple[np.ndarray, str]:
    """Segment the lesion inside box ``bx`` of the smoothed working-scale ROI ``g``."""
    if _SEG_METHOD == "ard":
        return segment_ard(g, bx)
    return segment_otsu(g, bx)


def segment_ard(g: np.ndarray, bx: tuple[int, int, int, int]) -> tuple[np.ndarray, str]:
    """Threshold sweep that keeps the contour with the largest average radial derivative.

    The inverted image (lesions are usually darker than tissue) is weighted by a Gaussian centred
    on the box, thresholded at a ladder of levels; for each level the component covering the
    centre is scored by the mean outward intensity derivative along its boundary, and the best
    one wins (the idea of Horsch et al., Med Phys 2001, for breast ultrasound).
    """
    H, W = g.shape
    # work on the box plus a 3 px margin (outside the box nothing is kept, so results are the same
    # as on the whole ROI, at a fraction of the cost)
    ox1, oy1 = max(0, bx[0] - 3), max(0, bx[1] - 3)
    ox2, oy2 = min(W, bx[2] + 3), min(H, bx[3] + 3)
    gx_full = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)[oy1:oy2, ox1:ox2]
    gy_full = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)[oy1:oy2, ox1:ox2]
    sub = g[oy1:oy2, ox1:ox2]
    x1, y1, x2, y2 = bx[0] - ox1, bx[1] - oy1, bx[2] - ox1, bx[3] - oy1
    bw, bh = x2 - x1, y2 - y1
    h, w = sub.shape
    cx, cy = (x1 + x2 - 1) / 2.0, (y1 + y2 - 1) / 2.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d2 = ((xx - cx) / max(bw / 2.0, 1.0)) ** 2 + ((yy - cy) / max(bh / 2.0, 1.0)) ** 2
    inbox = np.zeros((h, w), bool)
    inbox[y1:y2, x1:x2] = True
    gf = sub.astype(np.float32)
    # radial derivative of the (smoothed) intensity: positive where it gets brighter outward
    rx, ry = xx - cx, yy - cy
    rn = np.sqrt(rx * rx + ry * ry) + _EPS
    radial = (gx_full * rx + gy_full * ry) / rn
    inv = (255.0 - gf) * np.exp(-0.5 * d2 / _SEG_ARD_SIGMA**2)
    vals = inv[inbox]
    levels = np.percentile(vals, np.linspace(15, 85, _SEG_ARD_LEVELS))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    centre_weight = np.clip(1.0 - d2 / 0.5**2, 0.0, None)
    best, best_score = None, -np.inf
    box_area = float(bw * bh)
    for t in levels:
        c = ((inv >= t) & inbox).astype(np.uint8)
        c = cv2.morphologyEx(c, cv2.MORPH_OPEN, kernel)
        comp = _component_near_centre(c, centre_weight)
        if comp is None:
            continue
        comp = _fill_holes(comp)
        area = float(comp.sum())
        if area < 0.15 * box_area:
            continue
        edge = comp.astype(bool) & ~cv2.erode(comp, kernel).astype(bool)
        score = float(radial[edge].mean()) if edge.any() else -np.inf
        if score > best_score:
            best, best_score = comp, score
    if best is None:
        return segment_otsu(g, bx)
    best = cv2.morphologyEx(best, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_SEG_CLOSE, _SEG_CLOSE)))
    best = _fill_holes(best) & inbox.astype(np.uint8)
    out = np.zeros((H, W), bool)
    out[oy1:oy2, ox1:ox2] = best.astype(bool)
    return out, "dark"


def segment_otsu(g: np.ndarray, bx: tuple[int, int, int, int]) -> tuple[np.ndarray, str]:
    """Segment the lesion inside box ``bx`` of the smoothed working-scale ROI ``g``.

    Otsu threshold of the box's pixels, restricted to an ellipse slightly larger than the box's
    inscribed ellipse, the component that best covers the box centre, opened/closed and
    hole-filled. Tries a dark lesion first (the usual case), then a bright one; falls back to
    the inscribed ellipse when neither looks like a lesion filling its box.
    """
    x1, y1, x2, y2 = bx
    bw, bh = x2 - x1, y2 - y1
    H, W = g.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    cx, cy = (x1 + x2 - 1) / 2.0, (y1 + y2 - 1) / 2.0
    rx, ry = max(bw / 2.0, 1.0), max(bh / 2.0, 1.0)
    d2 = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    inbox = np.zeros((H, W), bool)
    inbox[y1:y2, x1:x2] = True
    allowed = inbox & (d2 <= _SEG_ELLIPSE**2)
    centre_weight = np.clip(1.0 - d2 / 0.5**2, 0.0, None)  # positive inside half-size ellipse
    vals = g[inbox]
    t, _ = cv2.threshold(vals.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    kernel3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    kernel5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_SEG_CLOSE, _SEG_CLOSE))
    box_area = float(bw * bh)
    for kind, cand in (("dark", g <= t), ("bright", g > t)):
        c = (cand & allowed).astype(np.uint8)
        c = cv2.morphologyEx(c, cv2.MORPH_OPEN, kernel3)
        comp = _component_near_centre(c, centre_weight)
        if comp is None:
            continue
        comp = cv2.morphologyEx(comp, cv2.MORPH_CLOSE, kernel5)
        comp = _fill_holes(comp) & inbox.astype(np.uint8)
        area = float(comp.sum())
        ys, xs = np.nonzero(comp)
        if ys.size == 0:
            continue
        ext_w = (xs.max() - xs.min() + 1) / bw
        ext_h = (ys.max() - ys.min() + 1) / bh
        if 0.25 <= area / box_area and ext_w >= 0.6 and ext_h >= 0.6:
            return comp.astype(bool), kind
    ell = np.zeros((H, W), np.uint8)
    cv2.ellipse(ell, (round(cx), round(cy)), (max(1, round(rx)), max(1, round(ry))), 0, 0, 360, 1, -1)
    return (ell.astype(bool) & inbox), "ellipse"


def _ring_stats(img: np.ndarray, sel: np.ndarray) -> tuple[float, float]:
    v = img[sel]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std())


def analyse_region(
    gray: np.ndarray,
    box: tuple[float, float, float, float],
    fov: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    pixel_spacing_mm: tuple[float, float] | None = None,
) -> RegionAnalysis:
    """Segment one region and measure shape, margin, echo and posterior features.

    Args:
        gray: HxW uint8 luminance of the whole image.
        box: pixel ``(x1, y1, x2, y2)`` of the region in ``gray``.
        fov: optional boolean field-of-view mask of the whole image (pixels outside are ignored).
        mask: optional full-resolution boolean lesion mask (e.g. a ground-truth mask) used instead
            of the built-in segmentation; the box still defines the surroundings.
        pixel_spacing_mm: ``(row, column)`` spacing in mm per pixel for the axis lengths.
    """
    H, W = gray.shape
    bx1, by1, bx2, by2 = clip_box(box, W, H)
    bw, bh = bx2 - bx1, by2 - by1
    # ROI: the box plus surroundings on the sides, a little above, and one box height below
    rx1 = max(0, int(bx1 - 0.75 * bw))
    rx2 = min(W, int(math.ceil(bx2 + 0.75 * bw)))
    ry1 = max(0, int(by1 - 0.4 * bh))
    ry2 = min(H, int(math.ceil(by2 + 1.0 * bh)))
    s = WORK_SIZE / max(bw, bh)
    s = min(s, 8.0)
    ow, oh = max(1, round((rx2 - rx1) * s)), max(1, round((ry2 - ry1) * s))
    crop = gray[ry1:ry2, rx1:rx2]
    interp = cv2.INTER_AREA if s < 1.0 else cv2.INTER_LINEAR
    roi = cv2.resize(crop, (ow, oh), interpolation=interp)
    if fov is not None:
        rfov = cv2.resize(fov[ry1:ry2, rx1:rx2].astype(np.uint8), (ow, oh), interpolation=cv2.INTER_NEAREST).astype(bool)
    else:
        rfov = np.ones((oh, ow), bool)
    sx = ow / (rx2 - rx1)
    sy = oh / (ry2 - ry1)
    wx1 = int(round((bx1 - rx1) * sx))
    wy1 = int(round((by1 - ry1) * sy))
    wx2 = max(wx1 + 2, min(ow, int(round((bx2 - rx1) * sx))))
    wy2 = max(wy1 + 2, min(oh, int(round((by2 - ry1) * sy))))
    wbox = (wx1, wy1, wx2, wy2)

    g = cv2.GaussianBlur(cv2.medianBlur(roi, 3), (0, 0), _SEG_SIGMA)
    if mask is not None:
        m = cv2.resize(mask[ry1:ry2, rx1:rx2].astype(np.uint8), (ow, oh), interpolation=cv2.INTER_NEAREST).astype(bool)
        seg_kind = "given"
        if m.sum() < 4:
            m, seg_kind = segment(g, wbox)
    else:
        m, seg_kind = segment(g, wbox)

    f: dict[str, float] = {}
    f["seg_fallback"] = 1.0 if seg_kind == "ellipse" else 0.0
    f["seg_bright"] = 1.0 if seg_kind == "bright" else 0.0
    f["box_w_px"], f["box_h_px"] = float(bx2 - bx1), float(by2 - by1)
    f["box_touches_edge"] = float(bx1 <= 0 or by1 <= 0 or bx2 >= W or by2 >= H)
    _shape_features(m, f, sx, sy, pixel_spacing_mm)
    _margin_and_echo_features(roi, g, m, rfov, f)
    _posterior_features(g, m, rfov, f)
    return RegionAnalysis(
        box=(bx1, by1, bx2, by2), scale=s, mask=m, roi_origin=(rx1, ry1), features=f, segmentation=seg_kind, roi=roi
    )


def _defect_depths(cnt: np.ndarray) -> np.ndarray:
    """Depths (pixels) of the contour's convexity defects; empty for a convex contour.

    OpenCV 4 returns ``None`` when a contour has no defects, OpenCV 5 an empty array, and some
    degenerate hulls raise: all three mean "no concavity" here.
    """
    if len(cnt) < 5:
        return np.zeros(0, dtype=np.float64)
    hull_idx = cv2.convexHull(cnt, returnPoints=False)
    try:
        defects = cv2.convexityDefects(cnt, hull_idx)
    except cv2.error:
        defects = None
    if defects is None or np.size(defects) == 0:
        return np.zeros(0, dtype=np.float64)
    return np.asarray(defects).reshape(-1, 4)[:, 3].astype(np.float64) / 256.0


def _shape_features(
    m: np.ndarray, f: dict[str, float], sx: float, sy: float, spacing: tuple[float, float] | None
) -> None:
    mu8 = m.astype(np.uint8)
    contours, _ = cv2.findContours(mu8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cnt = max(contours, key=cv2.contourArea)
    area = float(m.sum())
    perim = float(cv2.arcLength(cnt, True))
    hull = cv2.convexHull(cnt)
    hull_area = float(cv2.contourArea(hull)) + 0.5 * float(cv2.arcLength(hull, True))  # pixel-area convention
    hull_perim = float(cv2.arcLength(hull, True))
    f["area_work_px"] = area
    f["solidity"] = float(min(1.0, area / max(hull_area, _EPS)))
    f["circularity"] = float(min(1.0, 4.0 * math.pi * area / max(perim**2, _EPS)))
    f["convexity"] = float(min(1.0, hull_perim / max(perim, _EPS)))
    ys, xs = np.nonzero(m)
    ext_w = (xs.max() - xs.min() + 1) / sx
    ext_h = (ys.max() - ys.min() + 1) / sy
    f["extent_w_px"], f["extent_h_px"] = float(ext_w), float(ext_h)
    f["height_width_ratio"] = float(ext_h / max(ext_w, _EPS))
    x1, y1 = xs.min(), ys.min()
    f["extent"] = float(area / ((xs.max() - x1 + 1) * (ys.max() - y1 + 1)))
    # second moments -> equivalent ellipse (in isotropic original-pixel units)
    cx, cy = xs.mean(), ys.mean()
    dx = (xs - cx) / sx
    dy = (ys - cy) / sy
    cov = np.cov(np.vstack([dx, dy])) if xs.size > 2 else np.eye(2)
    evals, evecs = np.linalg.eigh(cov)
    l2, l1 = max(float(evals[0]), _EPS), max(float(evals[1]), _EPS)
    f["aspect"] = float(math.sqrt(l1 / l2))
    major = evecs[:, 1]
    f["major_axis_angle_deg"] = float(abs(math.degrees(math.atan2(major[1], major[0]))) % 180.0)
    ang = f["major_axis_angle_deg"]
    f["major_axis_tilt_deg"] = float(min(ang, 180.0 - ang))  # 0 = horizontal (parallel to skin)
    # equivalent-ellipse residual: how much of the mask the moment ellipse does not explain
    ell = np.zeros_like(mu8)
    a_w = 2.0 * math.sqrt(l1)
    b_w = 2.0 * math.sqrt(l2)
    vx, vy = major[0] * sx, major[1] * sy
    ang_w = math.degrees(math.atan2(vy, vx))
    # axes in working pixels along the major/minor directions (anisotropic scale only when sx != sy)
    ax_w = a_w * math.hypot(major[0] * sx, major[1] * sy)
    bx_w = b_w * math.hypot(-major[1] * sx, major[0] * sy)
    cv2.ellipse(ell, (int(round(cx)), int(round(cy))), (max(1, int(round(ax_w))), max(1, int(round(bx_w)))), ang_w, 0, 360, 1, -1)
    f["ellipse_residual"] = float(np.logical_xor(ell.astype(bool), m).sum() / max(area, 1.0))
    # radial signature relative to the ellipse: lobulation / spiculation
    pts = cnt[:, 0, :].astype(np.float32)
    px = (pts[:, 0] - cx) / sx
    py = (pts[:, 1] - cy) / sy
    u = px * major[0] + py * major[1]
    v = -px * major[1] + py * major[0]
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    a, b = max(a_w, _EPS), max(b_w, _EPS)
    r_ell = a * b / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2 + _EPS)
    res = r / np.maximum(r_ell, _EPS) - 1.0
    f["radial_std"] = float(res.std()) if res.size else 0.0
    n = res.size
    if n >= 16:
        k = max(3, n // 24) | 1
        sm = np.convolve(np.concatenate([res[-k:], res, res[:k]]), np.ones(k) / k, mode="same")[k:-k]
        hf = res - sm
        f["radial_hf"] = float(hf.std())
        # lobes: local maxima of the smoothed signature that stand out from their neighbourhood
        w = max(2, n // 32)
        wrapped = np.concatenate([sm[-w:], sm, sm[:w]])
        win = np.lib.stride_tricks.sliding_window_view(wrapped, 2 * w + 1)
        prominence = sm - win.min(axis=1)
        is_peak = sm >= win.max(axis=1)
        f["n_lobes"] = float((is_peak & (prominence > 0.06)).sum())
        f["n_spikes"] = float((is_peak & (prominence > 0.18)).sum())
    else:
        f["radial_hf"] = 0.0
        f["n_lobes"] = 0.0
        f["n_spikes"] = 0.0
    # concavities: convexity defects deeper than 8 % of the equivalent radius
    f["n_concavities"] = 0.0
    f["max_concavity"] = 0.0
    depth = _defect_depths(cnt)
    if depth.size:
        req = math.sqrt(max(area, 1.0) / math.pi)
        f["n_concavities"] = float((depth > 0.08 * req).sum())
        f["max_concavity"] = float(depth.max() / req)
    # sharp corners of a polygonal approximation (angular margins)
    eps = 0.03 * perim
    poly = cv2.approxPolyDP(cnt, eps, True)[:, 0, :].astype(np.float32)
    sharp = 0
    if len(poly) >= 3:
        for i in range(len(poly)):
            p0, p1, p2 = poly[i - 1], poly[i], poly[(i + 1) % len(poly)]
            v1, v2 = p0 - p1, p2 - p1
            c = float(np.dot(v1, v2) / (np.linalg.norm(v1) * np.linalg.norm(v2) + _EPS))
            if c > math.cos(math.radians(100)):  # interior angle below 100 degrees
                sharp += 1
    f["n_sharp_corners"] = float(sharp)
    f["n_poly_vertices"] = float(len(poly))
    # roughness: perimeter against the perimeter of a smoothed copy of the mask
    sm_mask = cv2.GaussianBlur(mu8.astype(np.float32), (0, 0), 3.0) > 0.5
    if sm_mask.any():
        c2, _ = cv2.findContours(sm_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        p2 = float(cv2.arcLength(max(c2, key=cv2.contourArea), True))
        f["roughness"] = float(perim / max(p2, _EPS))
    else:
        f["roughness"] = 1.0
    # long and short axis (Feret-like extents along the moment axes), in original pixels or mm
    if spacing is not None:
        sy_mm, sx_mm = float(spacing[0]), float(spacing[1])
    else:
        sy_mm = sx_mm = 1.0
    qx = pts[:, 0] / sx * sx_mm
    qy = pts[:, 1] / sy * sy_mm
    qc = np.vstack([qx - qx.mean(), qy - qy.mean()])
    if qc.shape[1] > 2:
        ev, evec = np.linalg.eigh(np.cov(qc))
        ax = evec[:, 1]
        along = ax @ qc
        across = np.array([-ax[1], ax[0]]) @ qc
        f["long_axis"] = float(along.max() - along.min() + min(sx_mm, sy_mm))
        f["short_axis"] = float(across.max() - across.min() + min(sx_mm, sy_mm))
    else:
        f["long_axis"] = float(max(ext_w * sx_mm, ext_h * sy_mm))
        f["short_axis"] = float(min(ext_w * sx_mm, ext_h * sy_mm))


def _margin_and_echo_features(roi: np.ndarray, g: np.ndarray, m: np.ndarray, rfov: np.ndarray, f: dict[str, float]) -> None:
    mu8 = m.astype(np.uint8)
    d_in = cv2.distanceTransform(mu8, cv2.DIST_L2, 3)
    d_out = cv2.distanceTransform(1 - mu8, cv2.DIST_L2, 3)
    gf = g.astype(np.float32)
    rf = roi.astype(np.float32)
    ring = (d_out > 3) & (d_out <= 12) & rfov
    ring_near = (d_out > 0) & (d_out <= 3) & rfov
    in_near = (d_in > 0) & (d_in <= 3)
    core = d_in > 3
    if core.sum() < 8:
        core = m
    les_mean, les_std = _ring_stats(rf, m)
    ring_mean, ring_std = _ring_stats(rf, ring)
    if not math.isfinite(ring_mean):
        ring_mean, ring_std = _ring_stats(rf, ~m & rfov)
    if not math.isfinite(ring_mean):
        ring_mean, ring_std = les_mean, les_std
    f["lesion_mean"] = les_mean
    f["lesion_std"] = les_std
    f["lesion_std_rel"] = float(les_std / max(ring_mean, 1.0)) if math.isfinite(ring_mean) else 0.0
    f["ring_mean"] = ring_mean
    f["ring_std"] = ring_std
    f["echo_ratio"] = float((les_mean + 1.0) / (ring_mean + 1.0))
    f["echo_log_ratio"] = float(math.log(f["echo_ratio"]))
    f["echo_contrast_z"] = float((les_mean - ring_mean) / max(ring_std, 1.0))
    cv_mean, cv_std = _ring_stats(gf, core)
    f["lesion_cv"] = float(cv_std / max(cv_mean, 1.0))
    f["lesion_smooth_std_rel"] = float(cv_std / max(ring_std, 1.0))
    core_vals = gf[core]
    ref = max(ring_mean, 1.0)
    f["dark_fraction"] = float((core_vals < 0.35 * ref).mean()) if core_vals.size else 0.0
    f["bright_fraction"] = float((core_vals > 0.9 * ref).mean()) if core_vals.size else 0.0
    if core_vals.size >= 4:
        q10, q50, q90 = np.percentile(core_vals, [10, 50, 90])
        f["lesion_iqr_rel"] = float((q90 - q10) / ref)
        f["lesion_median_rel"] = float(q50 / ref)
    else:
        f["lesion_iqr_rel"] = 0.0
        f["lesion_median_rel"] = f["echo_ratio"]
    # absolute darkness relative to the ROI's bright tissue (anechoic cysts sit near the noise floor)
    p90_roi = float(np.percentile(gf[rfov], 90)) if rfov.any() else 255.0
    f["lesion_rel_p90"] = float(cv_mean / max(p90_roi, 1.0))
    # margin: contrast just across the boundary, overall and per angular sector
    contrast = ring_mean - les_mean
    near_out, _ = _ring_stats(gf, ring_near)
    near_in, _ = _ring_stats(gf, in_near)
    if not math.isfinite(near_out):
        near_out = ring_mean
    step = near_out - near_in
    f["boundary_step"] = float(step)
    f["boundary_step_rel"] = float(step / max(abs(contrast), 4.0))
    gx = cv2.Sobel(gf, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gf, cv2.CV_32F, 0, 1, ksize=3)
    gm = np.sqrt(gx * gx + gy * gy) / 8.0
    edge = (d_out > 0) & (d_out <= 1.5) | ((d_in > 0) & (d_in <= 1.5))
    edge &= rfov
    f["edge_gradient"] = float(gm[edge].mean()) if edge.any() else 0.0
    f["edge_gradient_rel"] = float(f["edge_gradient"] / max(ring_std, 1.0))
    ys, xs = np.nonzero(m)
    cy, cx = ys.mean(), xs.mean()
    H, W = m.shape
    yy, xx = np.mgrid[0:H, 0:W]
    sector = ((np.arctan2(yy - cy, xx - cx) + math.pi) / (2 * math.pi) * N_SECTORS).astype(np.int32) % N_SECTORS
    so = np.bincount(sector[ring_near], weights=gf[ring_near], minlength=N_SECTORS)
    no = np.bincount(sector[ring_near], minlength=N_SECTORS)
    si = np.bincount(sector[in_near], weights=gf[in_near], minlength=N_SECTORS)
    ni = np.bincount(sector[in_near], minlength=N_SECTORS)
    ok = (no > 0) & (ni > 0)
    if ok.sum() >= 4:
        sc = so[ok] / no[ok] - si[ok] / ni[ok]
        scale = max(abs(step), 4.0)
        sign = 1.0 if step >= 0 else -1.0
        f["sector_low_fraction"] = float((sign * sc < 0.35 * scale).mean())
        f["sector_contrast_cv"] = float(sc.std() / scale)
    else:
        f["sector_low_fraction"] = 0.5
        f["sector_contrast_cv"] = 1.0
    # echogenic halo / ring brightness relative to farther tissue
    far = (d_out > 12) & (d_out <= 24) & rfov
    far_mean, _ = _ring_stats(rf, far)
    f["halo_ratio"] = float((near_out + 1.0) / (far_mean + 1.0)) if math.isfinite(far_mean) else 1.0


def _posterior_features(g: np.ndarray, m: np.ndarray, rfov: np.ndarray, f: dict[str, float]) -> None:
    H, W = m.shape
    ys, xs = np.nonzero(m)
    x_l, x_r = int(xs.min()), int(xs.max()) + 1
    y_b = int(ys.max()) + 1
    wl = x_r - x_l
    hl = int(ys.max() - ys.min() + 1)
    gf = g.astype(np.float32)
    band_h = max(3, int(round(_POST_BAND * hl)))
    yb1 = min(H, y_b + _POST_GAP)
    yb2 = min(H, yb1 + band_h)
    f["posterior_band_rows"] = float(yb2 - yb1)
    nan = float("nan")

    def mean_of(xa: int, xb: int) -> float:
        xa, xb = max(0, xa), min(W, xb)
        if xb - xa < 2 or yb2 - yb1 < 2:
            return nan
        sel = rfov[yb1:yb2, xa:xb]
        if sel.mean() < 0.5:
            return nan
        vals = gf[yb1:yb2, xa:xb][sel]
        return float(np.median(vals)) if _POST_STAT == "median" else float(vals.mean())

    c1, c2 = x_l + int(0.2 * wl), x_r - int(0.2 * wl)
    below = mean_of(c1, max(c2, c1 + 2))
    gap = max(2, int(_POST_LAT_GAP * wl))
    lw = max(3, int(_POST_LAT_WIDTH * wl))
    left = mean_of(x_l - gap - lw, x_l - gap)
    right = mean_of(x_r + gap, x_r + gap + lw)
    thirds = [mean_of(x_l + int(k * wl / 3), x_l + int((k + 1) * wl / 3)) for k in range(3)]
    lat = [v for v in (left, right) if math.isfinite(v)]
    f["posterior_lateral_sides"] = float(len(lat))
    if not math.isfinite(below) or not lat:
        f["posterior_below_level"] = f["posterior_left_level"] = f["posterior_right_level"] = 0.0
        f["posterior_log_ratio"] = 0.0
        f["posterior_valid"] = 0.0
        f["posterior_min_third"] = 0.0
        f["posterior_max_third"] = 0.0
        f["posterior_vs_ring"] = 0.0
        return
    ref = float(np.mean(lat))
    f["posterior_valid"] = 1.0
    f["posterior_below_level"] = below
    f["posterior_left_level"] = left if math.isfinite(left) else below
    f["posterior_right_level"] = right if math.isfinite(right) else below
    f["posterior_log_ratio"] = float(math.log((below + 1.0) / (ref + 1.0)))
    tr = [math.log((t + 1.0) / (ref + 1.0)) for t in thirds if math.isfinite(t)]
    f["posterior_min_third"] = float(min(tr)) if tr else f["posterior_log_ratio"]
    f["posterior_max_third"] = float(max(tr)) if tr else f["posterior_log_ratio"]
    f["posterior_vs_ring"] = float(math.log((below + 1.0) / (f.get("ring_mean", ref) + 1.0)))
