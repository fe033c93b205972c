"""YOLO training folders are built through the inference preprocessing, with boxes mapped along."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from echo_agent.eval.manifest import ManifestImage
from echo_agent.eval.yolo_data import build_yolo_dataset, label_class_map, prepare_sample
from echo_agent.schemas import Box


def _scan(path: Path, pad_left: int, pad_top: int) -> None:
    """A 200x160 speckle field placed on a black canvas with a white label outside the field."""
    rng = np.random.default_rng(0)
    canvas = np.zeros((160 + pad_top + 20, 200 + pad_left + 30), np.uint8)
    canvas[pad_top : pad_top + 160, pad_left : pad_left + 200] = rng.integers(60, 160, (160, 200))
    cv2.putText(canvas, "R", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
    Image.fromarray(canvas).save(path)


def test_build_maps_boxes_into_the_prepared_crop(tmp_path: Path) -> None:
    _scan(tmp_path / "a.png", pad_left=40, pad_top=30)
    _scan(tmp_path / "b.png", pad_left=10, pad_top=10)
    ims = [
        ManifestImage(image=tmp_path / "a.png", organ="breast", label="malignant", center="t",
                      boxes=(Box(x1=60, y1=50, x2=100, y2=90),)),
        ManifestImage(image=tmp_path / "b.png", organ="breast", label="normal", center="t"),
    ]
    arr, boxes = prepare_sample(ims[0])
    assert arr.shape[:2] == (160, 200)  # cropped to the field
    assert boxes == [Box(x1=20, y1=20, x2=60, y2=60)]
    ds = build_yolo_dataset({"train": ims, "val": ims[:1]}, tmp_path / "yolo", ["benign", "malignant"])
    data = yaml.safe_load(ds.data_yaml.read_text())
    assert data["names"] == {0: "benign", 1: "malignant"} and data["train"] == "images/train"
    labels = sorted((tmp_path / "yolo" / "labels" / "train").glob("*.txt"))
    texts = {p.read_text() for p in labels}
    cls, cx, cy, w, h = next(t for t in texts if t).split()
    assert cls == "1"
    assert np.allclose([float(cx), float(cy), float(w), float(h)], [40 / 200, 40 / 160, 40 / 200, 40 / 160])
    assert "" in texts  # the normal image is a background image
    assert ds.counts["train"] == {"images": 2, "boxes": 1, "background": 1, "skipped": 0}
    # images are stored at most max_side on the long side; normalised labels do not change
    small = build_yolo_dataset({"train": ims[:1]}, tmp_path / "small", ["benign", "malignant"], max_side=100)
    img = Image.open(next((tmp_path / "small" / "images" / "train").glob("*.png")))
    assert max(img.size) == 100
    assert small.counts["train"]["boxes"] == 1


def test_lesion_only_class_map() -> None:
    im = ManifestImage(image=Path("/x.png"), organ="breast", label="benign", boxes=(Box(x1=0, y1=0, x2=1, y2=1),))
    assert label_class_map(["benign", "malignant"])(im) == 0
    assert label_class_map(["lesion"], lesion_only=True)(im) == 0
    normal = ManifestImage(image=Path("/y.png"), organ="breast", label="normal")
    assert label_class_map(["benign", "malignant"])(normal) is None
