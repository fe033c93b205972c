"""Turning numeric pixel arrays into the canonical HxWx3 uint8 RGB array (private helpers).

Shared by the file/PIL/array readers in :mod:`echo_agent.imaging.io`, the DICOM reader and the
overlay renderer, so every entry point applies the same intensity and channel rules.
"""

from __future__ import annotations

import numpy as np

from ..errors import ChannelLayoutError, EchoInputError, ImageTooLargeError, ImageTooSmallError


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Map a numeric array of any dtype to uint8 without clipping its content.

    * uint8 is kept as it is;
    * other integers whose values all lie in 0..255 are 8-bit data in a wider container and are
      kept as they are (e.g. an int64 array built from a Python list);
    * other integers (16-bit PNG/TIFF, 12-bit DICOM ...) are min-max scaled by their actual range;
    * floats in [0, 1] are multiplied by 255; floats in any other range are min-max scaled.

    A constant array that needs scaling becomes all zeros.
    """
    if a.dtype == np.uint8:
        return a
    check_dtype(a.dtype)
    if a.size == 0:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise EchoInputError(
                "the image array contains NaN or infinite values; replace them (e.g. with np.nan_to_num) first."
            )
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
        return scale_range(a, lo, hi)
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 255:
        return a.astype(np.uint8)
    return scale_range(a, lo, hi)


def check_dtype(dtype: np.dtype) -> None:
    """Raise :class:`ChannelLayoutError` unless ``dtype`` is an integer or float type (bool is not)."""
    if dtype == np.bool_:
        raise ChannelLayoutError(
            "a boolean array is a mask, not an image; convert it first, e.g. `mask.astype(np.uint8) * 255`."
        )
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ChannelLayoutError(
            f"an image array must hold integers or floats, got dtype {dtype}; convert it to uint8 first."
        )


def scale_range(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linearly map ``[lo, hi]`` to ``[0, 255]`` (values outside are clipped) and round to uint8."""
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = (a.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def _alpha_fraction(alpha: np.ndarray) -> np.ndarray:
    """Alpha channel as float32 in [0, 1]."""
    if alpha.dtype == np.uint8:
        return alpha.astype(np.float32) / 255.0
    if alpha.dtype == np.uint16:
        return alpha.astype(np.float32) / 65535.0
    if np.issubdtype(alpha.dtype, np.floating) and alpha.size and alpha.min() >= 0 and alpha.max() <= 1:
        return alpha.astype(np.float32)
    return to_uint8(alpha).astype(np.float32) / 255.0


def check_layout(shape: tuple[int, ...]) -> None:
    """Raise :class:`ChannelLayoutError` unless ``shape`` is HxW, HxWx1, HxWx3 or HxWx4."""
    if len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4)):
        return
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] > 4:
        msg = f"an image array of shape {shape} looks channels-first; pass `arr.transpose(1, 2, 0)`."
    elif len(shape) == 3:
        msg = f"an image array with {shape[2]} channels (shape {shape}) is neither gray, RGB nor RGBA; pass 1, 3 or 4 channels."
    elif len(shape) == 4:
        msg = f"a 4-D array (shape {shape}) looks like a clip or a batch; pass one frame, e.g. `arr[i]`."
    else:
        msg = f"an image array of shape {shape} is not an image; pass an HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA) array."
    raise ChannelLayoutError(msg)


def check_size(width: int, height: int, *, max_pixels: int, min_size: int, what: str = "image") -> None:
    """Raise the size errors for a ``width`` x ``height`` image (before its pixels are decoded)."""
    if width <= 0 or height <= 0:
        raise ImageTooSmallError(f"the {what} is empty ({width}x{height} pixels); pass a real image.")
    if width < min_size or height < min_size:
        raise ImageTooSmallError(
            f"the {what} is {width}x{height} pixels, below the minimum of {min_size} on each side; "
            "pass the full-resolution image (or lower min_size)."
        )
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the {what} is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,}; "
            "downscale it first or raise max_pixels if you trust the source."
        )


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    """A new HxWx3 copy of an HxW uint8 image (OpenCV: ~20x faster than ``np.repeat``, same bytes)."""
    if g.size == 0:
        return np.repeat(g[:, :, None], 3, axis=2)
    import cv2

    return cv2.cvtColor(g, cv2.COLOR_GRAY2RGB)


def to_canonical(a: np.ndarray) -> np.ndarray:
    """Return a new, writable HxWx3 uint8 RGB array (gray replicated, RGBA composited on black).

    The input is never modified. Raises :class:`ChannelLayoutError` for unusable shapes/dtypes.
    """
    check_layout(a.shape)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        g = np.ascontiguousarray(to_uint8(a))
        return _gray_to_rgb(g)
    if a.shape[2] == 4:
        rgb = to_uint8(a[:, :, :3])
        frac = _alpha_fraction(a[:, :, 3])
        if bool((frac >= 1.0).all()):
            return np.array(rgb, dtype=np.uint8, copy=True)
        # Composite on black: pixels outside an ultrasound fan (alpha = 0) become 0 even where
        # the stored RGB under them is not (see BrEaST-Lesions_USG/SOURCE.md).
        out = rgb.astype(np.float32) * frac[:, :, None]
        return np.rint(out).astype(np.uint8)
    return np.array(to_uint8(a), dtype=np.uint8, copy=True)
