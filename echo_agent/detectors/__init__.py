"""Lesion detectors: the :class:`Detector` protocol, its backends and box post-processing.

>>> from echo_agent.detectors import get_detector                      # doctest: +SKIP
>>> get_detector("breast").detect(image, score_threshold=0.3, tta=True)  # doctest: +SKIP

* :class:`OnnxDetector` — ONNX Runtime, the default (light, CPU).
* :class:`UltralyticsDetector` — ``.pt`` checkpoints through ultralytics (``train`` extra).
* :func:`load_detector` picks the backend from an :class:`~echo_agent.organs.OrganSpec` or a path;
  :func:`get_detector` caches one detector per organ for the whole process.

Importing this package loads neither onnxruntime nor OpenCV nor torch; they are imported on first use.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError
from .base import Detector, DetectorConfig, LetterboxYoloDetector, check_image
from .onnx import OnnxDetector
from .postprocess import (
    LetterboxInfo,
    batched_nms,
    decode_yolo,
    letterbox,
    nms,
    tta_merge,
    unletterbox_boxes,
    weighted_box_fusion,
)
from .ultralytics_backend import UltralyticsDetector, configure_ultralytics_offline, export_onnx

if TYPE_CHECKING:
    from ..organs import OrganSpec

__all__ = [
    "Detector",
    "DetectorConfig",
    "LetterboxInfo",
    "LetterboxYoloDetector",
    "OnnxDetector",
    "UltralyticsDetector",
    "batched_nms",
    "check_image",
    "clear_detector_cache",
    "configure_ultralytics_offline",
    "decode_yolo",
    "export_onnx",
    "get_detector",
    "letterbox",
    "load_detector",
    "nms",
    "tta_merge",
    "unletterbox_boxes",
    "weighted_box_fusion",
]

_ONNX_SUFFIXES = (".onnx",)
_ULTRALYTICS_SUFFIXES = (".pt", ".yaml", ".yml")


def _from_path(path: Path, **kw: Any) -> Detector:
    suffix = path.suffix.lower()
    if suffix in _ONNX_SUFFIXES:
        return OnnxDetector(path, **kw)
    if suffix in _ULTRALYTICS_SUFFIXES:
        return UltralyticsDetector(path, **kw)
    raise ModelLoadError(
        f"no detector backend for {path} (suffix {suffix or 'none'!r}); use an .onnx file "
        "(ONNX Runtime) or a .pt / .yaml file (ultralytics)"
    )


def load_detector(spec_or_path: OrganSpec | str | Path, **kw: Any) -> Detector:
    """Create a detector (lazily loaded) for an organ or a weights file.

    * ``OrganSpec`` (or a registered organ name such as ``"breast"``): its ``detector_weights``, with
      ``labels`` defaulting to the spec's ``detector_labels``;
    * a path: ``.onnx`` -> :class:`OnnxDetector`, ``.pt`` / ``.yaml`` -> :class:`UltralyticsDetector`.

    Extra keyword arguments go to the backend's constructor. Raises :class:`ModelLoadError` when the
    weights are not configured or the file is missing.
    """
    from ..organs import OrganSpec, get_organ  # lazy: the registry parses YAML at import

    if isinstance(spec_or_path, str) and not Path(spec_or_path).suffix and not Path(spec_or_path).exists():
        spec_or_path = get_organ(spec_or_path)
    if isinstance(spec_or_path, OrganSpec):
        spec = spec_or_path
        path = spec.resolve_weights()
        if path is None:
            raise ModelLoadError(
                f"organ {spec.name!r} has no detector weights configured; set detector_weights in its OrganSpec"
            )
        if not path.is_file():
            raise ModelLoadError(
                f"the {spec.name!r} detector weights are missing: expected {path}; train and export them "
                "(tools/train_detector.py) or point the organ's detector_weights at an existing file"
            )
        kw.setdefault("labels", spec.detector_labels)
        return _from_path(path, **kw)
    return _from_path(Path(spec_or_path).expanduser(), **kw)


_cache_lock = threading.Lock()
_cache: dict[tuple[str, str], Detector] = {}


def get_detector(organ_name: str) -> Detector:
    """The process-wide detector of a registered organ, created once (thread-safe) and reused.

    The cache key includes the weights path, so re-registering an organ with other weights gives a
    new detector. The model itself still loads lazily on the first detection.
    """
    from ..organs import get_organ

    spec = get_organ(organ_name)
    key = (spec.name, str(spec.resolve_weights()))
    with _cache_lock:
        det = _cache.get(key)
        if det is None:
            det = load_detector(spec)
            _cache[key] = det
        return det


def clear_detector_cache() -> None:
    """Forget every cached detector (their sessions are freed when no longer referenced)."""
    with _cache_lock:
        _cache.clear()
