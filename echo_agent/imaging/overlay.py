"""Drawing boxes on an image and writing PNGs.

The overlay is what a person (or a multimodal model, as a tool artifact) looks at to check the
evidence, so each label keeps one colour across runs: benign green, malignant red, hydronephrosis
orange; any other label gets a fixed palette colour chosen from a stable hash of its name.
OpenCV is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ChannelLayoutError, EchoInputError
from ._pixels import to_canonical

if TYPE_CHECKING:  # pragma: no cover
    from ..schemas import Box, Detection, Finding

    BoxItem = tuple[Box, str, float] | Detection | Finding
else:
    BoxItem = Any

#: RGB colour of the labels the built-in organs use.
LABEL_COLOURS: dict[str, tuple[int, int, int]] = {
    "benign": (40, 200, 60),
    "malignant": (230, 40, 40),
    "hydronephrosis": (255, 165, 0),
    "lesion": (255, 230, 0),
    "normal": (120, 180, 255),
}

# Distinct, saturated colours for labels without an assigned one.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 190, 255),
    (255, 0, 200),
    (150, 90, 255),
    (0, 230, 170),
    (255, 120, 120),
    (200, 255, 0),
    (255, 200, 120),
    (90, 140, 255),
)


class OutputExistsError(EchoInputError, FileExistsError):
    """The output file exists and ``overwrite`` was not set (nothing the user has is overwritten)."""


def label_colour(label: str) -> tuple[int, int, int]:
    """The RGB colour used for ``label`` (case-insensitive; unknown labels get a stable palette colour)."""
    key = label.strip().lower()
    if key in LABEL_COLOURS:
        return LABEL_COLOURS[key]
    return _PALETTE[zlib.crc32(key.encode("utf-8")) % len(_PALETTE)]


def _as_triplet(item: Any) -> tuple[tuple[float, float, float, float], str, float | None]:
    """Accept ``(Box | [x1, y1, x2, y2], label, score)`` or an object with ``.box/.label/.score``."""
    if hasattr(item, "box") and hasattr(item, "label"):
        box, label, score = item.box, item.label, getattr(item, "score", None)
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        box, label = item[0], item[1]
        score = item[2] if len(item) == 3 else None
    else:
        raise EchoInputError(
            f"cannot draw {type(item).__name__}; pass (Box, label, score) tuples or Detection/Finding objects."
        )
    if hasattr(box, "x1"):
        xyxy = (float(box.x1), float(box.y1), float(box.x2), float(box.y2))
    else:
        try:
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise EchoInputError(
                f"a box must be a Box or [x1, y1, x2, y2] in pixels, got {box!r}; pass pixel coordinates."
            ) from None
        xyxy = (x1, y1, x2, y2)
    return xyxy, str(label), None if score is None else float(score)


def _text_colour(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def render_overlay(
    image: np.ndarray,
    boxes: Sequence[BoxItem],
    *,
    title: str | None = None,
) -> np.ndarray:
    """Draw labelled boxes (and an optional title) on a copy of ``image``.

    Args:
        image: the canonical ``HxWx3 uint8`` RGB array (gray or other dtypes are converted the way
            :func:`echo_agent.imaging.load_image` converts arrays).
        boxes: ``(Box, label, score)`` tuples (a ``[x1, y1, x2, y2]`` list works as the box, the
            score may be left out) or objects with ``box``, ``label`` and ``score`` such as
            :class:`~echo_agent.schemas.Detection` and :class:`~echo_agent.schemas.Finding`.
            Coordinates are pixels of ``image``; boxes are clipped to it.
        title: a line of text drawn in the top-left corner.

    Returns:
        A new ``HxWx3 uint8`` RGB array; ``image`` is not modified.

    >>> import numpy as np
    >>> from echo_agent.schemas import Box
    >>> out = render_overlay(np.zeros((100, 100, 3), np.uint8), [(Box(x1=10, y1=20, x2=60, y2=80), "malignant", 0.9)])
    >>> out[50, 10].tolist()  # left edge of the box, in the malignant colour
    [230, 40, 40]
    """
    import cv2

    if not isinstance(image, np.ndarray):
        raise ChannelLayoutError(
            f"render_overlay needs a numpy image array, got {type(image).__name__}; pass load_image(...).array."
        )
    out = to_canonical(image)  # always a fresh array
    h, w = out.shape[:2]
    if h == 0 or w == 0:
        return out
    side = min(h, w)
    thickness = max(1, round(side / 250))
    font = cv2.FONT_HERSHEY_SIMPLEX
    font_scale = max(0.35, side / 900)
    font_thick = max(1, round(side / 500))
    pad = max(2, thickness)

    # The title goes first so that no box or label is ever hidden under it.
    if title:
        (tw, th), base = cv2.getTextSize(title, font, font_scale, font_thick)
        cv2.rectangle(out, (0, 0), (min(w - 1, tw + 2 * pad), th + base + 2 * pad), (0, 0, 0), -1)
        cv2.putText(out, title, (pad, pad + th), font, font_scale, (255, 255, 255), font_thick, cv2.LINE_AA)

    for item in boxes:
        (x1, y1, x2, y2), label, score = _as_triplet(item)
        # Pixel boxes are [x1, x2) x [y1, y2): the last covered pixel is x2 - 1.
        left, top = max(0, int(round(x1))), max(0, int(round(y1)))
        right, bottom = min(w - 1, int(round(x2)) - 1), min(h - 1, int(round(y2)) - 1)
        if right < left or bottom < top:
            continue  # entirely outside the image
        colour = label_colour(label)
        cv2.rectangle(out, (left, top), (right, bottom), colour, thickness, lineType=cv2.LINE_8)
        text = label if score is None else f"{label} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, font, font_scale, font_thick)
        box_h = th + base + 2 * pad
        # Above the box when there is room, otherwise just inside its top edge.
        ty = top - box_h if top - box_h >= 0 else min(top + thickness, max(h - box_h, 0))
        tx = min(left, max(w - tw - 2 * pad, 0))
        cv2.rectangle(out, (tx, ty), (tx + tw + 2 * pad, ty + box_h), colour, -1)
        cv2.putText(out, text, (tx + pad, ty + pad + th), font, font_scale, _text_colour(colour), font_thick, cv2.LINE_AA)
    return out


def _bgr_for_cv2(array: np.ndarray) -> np.ndarray:
    import cv2

    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise ChannelLayoutError(
            "encode_png needs a uint8 numpy array (HxW, HxWx3 RGB or HxWx4 RGBA); "
            "pass load_image(...).array or convert the array to uint8 first."
        )
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        return array
    if array.ndim == 3 and array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_RGBA2BGRA)
    raise ChannelLayoutError(
        f"encode_png cannot encode an array of shape {array.shape}; pass HxW, HxWx3 (RGB) or HxWx4 (RGBA)."
    )


def encode_png(array: np.ndarray) -> bytes:
    """Encode a uint8 gray, RGB or RGBA array as PNG bytes (lossless)."""
    import cv2

    bgr = _bgr_for_cv2(array)
    if bgr.size == 0:
        raise ChannelLayoutError("encode_png cannot encode an empty array; pass an image with pixels.")
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - OpenCV reports failure only for impossible inputs
        raise ChannelLayoutError(f"OpenCV could not encode the array of shape {array.shape} as PNG.")
    return buf.tobytes()


def save_png(array: np.ndarray, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``array`` as a PNG file and return its path.

    An existing file is never replaced unless ``overwrite=True`` (then it is replaced atomically);
    missing parent folders are created. Raises :class:`OutputExistsError` (a ``FileExistsError``
    and an :class:`~echo_agent.errors.EchoInputError`) when the file exists.
    """
    target = Path(os.fspath(path)).expanduser()
    if target.suffix.lower() != ".png":
        raise EchoInputError(f"save_png writes PNG files, but {str(target)!r} does not end in .png; rename it.")
    if target.is_dir():
        raise EchoInputError(f"{str(target)!r} is a directory; pass a file path ending in .png.")
    data = encode_png(array)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        try:
            f = open(target, "xb")  # exclusive create: no race with another writer
        except FileExistsError:
            raise OutputExistsError(
                f"{str(target)!r} already exists and was left untouched; choose another name or pass overwrite=True."
            ) from None
        try:
            with f:
                f.write(data)
        except BaseException:
            target.unlink(missing_ok=True)  # the file is ours (just created): remove the partial write
            raise
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
