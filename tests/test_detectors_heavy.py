"""Train a tiny YOLOv8n on synthetic ellipses, export it to ONNX and check both backends agree.

Needs the ``train`` extra (torch + ultralytics); about a minute on two CPU cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.heavy

if importlib.util.find_spec("ultralytics") is None or importlib.util.find_spec("torch") is None:
    pytest.skip("needs torch and ultralytics (pip install 'echo-agent[train]')", allow_module_level=True)

import yaml  # noqa: E402

from echo_agent.detectors import (  # noqa: E402
    OnnxDetector,
    UltralyticsDetector,
    configure_ultralytics_offline,
    export_onnx,
    letterbox,
    load_detector,
)
from echo_agent.detectors.postprocess import box_iou  # noqa: E402
from echo_agent.errors import ModelLoadError  # noqa: E402

IMGSZ = 128
NAMES = {0: "benign", 1: "malignant"}


def _synthetic_image(rng: np.random.Generator, size: int = IMGSZ) -> tuple[np.ndarray, list[str]]:
    """A speckled background with one or two bright ellipses; returns the RGB image and YOLO label rows."""
    import cv2

    gray = np.clip(rng.normal(40, 12, (size, size)), 0, 255).astype(np.uint8)
    rows = []
    for _ in range(int(rng.integers(1, 3))):
        cls = int(rng.integers(0, 2))
        # benign: small and round; malignant: large and elongated
        ax = (
            (int(rng.integers(8, 14)),) * 2
            if cls == 0
            else (int(rng.integers(20, 30)), int(rng.integers(8, 12)))
        )
        cx, cy = (int(v) for v in rng.integers(32, size - 32, 2))
        cv2.ellipse(gray, (cx, cy), ax, 0, 0, 360, 210, -1)
        rows.append(f"{cls} {cx / size:.6f} {cy / size:.6f} {2 * ax[0] / size:.6f} {2 * ax[1] / size:.6f}")
    return np.repeat(gray[..., None], 3, axis=2), rows


@pytest.fixture(scope="session")
def tiny_yolo(tmp_path_factory) -> dict[str, Path]:
    """A YOLOv8n (nc=2) trained 2 epochs on 16 synthetic images, as .pt and as dynamic ONNX."""
    configure_ultralytics_offline()  # before the first import of ultralytics
    import cv2
    import ultralytics
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("tiny_yolo")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img, rows = _synthetic_image(rng)
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), img[..., ::-1])
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(rows) + "\n")
    data = root / "data.yaml"
    data.write_text(
        yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val", "names": NAMES})
    )

    arch = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8.yaml").read_text())
    arch.update(nc=2, scale="n")
    model_yaml = root / "yolov8n-tiny.yaml"
    model_yaml.write_text(yaml.safe_dump(arch))

    YOLO(str(model_yaml), task="detect").train(
        data=str(data),
        epochs=2,
        imgsz=IMGSZ,
        batch=8,
        workers=0,
        device="cpu",
        plots=False,
        val=False,
        amp=False,
        seed=0,
        project=str(root / "runs"),
        name="tiny",
        exist_ok=True,
        verbose=False,
    )
    pt = root / "runs" / "tiny" / "weights" / "last.pt"
    assert pt.is_file()
    onnx_path = export_onnx(pt, root / "tiny.onnx", imgsz=IMGSZ, dynamic=True, simplify=True)
    images = [_synthetic_image(rng, s)[0] for s in (IMGSZ, 96)]
    images.append(np.ascontiguousarray(np.pad(images[0], ((20, 20), (0, 0), (0, 0)))[:, :100]))  # non-square
    return {"pt": pt, "onnx": onnx_path, "root": root, "images": images}


def test_letterbox_matches_ultralytics():
    configure_ultralytics_offline()
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(1)
    for h, w in [(100, 200), (333, 127), (640, 480), (50, 50), (719, 1280)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for size in (128, 640):
            ours, _ = letterbox(img, size)
            theirs = LetterBox(new_shape=(size, size), auto=False, center=True)(image=img)
            assert np.array_equal(ours, theirs), (h, w, size)


def test_onnx_export_metadata(tiny_yolo):
    det = load_detector(tiny_yolo["onnx"])
    assert isinstance(det, OnnxDetector)
    assert det.labels == ("benign", "malignant")
    assert det.input_size == IMGSZ and det.dynamic_batch
    assert det.name.startswith("tiny-onnx@")


def test_backends_agree(tiny_yolo):
    onnx_det = OnnxDetector(tiny_yolo["onnx"])
    torch_det = load_detector(tiny_yolo["pt"])
    assert isinstance(torch_det, UltralyticsDetector)
    assert torch_det.labels == onnx_det.labels and torch_det.input_size == IMGSZ
    images = tiny_yolo["images"]

    raw_onnx, infos_onnx = onnx_det.predict_raw(images)
    raw_torch, infos_torch = torch_det.predict_raw(images)
    assert infos_onnx == infos_torch
    assert raw_onnx.shape == raw_torch.shape == (len(images), 6, 336)  # 16^2 + 8^2 + 4^2 anchors at 128
    np.testing.assert_allclose(raw_onnx[:, :4], raw_torch[:, :4], atol=2e-2)  # pixels
    np.testing.assert_allclose(raw_onnx[:, 4:], raw_torch[:, 4:], atol=1e-3)  # scores

    # the best raw score decides a threshold that keeps a handful of boxes in every image
    thr = float(min(raw_onnx[i, 4:].max() for i in range(len(images)))) * 0.5
    for img in images:
        a = onnx_det.detect(img, score_threshold=thr, max_detections=5)
        b = torch_det.detect(img, score_threshold=thr, max_detections=5)
        assert a, "the threshold keeps at least the best box"
        _assert_same_detections(a[:3], b)


def _assert_same_detections(subset, full):
    """Every detection of ``subset`` has a same-label twin in ``full`` (IoU > 0.98, score within 1e-3)."""
    boxes = np.array([d.box.to_list() for d in full])
    for d in subset:
        iou = box_iou(np.array([d.box.to_list()]), boxes)[0]
        twins = [
            f
            for f, v in zip(full, iou, strict=True)
            if v > 0.98 and f.label == d.label and abs(f.score - d.score) < 1e-3
        ]
        assert twins, f"no twin for {d} in {full}"


def test_matches_ultralytics_predict(tiny_yolo):
    """Our letterbox + decode + NMS + box mapping reproduce ultralytics' own predictor (square letterbox)."""
    from ultralytics import YOLO

    torch_det = UltralyticsDetector(tiny_yolo["pt"])
    yolo = YOLO(str(tiny_yolo["pt"]), task="detect")
    for img in tiny_yolo["images"]:
        raw, _ = torch_det.predict_raw([img])
        thr = float(raw[0, 4:].max()) * 0.5
        ours = torch_det.detect(img, score_threshold=thr, iou_threshold=0.5, max_detections=10)
        res = yolo.predict(
            np.ascontiguousarray(img[..., ::-1]),  # ultralytics takes BGR arrays
            imgsz=IMGSZ,
            conf=thr,
            iou=0.5,
            max_det=10,
            rect=False,
            device="cpu",
            verbose=False,
        )[0]
        theirs = res.boxes
        assert ours, "the threshold keeps at least the best box"
        assert len(ours) == len(theirs)
        np.testing.assert_allclose([d.box.to_list() for d in ours], theirs.xyxy.numpy(), atol=0.05)
        np.testing.assert_allclose([d.score for d in ours], theirs.conf.numpy(), atol=1e-4)
        assert [d.label for d in ours] == [NAMES[int(c)] for c in theirs.cls.numpy()]


def test_batch_and_tta_on_real_model(tiny_yolo):
    det = OnnxDetector(tiny_yolo["onnx"])
    images = tiny_yolo["images"]
    for tta in (False, True):
        batched = det.detect_batch(images, score_threshold=0.001, tta=tta)
        single = [det.detect(img, score_threshold=0.001, tta=tta) for img in images]
        assert all(batched), "score_threshold=0.001 keeps boxes in every image"
        for bs, ss in zip(batched, single, strict=True):
            assert [d.label for d in bs] == [d.label for d in ss]
            np.testing.assert_allclose([d.score for d in bs], [d.score for d in ss], atol=1e-5)


def test_ultralytics_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        UltralyticsDetector(tmp_path / "yolov8n.pt")  # never downloaded by name
    with pytest.raises(ModelLoadError, match="expected a"):
        UltralyticsDetector(tmp_path / "model.onnx")
