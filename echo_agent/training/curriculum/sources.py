"""Where detector candidates come from: a predictions file, the live detector, or simulated boxes."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ...errors import EchoInputError
from ...eval.manifest import ManifestImage
from ...organs import OrganSpec, get_organ
from ...schemas import Box, Detection


# ---------------------------------------------------------------------------------------------------
# detection sources
# ---------------------------------------------------------------------------------------------------
class DetectionSource(Protocol):
    """Where the detector's candidates of an image come from (pixel boxes of the original image).

    Returns ``None`` when it has nothing for that image (then detector-based tasks skip it).
    """

    name: str
    supports_tta: bool

    def __call__(
        self, im: ManifestImage, image: np.ndarray, *, score_threshold: float, tta: bool
    ) -> list[Detection] | None: ...


class PredictionsFile:
    """Detector candidates read from a JSONL file, e.g. the eval harness's ``predictions.jsonl``.

    Each line has ``key`` (manifest key) or ``image`` (path) and either ``detector.detections`` (the
    harness format) or ``detections``; every detection has a pixel ``box``, a ``score`` and
    ``detector_label`` or ``label``. The file holds one detector call per image, so TTA re-checks
    are not available (``supports_tta = False``).
    """

    supports_tta = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"predictions:{self.path.name}"
        self._by_key: dict[str, list[dict[str, Any]]] = {}
        self._by_image: dict[str, list[dict[str, Any]]] = {}
        with self.path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EchoInputError(f"{self.path}, line {n}: not JSON ({exc}); give a JSONL file") from None
                det = rec.get("detector")
                dets = det.get("detections") if isinstance(det, dict) else rec.get("detections")
                if dets is None:
                    continue  # the detector failed on this image in the harness run
                if rec.get("key"):
                    self._by_key[str(rec["key"])] = dets
                if rec.get("image"):
                    self._by_image[str(Path(rec["image"]).resolve())] = dets

    def __call__(
        self, im: ManifestImage, image: np.ndarray, *, score_threshold: float, tta: bool
    ) -> list[Detection] | None:
        dets = self._by_key.get(im.key)
        if dets is None:
            dets = self._by_image.get(str(im.image.resolve()))
        if dets is None:
            return None
        h, w = image.shape[:2]
        out = []
        for d in dets:
            if float(d["score"]) < score_threshold:
                continue
            try:
                box = Box.from_xyxy(d["box"]).clip(w, h)
            except ValueError:
                continue
            out.append(Detection(box=box, label=str(d.get("detector_label") or d["label"]), score=float(d["score"])))
        return sorted(out, key=lambda d: -d.score)


class LiveDetector:
    """Runs a real detector through the agent's single detection path (:func:`run_detector`).

    ``detectors`` maps organ -> detector; organs without one use the packaged weights
    (:func:`echo_agent.detectors.get_detector`).
    """

    supports_tta = True

    def __init__(self, detectors: Mapping[str, Any] | None = None, *, preprocess: bool = True) -> None:
        self.detectors = dict(detectors or {})
        self.preprocess = preprocess
        self.name = "detector"

    def __call__(
        self, im: ManifestImage, image: np.ndarray, *, score_threshold: float, tta: bool
    ) -> list[Detection] | None:
        from ...tools.toolkit import run_detector

        det = self.detectors.get(im.organ)
        if det is None:
            from ...detectors import get_detector

            det = self.detectors[im.organ] = get_detector(im.organ)
        self.name = str(getattr(det, "name", type(det).__name__))
        return run_detector(im.organ, image, detector=det, score_threshold=score_threshold, tta=tta,
                            preprocess=self.preprocess)


class SimulatedDetector:
    """A documented stand-in for a detector: ground-truth boxes with seeded noise.

    For each true lesion: misses it with ``p_miss``; otherwise returns a box whose corners move by up
    to ``jitter`` of the box size, the organ's detector label of the true class (flipped to another
    detector label with ``p_flip``) and a score in ``score_range``. Adds a false positive with
    ``p_false_positive``. With ``tta=True`` jitter and miss rate halve. Use it only where no detector
    or predictions exist (tests, the micro-scale demonstration); samples record its name.
    """

    supports_tta = True
    name = "simulated-detector"

    def __init__(
        self,
        seed: int = 0,
        *,
        p_miss: float = 0.1,
        p_flip: float = 0.15,
        p_false_positive: float = 0.15,
        jitter: float = 0.15,
        score_range: tuple[float, float] = (0.3, 0.95),
    ) -> None:
        self.seed = seed
        self.p_miss, self.p_flip, self.p_fp, self.jitter = p_miss, p_flip, p_false_positive, jitter
        self.score_range = score_range

    def __call__(
        self, im: ManifestImage, image: np.ndarray, *, score_threshold: float, tta: bool
    ) -> list[Detection] | None:
        spec = get_organ(im.organ)
        h, w = image.shape[:2]
        rng = random.Random(_stable_seed(self.seed, im.key, "tta" if tta else "plain"))
        jitter = self.jitter / (2 if tta else 1)
        p_miss = self.p_miss / (2 if tta else 1)
        true_det = _detector_label_for(spec, im.label)
        out: list[Detection] = []
        for b in im.boxes:
            if rng.random() < p_miss:
                continue
            label = true_det
            others = [lbl for lbl in spec.detector_labels if lbl != label]
            if others and rng.random() < self.p_flip:
                label = rng.choice(others)
            out.append(Detection(box=jitter_box(b, rng, jitter, w, h), label=label,
                                 score=round(rng.uniform(*self.score_range), 3)))
        if rng.random() < self.p_fp:
            out.append(Detection(box=random_box(rng, w, h), label=rng.choice(spec.detector_labels),
                                 score=round(rng.uniform(self.score_range[0], 0.5), 3)))
        return sorted((d for d in out if d.score >= score_threshold), key=lambda d: -d.score)


def _stable_seed(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def _detector_label_for(spec: OrganSpec, image_label: str) -> str:
    for lbl in spec.detector_labels:
        if spec.image_label_for(lbl) == image_label:
            return lbl
    return spec.detector_labels[0]


def jitter_box(box: Box, rng: random.Random, amount: float, width: int, height: int) -> Box:
    """``box`` with each corner moved by up to ``amount`` of the box size, clipped to the image."""
    dx, dy = box.width * amount, box.height * amount
    for _ in range(10):
        x1 = box.x1 + rng.uniform(-dx, dx)
        y1 = box.y1 + rng.uniform(-dy, dy)
        x2 = box.x2 + rng.uniform(-dx, dx)
        y2 = box.y2 + rng.uniform(-dy, dy)
        if x2 - x1 > 2 and y2 - y1 > 2:
            try:
                return Box(x1=x1, y1=y1, x2=x2, y2=y2).clip(width, height)
            except ValueError:
                continue
    return box


def random_box(rng: random.Random, width: int, height: int) -> Box:
    """A random box covering 5-25 % of each image side."""
    bw, bh = rng.uniform(0.05, 0.25) * width, rng.uniform(0.05, 0.25) * height
    x1, y1 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
    return Box(x1=x1, y1=y1, x2=x1 + bw, y2=y1 + bh)
