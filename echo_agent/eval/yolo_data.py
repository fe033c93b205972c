"""Build YOLO (ultralytics) training folders from manifests, through the inference preprocessing.

Every image is loaded with :func:`echo_agent.imaging.load_image` and passed through
:func:`echo_agent.imaging.preprocess.prepare_for_detection` -- exactly what the detector sees at
inference -- and its boxes are mapped into the prepared image with
:meth:`PreparedImage.from_original`. Images are stored downscaled so their long side is at most
``max_side`` (the training ``imgsz``; ultralytics resizes to that anyway), as PNG, with YOLO label
files (``class cx cy w h``, normalised). Lesion-free images get an empty label file (background).

Only numpy/OpenCV/PIL are used here; ultralytics itself is imported by ``tools/train_detector.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..schemas import Box
from .manifest import ManifestImage


@dataclass(frozen=True)
class YoloDataset:
    """What :func:`build_yolo_dataset` wrote: the ``data.yaml`` path, class names and counts."""

    data_yaml: Path
    names: tuple[str, ...]
    counts: dict[str, dict[str, int]]


def label_class_map(names: Sequence[str], *, lesion_only: bool = False) -> Callable[[ManifestImage], int | None]:
    """Map an image to the class index of its boxes: its label's index in ``names`` (``None`` =
    the label is not a detector class, e.g. ``normal``), or 0 for every lesion with ``lesion_only``."""
    index = {n: i for i, n in enumerate(names)}

    def class_of(im: ManifestImage) -> int | None:
        if lesion_only:
            return 0 if im.boxes else None
        return index.get(im.label)

    return class_of


def _safe_name(im: ManifestImage) -> str:
    digest = hashlib.sha1(im.key.encode("utf-8")).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in Path(im.image).stem)[:40]
    return f"{im.center or 'x'}_{stem}_{digest}"


def prepare_sample(
    im: ManifestImage, *, max_side: int | None = None, preprocess: bool = True
) -> tuple[np.ndarray, list[Box]]:
    """Load one manifest image, prepare it like inference does, and map its boxes into it.

    Returns the prepared HxWx3 uint8 array (downscaled to ``max_side`` when larger) and the boxes in
    its pixel coordinates (boxes that fall outside the field of view are dropped).
    """
    from ..imaging import load_image
    from ..imaging.preprocess import prepare_for_detection

    array = load_image(im.image).array
    boxes: list[Box] = []
    if preprocess:
        prep = prepare_for_detection(array)
        array = prep.array
        for b in im.boxes:
            try:
                boxes.append(prep.from_original(b))
            except ValueError:
                continue  # entirely outside the field of view
    else:
        boxes = list(im.boxes)
    h, w = array.shape[:2]
    if max_side is not None and max(h, w) > max_side:
        s = max_side / max(h, w)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        array = cv2.resize(array, (nw, nh), interpolation=cv2.INTER_AREA)
        sx, sy = nw / w, nh / h
        boxes = [Box(x1=b.x1 * sx, y1=b.y1 * sy, x2=b.x2 * sx, y2=b.y2 * sy) for b in boxes]
    return array, boxes


def build_yolo_dataset(
    splits: Mapping[str, Sequence[ManifestImage]],
    out_dir: str | Path,
    names: Sequence[str],
    *,
    class_of: Callable[[ManifestImage], int | None] | None = None,
    max_side: int | None = None,
    preprocess: bool = True,
) -> YoloDataset:
    """Write ``out_dir/images/<split>/*.png``, ``out_dir/labels/<split>/*.txt`` and ``out_dir/data.yaml``.

    ``splits`` maps a split name (``train``, ``val``, optionally ``test``) to manifest images;
    ``class_of`` gives the class index of an image's boxes (default: :func:`label_class_map`); images
    whose class is ``None`` but that have boxes are skipped (they would teach the model to ignore a
    lesion).
    """
    from PIL import Image

    out = Path(out_dir).resolve()
    class_of = class_of or label_class_map(names)
    counts: dict[str, dict[str, int]] = {}
    for split, images in splits.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        c = {"images": 0, "boxes": 0, "background": 0, "skipped": 0}
        for im in images:
            cls = class_of(im)
            if cls is None and im.boxes:
                c["skipped"] += 1
                continue
            array, boxes = prepare_sample(im, max_side=max_side, preprocess=preprocess)
            h, w = array.shape[:2]
            name = _safe_name(im)
            Image.fromarray(array[:, :, 0]).save(out / "images" / split / f"{name}.png", compress_level=1)
            lines = []
            for b in boxes:
                cx, cy = (b.x1 + b.x2) / 2 / w, (b.y1 + b.y2) / 2 / h
                lines.append(f"{cls} {cx:.6f} {cy:.6f} {b.width / w:.6f} {b.height / h:.6f}")
            (out / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
            c["images"] += 1
            c["boxes"] += len(lines)
            c["background"] += not lines
        counts[split] = c
    data = {
        "path": str(out),
        "train": "images/train",
        "val": "images/val" if "val" in splits else "images/train",
        "names": {i: n for i, n in enumerate(names)},
    }
    if "test" in splits:
        data["test"] = "images/test"
    import yaml

    data_yaml = out / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    (out / "counts.json").write_text(json.dumps(counts, indent=2))
    return YoloDataset(data_yaml=data_yaml, names=tuple(names), counts=counts)


__all__ = ["YoloDataset", "build_yolo_dataset", "label_class_map", "prepare_sample"]
