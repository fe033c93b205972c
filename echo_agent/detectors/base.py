"""The :class:`Detector` protocol every lesion-detector backend satisfies, and shared machinery.

A detector takes the canonical image array (``HxWx3`` ``uint8`` RGB) and returns
:class:`~echo_agent.schemas.Detection` objects whose boxes are pixel ``[x1, y1, x2, y2]`` of *that*
array (clipped to it), ``label`` a class name from :attr:`Detector.labels`, ``score`` in [0, 1],
``source`` ``'detector'`` (``'tta'`` with test-time augmentation) and an empty ``id`` (the tool that
calls the detector assigns ids).

Keyword arguments shared by :meth:`Detector.detect` and :meth:`Detector.detect_batch` (also bundled
as :class:`DetectorConfig`):

``score_threshold`` (0.25)
    keep candidates whose best class score is strictly above it.
``iou_threshold`` (0.5)
    class-aware NMS: a box overlapping a higher-scored box of the same class by more than this goes.
``tta`` (False)
    also run the horizontally mirrored image and fuse both views with weighted boxes fusion; a box
    only one view found keeps half its score, so fused scores can fall below ``score_threshold``.
``max_detections`` (20)
    at most this many detections per image, best first.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ChannelLayoutError, EchoInputError
from ..schemas import Detection
from .postprocess import (
    DecodedBoxes,
    LetterboxInfo,
    decode_end2end,
    decode_yolo,
    detections_from_arrays,
    letterbox,
    tta_merge,
    unletterbox_boxes,
)

__all__ = ["Detector", "DetectorConfig", "LetterboxYoloDetector", "PinnedValues", "check_image", "weights_digest"]


@runtime_checkable
class Detector(Protocol):
    """What the detector tools need from a backend (ONNX Runtime, ultralytics, or your own).

    ``name`` identifies the model and its weights, e.g. ``'breast-onnx@1a2b3c4d'``; ``labels`` are the
    class names in class-index order.
    """

    @property
    def name(self) -> str:
        """Model name and weights version, e.g. ``'breast-onnx@1a2b3c4d'``."""
        ...

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names in class-index order."""
        ...

    def detect(
        self,
        image: np.ndarray,
        *,
        score_threshold: float = 0.25,
        iou_threshold: float = 0.5,
        tta: bool = False,
        max_detections: int = 20,
    ) -> list[Detection]:
        """Detect lesions in one ``HxWx3`` uint8 RGB image."""
        ...

    def detect_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        score_threshold: float = 0.25,
        iou_threshold: float = 0.5,
        tta: bool = False,
        max_detections: int = 20,
    ) -> list[list[Detection]]:
        """Detect lesions in several images; one list per image, same result as calling ``detect`` on each."""
        ...


@dataclass(frozen=True)
class DetectorConfig:
    """The detection keyword arguments as one validated value (``detector.detect(img, **cfg.as_kwargs())``).

    >>> DetectorConfig(score_threshold=0.4).as_kwargs()["score_threshold"]
    0.4
    """

    score_threshold: float = 0.25
    iou_threshold: float = 0.5
    tta: bool = False
    max_detections: int = 20

    def __post_init__(self) -> None:
        for name in ("score_threshold", "iou_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise EchoInputError(f"{name} must be a number in [0, 1], got {v!r}")
        if not isinstance(self.max_detections, (int, np.integer)) or self.max_detections < 1:
            raise EchoInputError(f"max_detections must be a positive integer, got {self.max_detections!r}")

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


def check_image(image: Any, what: str = "image") -> np.ndarray:
    """Raise :class:`ChannelLayoutError` unless ``image`` is the canonical ``HxWx3`` uint8 array."""
    if not isinstance(image, np.ndarray):
        raise ChannelLayoutError(
            f"{what} must be a numpy array (HxWx3 uint8 RGB), got {type(image).__name__}; "
            "load files with echo_agent.imaging first"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ChannelLayoutError(
            f"{what} must be an HxWx3 uint8 RGB array, got shape {image.shape} dtype {image.dtype}; "
            "replicate grayscale to 3 channels and convert to uint8 first"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ChannelLayoutError(f"{what} is empty (shape {image.shape})")
    return image


def weights_digest(path: Path, length: int = 8) -> str:
    """First ``length`` hex digits of the SHA-256 of a weights file (identifies the model version)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


class LetterboxYoloDetector:
    """Shared pipeline of the YOLO backends: letterbox -> forward -> decode -> map back -> Detections.

    A backend implements :meth:`_load` (heavy initialisation, run once, lazily, under a lock; it sets
    ``_labels``, ``_input_size``, ``_dynamic_batch`` and ``_end2end``) and :meth:`_forward` (a
    ``(B, 3, S, S)`` float32 batch in [0, 1] -> the raw head output).
    """

    backend = "yolo"

    def __init__(self, path: Path, *, name: str | None = None, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.path = Path(path)
        self._name = name
        self.max_batch = int(max_batch)
        self._lock = threading.Lock()
        self._loaded = False
        self._labels: tuple[str, ...] = ()
        self._labels_arg: tuple[str, ...] | None = None
        self._input_size: int = 640
        self._dynamic_batch = False
        self._end2end = False

    # -- lazy loading ----------------------------------------------------------------------------
    def _load(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self) -> LetterboxYoloDetector:
        """Load the model now instead of on the first call (idempotent, thread-safe); returns ``self``."""
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._load()
                    self._loaded = True
        return self

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def name(self) -> str:
        """``'<weights stem>-<backend>@<sha8>'`` unless a name was given."""
        if self._name is None:
            self._name = f"{self.path.stem}-{self.backend}@{weights_digest(self.path)}"
        return self._name

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names in class-index order (loads the model first unless ``labels=`` was given)."""
        if not self._loaded and self._labels_arg is not None:
            # Cheap answer: protocol checks (isinstance on Python < 3.12 reads attributes) must not load.
            return self._labels_arg
        self.load()
        return self._labels

    @property
    def input_size(self) -> int:
        """Side of the square letterboxed network input (loads the model if needed)."""
        self.load()
        return self._input_size

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"{type(self).__name__}({str(self.path)!r}, {state})"

    # -- inference -------------------------------------------------------------------------------
    def predict_raw(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxInfo]]:
        """Letterbox ``images`` and run the network; returns the raw head output and the letterbox info.

        One forward pass per ``max_batch`` images when the model has a dynamic batch axis, else one per
        image (outputs concatenated). Useful to compare backends and to benchmark.
        """
        self.load()
        images = [check_image(img, f"image {i}") for i, img in enumerate(images)]
        if not images:
            return np.zeros((0, 0, 0), dtype=np.float32), []
        step = self.max_batch if self._dynamic_batch else 1
        outs, infos = [], []
        for start in range(0, len(images), step):  # letterbox chunk by chunk: memory stays O(max_batch)
            batch, chunk_infos = self._preprocess(images[start : start + step])
            outs.append(self._forward(batch))
            infos += chunk_infos
        return (outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)), infos

    def _preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxInfo]]:
        """Letterbox into one uint8 buffer, then one conversion to the float32 NCHW batch in [0, 1]."""
        s = self._input_size
        padded = np.empty((len(images), s, s, 3), dtype=np.uint8)
        infos = [letterbox(img, s, out=padded[i])[1] for i, img in enumerate(images)]
        batch = np.empty((len(images), 3, s, s), dtype=np.float32)
        np.divide(padded.transpose(0, 3, 1, 2), np.float32(255.0), out=batch, dtype=np.float32)
        return batch, infos

    def detect(
        self,
        image: np.ndarray,
        *,
        score_threshold: float = 0.25,
        iou_threshold: float = 0.5,
        tta: bool = False,
        max_detections: int = 20,
    ) -> list[Detection]:
        """Detect lesions in one ``HxWx3`` uint8 RGB image (see the module docstring for the arguments)."""
        return self.detect_batch(
            [image],
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
            tta=tta,
            max_detections=max_detections,
        )[0]

    def detect_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        score_threshold: float = 0.25,
        iou_threshold: float = 0.5,
        tta: bool = False,
        max_detections: int = 20,
    ) -> list[list[Detection]]:
        """Detect lesions in several images with one batched forward pass where the model allows."""
        cfg = DetectorConfig(score_threshold, iou_threshold, bool(tta), max_detections)
        images = [check_image(img, f"image {i}") for i, img in enumerate(images)]
        if not images:
            return []
        views = list(images)
        if cfg.tta:
            import cv2  # lazy, like letterbox: keeps `import echo_agent.detectors` light

            # the mirrored views (cv2.flip: the bytes of img[:, ::-1], ~10x faster to materialise)
            views += [cv2.flip(img, 1) for img in images]
        raw, infos = self.predict_raw(views)
        decoded = self._decode(raw, cfg)
        per_view = [self._to_detections(d, info, "detector") for d, info in zip(decoded, infos, strict=True)]
        if not cfg.tta:
            return per_view
        n = len(images)
        return [
            tta_merge(per_view[i], per_view[n + i], images[i].shape[1], max_detections=cfg.max_detections)
            for i in range(n)
        ]

    def _decode(self, raw: np.ndarray, cfg: DetectorConfig) -> list[DecodedBoxes]:
        if self._end2end:
            return decode_end2end(raw, score_threshold=cfg.score_threshold, max_detections=cfg.max_detections)
        return decode_yolo(
            raw,
            score_threshold=cfg.score_threshold,
            iou_threshold=cfg.iou_threshold,
            max_detections=cfg.max_detections,
            num_classes=len(self._labels),
        )

    def _to_detections(self, d: DecodedBoxes, info: LetterboxInfo, source: str) -> list[Detection]:
        boxes = unletterbox_boxes(d.boxes, info)
        return detections_from_arrays(
            DecodedBoxes(boxes, d.scores, d.class_ids),
            self._labels,
            width=info.orig_w,
            height=info.orig_h,
            source=source,
        )


class PinnedValues:
    """Values held by key until every :meth:`pin` of that key has been matched by an :meth:`unpin`
    (thread-safe), whatever else is cached or evicted meanwhile. Used to hold a batch's prepared
    detector inputs (``Toolkit.prefetched``) and network outputs (``OnnxDetector.pin``)."""

    def __init__(self) -> None:
        self._items: dict[Any, list[Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        """The pinned value of ``key``, or None."""
        with self._lock:
            entry = self._items.get(key)
            return None if entry is None else entry[0]

    def pin(self, key: Any, value: Any) -> None:
        """Hold ``value`` under ``key`` (a key already held keeps its first value, one more pin)."""
        with self._lock:
            self._items.setdefault(key, [value, 0])[1] += 1

    def unpin(self, key: Any) -> None:
        """Release one pin of ``key`` (the value goes with the last one; unknown keys are ignored)."""
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._items[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
