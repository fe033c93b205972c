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
from .region_classifier import CLASSIFIER_META_KEY, OnnxRegionClassifier, RegionClassifier, square_crop
from .ultralytics_backend import UltralyticsDetector, configure_ultralytics_offline, export_onnx

if TYPE_CHECKING:
    from ..organs import OrganSpec

__all__ = [
    "CLASSIFIER_META_KEY",
    "Detector",
    "DetectorConfig",
    "LetterboxInfo",
    "LetterboxYoloDetector",
    "OnnxDetector",
    "OnnxRegionClassifier",
    "RegionClassifier",
    "UltralyticsDetector",
    "batched_nms",
    "check_image",
    "clear_detector_cache",
    "configure_ultralytics_offline",
    "decode_yolo",
    "export_onnx",
    "get_detector",
    "get_region_classifier",
    "load_region_classifier",
    "letterbox",
    "load_detector",
    "nms",
    "square_crop",
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
      ``labels`` defaulting to the spec's ``detector_labels`` and an ONNX model's ``intra_op_threads``
      to its ``detector_threads``;
    * a path: ``.onnx`` -> :class:`OnnxDetector`, ``.pt`` / ``.yaml`` -> :class:`UltralyticsDetector`.

    Extra keyword arguments go to the backend's constructor. Raises :class:`ModelLoadError` when the
    weights are not configured or the file is missing.
    """
    spec, path = _organ_weights(spec_or_path, "detector")
    if spec is not None:
        kw.setdefault("labels", spec.detector_labels)
        if spec.detector_threads is not None and path.suffix.lower() == ".onnx":
            kw.setdefault("intra_op_threads", spec.detector_threads)
    return _from_path(path, **kw)


def _organ_weights(spec_or_path: OrganSpec | str | Path, kind: str) -> tuple[OrganSpec | None, Path]:
    """``(spec, weights path)`` for an organ (by spec or registered name) or ``(None, path)`` for a
    path; ``kind`` is ``"detector"`` or ``"classifier"``. Raises :class:`ModelLoadError` when an organ
    has no such weights configured or the file is missing."""
    from ..organs import OrganSpec, get_organ  # lazy: the registry parses YAML at import

    if isinstance(spec_or_path, str) and not Path(spec_or_path).suffix and not Path(spec_or_path).exists():
        spec_or_path = get_organ(spec_or_path)
    if not isinstance(spec_or_path, OrganSpec):
        return None, Path(spec_or_path).expanduser()
    spec = spec_or_path
    field, tool, what = (("detector_weights", "tools/train_detector.py", "detector weights") if kind == "detector"
                         else ("classifier_weights", "tools/train_classifier.py", "region classifier weights"))
    path = spec.resolve_weights() if kind == "detector" else spec.resolve_classifier_weights()
    if path is None:
        raise ModelLoadError(f"organ {spec.name!r} has no {what} configured; set {field} in its OrganSpec")
    if not path.is_file():
        raise ModelLoadError(
            f"the {spec.name!r} {what} are missing: expected {path}; train and export them ({tool}) or point "
            f"the organ's {field} at an existing file"
        )
    return spec, path


_cache_lock = threading.Lock()
_cache: dict[tuple[str, str], Detector] = {}


def get_detector(organ_name: str) -> Detector:
    """The process-wide detector of a registered organ, created once (thread-safe) and reused.

    The cache key includes the weights path, so re-registering an organ with other weights gives a
    new detector. The model itself still loads lazily on the first detection.
    """
    from ..organs import get_organ

    spec = get_organ(organ_name)
    return _cached(_cache, (spec.name, str(spec.resolve_weights())), lambda: load_detector(spec))


def _cached(cache: dict[tuple[str, str], Any], key: tuple[str, str], make: Any) -> Any:
    """``cache[key]``, created by ``make()`` on first use (under the module's lock)."""
    with _cache_lock:
        obj = cache.get(key)
        if obj is None:
            obj = cache[key] = make()
        return obj


def clear_detector_cache() -> None:
    """Forget every cached detector and region classifier (their sessions are freed when no longer
    referenced)."""
    with _cache_lock:
        _cache.clear()
        _cls_cache.clear()


def load_region_classifier(spec_or_path: OrganSpec | str | Path, **kw: Any) -> RegionClassifier:
    """Create a second-look region classifier (lazily loaded) for an organ or an ``.onnx`` file.

    For an organ, its ``classifier_weights``; the classifier's labels must equal the organ's
    ``image_labels`` (checked on first use by the tool). Raises :class:`ModelLoadError` when no
    weights are configured or the file is missing.
    """
    spec, path = _organ_weights(spec_or_path, "classifier")
    if spec is None and path.suffix.lower() != ".onnx":
        raise ModelLoadError(f"a region classifier must be an .onnx file exported by tools/train_classifier.py, got {path}")
    return OnnxRegionClassifier(path, **kw)


_cls_cache: dict[tuple[str, str], RegionClassifier] = {}


def get_region_classifier(organ: OrganSpec | str) -> RegionClassifier:
    """The process-wide region classifier of an organ (by spec or registered name), created once."""
    from ..organs import get_organ

    spec = get_organ(organ) if isinstance(organ, str) else organ
    return _cached(_cls_cache, (spec.name, str(spec.resolve_classifier_weights())), lambda: load_region_classifier(spec))
