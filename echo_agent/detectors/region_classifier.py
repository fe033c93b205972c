"""Second-look region classifiers: "look closer" at a candidate box (or the whole image).

A region classifier takes an image and boxes (``None`` = the whole image) and returns calibrated
probabilities over the organ's image labels for each box: for breast ``normal`` (no lesion in the
region) / ``benign`` / ``malignant``, for kidney ``normal`` / ``hydronephrosis``. The packaged ones
are EfficientNet-Lite0 networks started from ImageNet weights and fine-tuned on our data
(``tools/train_classifier.py``), run here through ONNX Runtime: no torch at inference.

Every crop is made by :func:`square_crop`, which the trainer also uses, so training and inference
see the same pixels: a square around the box grown by a context margin (the lesion's surroundings,
e.g. posterior shadowing, carry the diagnosis), zero-padded outside the image, resized to the
network's input. A square keeps the box's aspect ratio (taller-than-wide is itself a finding).

The ONNX file carries its own description in the metadata key :data:`CLASSIFIER_META_KEY` (JSON:
labels, input size, margin, input scaling, temperature, backbone, training data), so a file is
self-describing and cannot be paired with the wrong preprocessing.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ModelLoadError
from ..schemas import Box
from .base import check_image, weights_digest
from .onnx import inference_session

__all__ = [
    "CLASSIFIER_META_KEY",
    "ClassifierInfo",
    "OnnxRegionClassifier",
    "RegionClassifier",
    "square_crop",
]

#: ONNX metadata key holding the classifier's JSON description.
CLASSIFIER_META_KEY = "echo_classifier"


class ClassifierInfo(dict):  # plain dict subclass: JSON round-trips, attribute-free on purpose
    """The parsed :data:`CLASSIFIER_META_KEY` metadata (``labels``, ``input_size``, ``margin``,
    ``offset``, ``scale``, ``temperature``, and free-form provenance keys)."""

    REQUIRED = ("labels", "input_size", "margin", "offset", "scale")

    @classmethod
    def parse(cls, text: str, source: str) -> ClassifierInfo:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{source}: the {CLASSIFIER_META_KEY!r} metadata is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"{source}: the {CLASSIFIER_META_KEY!r} metadata must be a JSON object")
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise ModelLoadError(f"{source}: classifier metadata lacks {missing}; re-export with tools/train_classifier.py")
        labels = data["labels"]
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise ModelLoadError(f"{source}: classifier labels must be a list of at least two names, got {labels!r}")
        t = float(data.get("temperature", 1.0))
        if not (t > 0):
            raise ModelLoadError(f"{source}: classifier temperature must be > 0, got {t}")
        data["temperature"] = t
        return cls(data)


def square_crop(image: np.ndarray, box: Box | None, *, margin: float, size: int) -> np.ndarray:
    """The ``size`` x ``size`` uint8 RGB crop a region classifier sees for ``box``.

    The crop is the square centred on the box whose side is the box's longer side grown by
    ``margin`` of it on each side (at least 16 px), zero-padded where it leaves the image, then
    resized with area interpolation. ``box=None`` crops the whole image, padded to a square.

    >>> img = np.full((100, 200, 3), 255, np.uint8)
    >>> square_crop(img, Box(x1=90, y1=40, x2=110, y2=60), margin=0.5, size=32).shape
    (32, 32, 3)
    >>> int(square_crop(img, None, margin=0.0, size=32)[0, 16, 0])   # padding above the wide image
    0
    """
    import cv2

    h, w = image.shape[:2]
    if box is None:
        cx, cy, side = w / 2.0, h / 2.0, float(max(w, h))
    else:
        cx, cy = (box.x1 + box.x2) / 2.0, (box.y1 + box.y2) / 2.0
        side = max(box.x2 - box.x1, box.y2 - box.y1) * (1.0 + 2.0 * margin)
        side = max(side, 16.0)
    s = max(1, int(round(side)))
    x0, y0 = int(round(cx - s / 2.0)), int(round(cy - s / 2.0))
    canvas = np.zeros((s, s, 3), dtype=np.uint8)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(w, x0 + s), min(h, y0 + s)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1, :3]
    interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return cv2.resize(canvas, (size, size), interpolation=interp)


@runtime_checkable
class RegionClassifier(Protocol):
    """Anything that gives class probabilities for boxes of an image (``None`` = whole image)."""

    name: str

    @property
    def labels(self) -> tuple[str, ...]: ...

    def classify(self, image: np.ndarray, boxes: Sequence[Box | None]) -> list[dict[str, float]]: ...


class OnnxRegionClassifier:
    """A region classifier exported by ``tools/train_classifier.py``, run with ONNX Runtime.

    Args:
        path: the ``.onnx`` file (with :data:`CLASSIFIER_META_KEY` metadata).
        intra_op_threads: ONNX Runtime threads (default: 2, or 1 on a one-core machine).
        name: evidence name (default ``onnx-classifier:<file stem>@<8 hex of the file hash>``).
        max_batch: crops per forward pass.

    The session is created on first use. ``classify`` is thread-safe.
    """

    backend = "onnx"

    def __init__(
        self,
        path: str | Path,
        *,
        intra_op_threads: int | None = None,
        name: str | None = None,
        max_batch: int = 8,
    ) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelLoadError(
                f"region classifier weights not found at {path}; check the path or train and export one "
                "(tools/train_classifier.py)"
            )
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.path = path
        self.intra_op_threads = intra_op_threads
        self.max_batch = int(max_batch)
        self._name = name
        self._session: Any = None
        self._info: ClassifierInfo | None = None
        self._input_name = ""
        self._lock = threading.Lock()

    # -- loading ------------------------------------------------------------------------------------------
    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            # Two threads by default: the classifier runs after the detector, when the captioner's
            # background analysis is usually done, and 3 crops take 17 ms instead of 30 on 2 cores.
            session = inference_session(self.path, threads=int(self.intra_op_threads or min(2, os.cpu_count() or 1)))
            meta = session.get_modelmeta().custom_metadata_map or {}
            if CLASSIFIER_META_KEY not in meta:
                raise ModelLoadError(
                    f"{self.path} has no {CLASSIFIER_META_KEY!r} metadata: it is not a region classifier exported by "
                    "tools/train_classifier.py (a detector's weights go to the detector, not here)"
                )
            info = ClassifierInfo.parse(meta[CLASSIFIER_META_KEY], str(self.path))
            inputs, outputs = session.get_inputs(), session.get_outputs()
            if len(inputs) != 1 or len(inputs[0].shape) != 4:
                raise ModelLoadError(f"{self.path}: expected one (batch, 3, size, size) input, got {[i.shape for i in inputs]}")
            n_out = outputs[0].shape[-1]
            if isinstance(n_out, int) and n_out != len(info["labels"]):
                raise ModelLoadError(
                    f"{self.path}: the network has {n_out} outputs but its metadata names {len(info['labels'])} labels"
                )
            self._info = info
            self._input_name = inputs[0].name
            self._session = session

    @property
    def info(self) -> ClassifierInfo:
        if self._info is None:
            self._load()
        assert self._info is not None
        return self._info

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.info["labels"])

    @property
    def name(self) -> str:
        if self._name is None:
            self._name = f"onnx-classifier:{self.path.stem}@{weights_digest(self.path)}"
        return self._name

    # -- inference -----------------------------------------------------------------------------------------
    def crops(self, image: np.ndarray, boxes: Sequence[Box | None]) -> np.ndarray:
        """The network input for ``boxes`` of ``image``: float32 (n, 3, size, size)."""
        info = self.info
        size, margin = int(info["input_size"]), float(info["margin"])
        batch = np.stack([square_crop(image, b, margin=margin, size=size) for b in boxes])
        x = (batch.astype(np.float32) - float(info["offset"])) / float(info["scale"])
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def logits(self, image: np.ndarray, boxes: Sequence[Box | None]) -> np.ndarray:
        """Uncalibrated logits, one row per box."""
        check_image(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if not boxes:
            return np.zeros((0, len(self.labels)), dtype=np.float64)
        x = self.crops(image, boxes)
        out = [
            np.asarray(self._session.run(None, {self._input_name: x[i : i + self.max_batch]})[0], dtype=np.float64)
            for i in range(0, len(x), self.max_batch)
        ]
        return np.concatenate(out, axis=0)

    def classify(self, image: np.ndarray, boxes: Sequence[Box | None]) -> list[dict[str, float]]:
        """Calibrated probabilities over :attr:`labels` for each box (``None`` = whole image)."""
        z = self.logits(image, boxes) / float(self.info["temperature"])
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return [{lbl: float(v) for lbl, v in zip(self.labels, row, strict=True)} for row in p]
