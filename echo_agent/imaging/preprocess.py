"""Ultrasound preprocessing shared by detector training and inference.

:func:`prepare_for_detection` turns a canonical image (HxWx3 uint8 RGB) into what the detectors see:

1. **Field of view (FOV).** The B-mode field is the largest connected non-black region (after a
   small closing that bridges dark anechoic areas inside it); the image is cropped to its bounding
   box and everything outside the field inside that box (scanner text, scale bars, logos) is set to
   black. When no region covers at least ``min_fov_fraction`` of the image the whole image is kept.
2. **Burned-in annotations.** Strongly coloured pixels (yellow/green/cyan calipers, ROI rectangles,
   colour-Doppler boxes; HSV saturation high) and thin near-white marks (caliper crosses, dotted
   measurement lines, text: pixels near 255 that stand out from their 5x5 opening) are masked and
   replaced by the mean of the unmasked pixels around them. Larger bright tissue structures are not
   thin and survive the opening, so they are kept.
3. **Canonical output.** The result is grayscale replicated to 3 channels (this also removes
   vendor colour tints, which differ between centers).

The operation is deterministic and only crops (no resizing), so boxes map between the original
and the prepared image by a translation: :meth:`PreparedImage.to_original` and
:meth:`PreparedImage.from_original`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import ChannelLayoutError
from ..schemas import Box

#: Gray level under which a pixel counts as background (outside the scanned field).
BACKGROUND_LEVEL = 12
#: Minimum share of the image the field of view must cover to be used for cropping.
MIN_FOV_FRACTION = 0.25
#: HSV saturation (0..255) above the image's median saturation that marks a colour overlay.
COLOUR_SATURATION = 30
#: Minimum gray level of a near-white annotation pixel and its required contrast to the 5x5 opening.
WHITE_LEVEL = 190
WHITE_CONTRAST = 90


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for a detector plus the information to map boxes back.

    ``array`` is HxWx3 uint8 (cropped to the field of view, annotations removed); ``crop`` is the
    ``(x0, y0)`` offset of ``array`` in the original image; ``fov_mask`` (same HxW as ``array``, bool)
    marks the scanned field; ``annotation_mask`` marks pixels that were replaced;
    ``annotation_fraction`` is their share of the field; ``original_size`` is ``(width, height)``.
    """

    array: np.ndarray
    crop: tuple[int, int]
    fov_mask: np.ndarray
    annotation_mask: np.ndarray
    annotation_fraction: float
    original_size: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of :attr:`array`."""
        return int(self.array.shape[1]), int(self.array.shape[0])

    def to_original(self, box: Box) -> Box:
        """Map a box in :attr:`array` pixels to pixels of the original image."""
        x0, y0 = self.crop
        w, h = self.original_size
        return Box(x1=box.x1 + x0, y1=box.y1 + y0, x2=box.x2 + x0, y2=box.y2 + y0).clip(w, h)

    def from_original(self, box: Box) -> Box:
        """Map a box in original-image pixels to :attr:`array` pixels (clipped to the crop).

        Raises ``ValueError`` when the box lies entirely outside the cropped field.
        """
        x0, y0 = self.crop
        w, h = self.size
        return Box(x1=box.x1 - x0, y1=box.y1 - y0, x2=box.x2 - x0, y2=box.y2 - y0).clip(w, h)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ChannelLayoutError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ChannelLayoutError(
            f"expected a uint8 image, got dtype {image.dtype}; load images with echo_agent's image loader"
        )
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        alpha = image[:, :, 3:4] > 0
        return np.where(alpha, image[:, :, :3], 0).astype(np.uint8)
    raise ChannelLayoutError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {image.shape}")


def _field_of_view(gray: np.ndarray, min_fov_fraction: float) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Bounding box (x0, y0, x1, y1) and filled mask of the scanned field (found at half resolution)."""
    h, w = gray.shape
    f = 2 if min(h, w) >= 128 else 1
    small = gray[::f, ::f]
    fg = (small > BACKGROUND_LEVEL).astype(np.uint8)
    # bridge dark anechoic areas and speckle gaps inside the field, then cut thin bridges
    # (text touching the field, one-pixel lines) before labelling
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5)))
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return (0, 0, w, h), np.ones((h, w), bool)
    best = int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) + 1
    sx, sy, sw, sh, _ = (int(v) for v in stats[best])
    x0, y0 = sx * f, sy * f
    x1, y1 = min(w, (sx + sw) * f), min(h, (sy + sh) * f)
    if (x1 - x0) * (y1 - y0) < min_fov_fraction * w * h:
        return (0, 0, w, h), np.ones((h, w), bool)
    comp = (labels[sy : sy + sh, sx : sx + sw] == best).astype(np.uint8)
    contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours, axis=0)) * f
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    # the hull was traced at half resolution: grow it by one step so no field pixel is lost
    if f > 1:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * f + 1, 2 * f + 1)))
    return (x0, y0, x1, y1), mask.astype(bool)


def annotation_mask(rgb: np.ndarray, gray: np.ndarray) -> np.ndarray:
    """Boolean mask of burned-in annotations (colour overlays and thin near-white marks).

    A pixel is a colour overlay when its HSV saturation exceeds the image's median saturation (a
    vendor tint is uniform) by :data:`COLOUR_SATURATION` and its chroma is > 20 gray levels.
    """
    mask = np.zeros(gray.shape, np.uint8)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # strided views: cheaper than cv2.split's copies
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # max >= min: no wrap
    if int(chroma.max()) > 20:
        sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
        base = float(np.median(sat[::4, ::4][gray[::4, ::4] > 40])) if (gray > 40).any() else 0.0
        mask |= ((sat > base + COLOUR_SATURATION) & (chroma > 20)).astype(np.uint8)
    opened = cv2.morphologyEx(gray, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5)))
    mask |= ((gray >= WHITE_LEVEL) & (cv2.subtract(gray, opened) >= WHITE_CONTRAST)).astype(np.uint8)
    if mask.any():
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3)))
    return mask.astype(bool)


def _fill_from_neighbours(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Replace masked pixels by the mean of the unmasked pixels around them (normalized box filter)."""
    out = gray.copy()
    ys, xs = np.nonzero(mask)
    pad = 16
    y0, y1 = max(int(ys.min()) - pad, 0), min(int(ys.max()) + pad + 1, gray.shape[0])
    x0, x1 = max(int(xs.min()) - pad, 0), min(int(xs.max()) + pad + 1, gray.shape[1])
    g = gray[y0:y1, x0:x1].astype(np.float32)
    m = mask[y0:y1, x0:x1]
    valid = (~m).astype(np.float32)
    todo = m.copy()
    region = out[y0:y1, x0:x1]
    for k in (7, 15, 33):
        num = cv2.boxFilter(g * valid, -1, (k, k), normalize=False)
        den = cv2.boxFilter(valid, -1, (k, k), normalize=False)
        ok = todo & (den > 0.5)
        region[ok] = np.clip(num[ok] / den[ok] + 0.5, 0, 255).astype(np.uint8)
        todo &= ~ok
        if not todo.any():
            break
    return out


def prepare_for_detection(
    image: np.ndarray, *, min_fov_fraction: float = MIN_FOV_FRACTION, remove_annotations: bool = True
) -> PreparedImage:
    """Crop ``image`` to its ultrasound field of view and remove burned-in annotations.

    ``image`` is HxWx3 uint8 RGB (HxW grayscale and HxWx4 RGBA, composited on black, are accepted).
    Returns a :class:`PreparedImage`; see the module docstring for the steps.
    """
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        raise ChannelLayoutError(f"image is empty (shape {image.shape})")
    gray_full = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    # colour overlays are not background even when dark in gray: include them in the FOV search
    (x0, y0, x1, y1), fov = _field_of_view(gray_full, min_fov_fraction)
    rgb_c = rgb[y0:y1, x0:x1]
    gray = np.ascontiguousarray(gray_full[y0:y1, x0:x1])
    if remove_annotations:
        ann = annotation_mask(rgb_c, gray) & fov
    else:
        ann = np.zeros(gray.shape, bool)
    if ann.any():
        gray = _fill_from_neighbours(gray, ann)
    if not fov.all():
        gray = cv2.bitwise_and(gray, gray, mask=fov.view(np.uint8))
    n_fov = int(fov.sum())
    frac = float(ann.sum()) / n_fov if n_fov else 0.0
    out = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    return PreparedImage(
        array=out,
        crop=(int(x0), int(y0)),
        fov_mask=fov,
        annotation_mask=ann,
        annotation_fraction=frac,
        original_size=(int(w), int(h)),
    )


__all__ = ["PreparedImage", "annotation_mask", "prepare_for_detection"]
