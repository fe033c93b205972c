"""Imaging: reading inputs into the canonical array, the image store, overlays and example images.

Import cost stays low: PIL, pydicom and OpenCV are imported inside the functions that use them.

>>> from echo_agent.imaging import example_image, load_image
>>> img = load_image(example_image("breast_benign"))
>>> img.array.shape[2], img.array.dtype.name
(3, 'uint8')
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EchoInputError
from .io import LoadedImage, load_image, read_for_store
from .overlay import encode_png, render_overlay, save_png
from .store import ImageRef, ImageStore, default_store, pixel_hash, set_default_reader

set_default_reader(read_for_store)  # stores re-read evicted images with the package's loader

_EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"


def example_images() -> list[str]:
    """Names of the packaged example images (see ``echo_agent/assets/examples/NOTICE.md``)."""
    return sorted(p.stem for p in _EXAMPLES_DIR.glob("*.png"))


def example_image(name: str = "breast_malignant") -> Path:
    """Path of a packaged example image, e.g. ``'breast_benign'`` or ``'breast_malignant'``.

    The images come from the BrEaST-Lesions_USG collection (TCIA); their case ids, ground truth
    and citation are in ``echo_agent/assets/examples/NOTICE.md``.
    """
    stem = name[:-4] if name.lower().endswith(".png") else name
    path = _EXAMPLES_DIR / f"{stem}.png"
    if not path.is_file():
        available = ", ".join(example_images()) or "none (the package assets are missing)"
        raise EchoInputError(f"there is no example image named {name!r}; choose one of: {available}.")
    return path


__all__ = [
    "ImageRef",
    "ImageStore",
    "LoadedImage",
    "default_store",
    "encode_png",
    "example_image",
    "example_images",
    "load_image",
    "pixel_hash",
    "render_overlay",
    "save_png",
]
