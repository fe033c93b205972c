"""The mask-supervised second look: masks, cell targets, configuration, training and export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from echo_agent.eval.datasets import HYDRONEPHROSIS_NCNU, lesion_mask
from echo_agent.eval.manifest import ManifestImage
from echo_agent.schemas import Box
from echo_agent.training.mask_classifier import (
    CELL,
    MaskClassifierTrainConfig,
    cell_targets,
    prepare_masked_crops,
)

LABELS = ["normal", "hydronephrosis"]


def _frame(tmp_path: Path, name: str, label: str, *, mask_file: bool, center: str = HYDRONEPHROSIS_NCNU) -> ManifestImage:
    from echo_agent.imaging import save_png

    rng = np.random.default_rng(sum(map(ord, name)))
    g = rng.integers(90, 160, size=(96, 128), dtype=np.uint8)
    boxes: tuple[Box, ...] = ()
    if label != "normal":
        g[30:50, 40:90] = 10  # dark fluid
        boxes = (Box(x1=40, y1=30, x2=90, y2=50),)
    path = tmp_path / f"{name}.png"
    save_png(np.repeat(g[:, :, None], 3, axis=2), path)
    if mask_file:
        from PIL import Image

        m = np.zeros_like(g)
        m[32:48, 45:85] = 255  # the mask is tighter than the box
        Image.fromarray(m).save(tmp_path / f"{name}_M.jpg")
    return ManifestImage(image=path, organ="kidney", label=label, boxes=boxes, center=center, group=name)


def test_lesion_mask_reads_the_mask_file_else_fills_the_boxes(tmp_path: Path) -> None:
    with_file = _frame(tmp_path, "a", "hydronephrosis", mask_file=True)
    m = lesion_mask(with_file, (128, 96))
    assert m.shape == (96, 128) and m[40, 60] and not m[31, 41]  # the file's mask, not the box
    boxes_only = _frame(tmp_path, "b", "hydronephrosis", mask_file=False, center="toy")
    m = lesion_mask(boxes_only, (128, 96))
    assert m[30:50, 40:90].all() and m.sum() == 20 * 50
    assert lesion_mask(_frame(tmp_path, "c", "normal", mask_file=False), (128, 96)) is None


def test_cell_targets_are_the_lesion_share_of_each_cell() -> None:
    masks = np.zeros((1, 4 * CELL, 4 * CELL), bool)
    masks[0, :CELL, :CELL] = True
    masks[0, CELL:CELL + CELL // 2, :CELL] = True
    t = cell_targets(masks)
    assert t.shape == (1, 4, 4) and t[0, 0, 0] == 1.0 and t[0, 1, 0] == 0.5 and t[0, 2:].sum() == 0


def test_configuration_is_checked() -> None:
    with pytest.raises(ValueError, match="two labels"):
        MaskClassifierTrainConfig(organ="breast", labels=["normal", "benign", "malignant"], centers=["busi"])
    with pytest.raises(ValueError, match="multiple of 32"):
        MaskClassifierTrainConfig(organ="kidney", labels=LABELS, centers=[], input_size=200)
    with pytest.raises(ValueError, match="top_k"):
        MaskClassifierTrainConfig(organ="kidney", labels=LABELS, centers=[], top_k=0)
    with pytest.raises(ValueError, match="frame_loss_weight"):
        MaskClassifierTrainConfig(organ="kidney", labels=LABELS, centers=[], frame_loss_weight=-1)


def test_the_frame_term_is_the_cross_entropy_of_the_exported_read_out() -> None:
    torch = pytest.importorskip("torch")
    from echo_agent.training.mask_classifier import segmenter_loss

    size, k = 4 * CELL, 2
    masks = np.zeros((2, size, size), bool)
    masks[1, :CELL, :CELL] = True  # crop 1 holds a lesion in its first cell; crop 0 none
    logits = torch.full((2, 4, 4), -4.0)
    logits[0, 3, 3] = 3.0  # a hot cell where there is no lesion
    logits[1, 0, 0] = 2.0
    pw = torch.tensor(5.0)
    cells = segmenter_loss(logits, masks, pos_weight=pw, top_k=k)
    both = segmenter_loss(logits, masks, pos_weight=pw, top_k=k, frame_loss_weight=0.5)
    s = torch.sigmoid
    p0 = (s(torch.tensor(3.0)) + s(torch.tensor(-4.0))) / 2  # mean of crop 0's two hottest cells
    p1 = (s(torch.tensor(2.0)) + s(torch.tensor(-4.0))) / 2
    frame = -(torch.log(1 - p0) + torch.log(p1)) / 2
    assert float(both - cells) == pytest.approx(0.5 * float(frame), rel=1e-5)


def test_crops_carry_their_masks_through_the_same_crop(tmp_path: Path) -> None:
    crops = prepare_masked_crops([_frame(tmp_path, "a", "hydronephrosis", mask_file=True),
                                  _frame(tmp_path, "n", "normal", mask_file=False)], LABELS, size=64)
    assert [c.label for c in crops] == [1, 0] and crops[0].crop.shape == (64, 64, 3)
    assert crops[0].mask.any() and not crops[1].mask.any()
    # the mask lies on the dark fluid of the crop
    assert crops[0].crop[crops[0].mask].mean() < crops[0].crop[~crops[0].mask].mean() - 40
    with pytest.raises(ValueError, match="neither the normal label"):
        prepare_masked_crops([_frame(tmp_path, "x", "stone", mask_file=False)], LABELS)


def test_box_crops_keep_image_and_mask_aligned(tmp_path: Path) -> None:
    import random

    from echo_agent.training.mask_classifier import _crop_pair, _training_box

    frame = _frame(tmp_path, "a", "hydronephrosis", mask_file=True)
    les, nor = prepare_masked_crops([frame, _frame(tmp_path, "n", "normal", mask_file=False)], LABELS, size=64,
                                    keep_view=True)
    assert les.view is not None and les.boxes and not nor.boxes and nor.view_mask.max() == 0
    rng = random.Random(0)
    for _ in range(10):
        box = _training_box(les, rng)
        assert box.iou(les.boxes[0]) > 0.3  # a jittered lesion box
        crop, mask = _crop_pair(les.view, les.view_mask, box, margin=0.25, size=64)
        assert mask.any() and crop[mask].mean() < crop[~mask].mean() - 30  # the mask still lies on the fluid
        b = _training_box(nor, rng)
        h, w = nor.view.shape[:2]
        assert 0 <= b.x1 < b.x2 <= w and 0 <= b.y1 < b.y2 <= h and 0.1 * min(w, h) < max(b.x2 - b.x1, b.y2 - b.y1)
    plain = prepare_masked_crops([frame], LABELS, size=64)[0]
    assert plain.view is None and np.array_equal(plain.crop, les.crop) and np.array_equal(plain.mask, les.mask)
    with pytest.raises(ValueError, match="crop_prob"):
        MaskClassifierTrainConfig(organ="kidney", labels=LABELS, centers=["toy"], crop_prob=1.5)


def test_set_top_k_refuses_other_classifiers(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from _fakes import tiny_classifier

    from echo_agent.training.mask_classifier import set_top_k

    with pytest.raises(ValueError, match="not a mask-supervised classifier"):
        set_top_k(tiny_classifier(tmp_path / "c.onnx"), 1, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_several_image_labels_can_count_as_the_lesion(tmp_path: Path) -> None:
    imgs = [_frame(tmp_path, "b", "benign", mask_file=False, center="toy"),
            _frame(tmp_path, "m", "malignant", mask_file=False, center="toy"),
            _frame(tmp_path, "n", "normal", mask_file=False, center="toy")]
    crops = prepare_masked_crops(imgs, ["normal", "lesion"], size=64, lesion_labels=["benign", "malignant"])
    assert [c.label for c in crops] == [1, 1, 0] and crops[0].mask.any() and not crops[2].mask.any()
    with pytest.raises(ValueError, match="neither the normal label"):
        prepare_masked_crops(imgs, ["normal", "lesion"], size=64, lesion_labels=["benign"])
    with pytest.raises(ValueError, match="lesion_labels"):
        MaskClassifierTrainConfig(organ="breast", labels=["normal", "lesion"], centers=["busi"], lesion_labels=["normal"])


def test_a_centers_mask_files_are_read_and_joined(tmp_path: Path) -> None:
    """A registered center names its mask files (several per image are joined); an empty mask file
    falls back to the boxes."""
    from PIL import Image

    from echo_agent.eval.datasets import CenterSpec, register_center, unregister_center

    def masks(image: Path) -> list[Path]:
        return [image.with_name(image.stem + f"_lesion{i}.png") for i in (1, 2, 3)]  # the third never exists

    register_center(CenterSpec("toy_masks", "kidney", "toy", lambda root: None, tmp_path / "s.csv", mask_files=masks))
    try:
        im = _frame(tmp_path, "t", "hydronephrosis", mask_file=False, center="toy_masks")
        for i, (y, x) in enumerate(((5, 5), (60, 100)), start=1):
            m = np.zeros((96, 128), np.uint8)
            m[y:y + 10, x:x + 10] = 255
            Image.fromarray(m).save(tmp_path / f"t_lesion{i}.png")
        got = lesion_mask(im, (128, 96))
        assert got.sum() == 200 and got[5, 5] and got[65, 105] and not got[40, 60]  # the files, not the box
        for i in (1, 2):
            Image.fromarray(np.zeros((96, 128), np.uint8)).save(tmp_path / f"t_lesion{i}.png")
        assert lesion_mask(im, (128, 96))[30:50, 40:90].all()
    finally:
        unregister_center("toy_masks")


@pytest.mark.heavy
def test_it_trains_and_exports_as_a_region_classifier(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    from echo_agent.detectors import OnnxRegionClassifier
    from echo_agent.training.mask_classifier import (
        export_mask_classifier,
        lesion_probability,
        train_mask_classifier,
    )

    frames = [_frame(tmp_path, f"f{i}", LABELS[i % 2], mask_file=i % 2 == 1) for i in range(8)]
    crops = prepare_masked_crops(frames, LABELS, size=64)
    cfg = MaskClassifierTrainConfig(organ="kidney", labels=LABELS, centers=["toy"], input_size=64, epochs=1,
                                    batch_size=4, threads=1, pretrained=False)
    model, report = train_mask_classifier(cfg, crops[:6], crops[6:], log=lambda s: None)
    with pytest.raises(ValueError, match="keep_view=True"):  # box crops need the views
        train_mask_classifier(dataclasses.replace(cfg, crop_prob=1.0), crops[:6], crops[6:], log=lambda s: None)
    viewed = prepare_masked_crops(frames, LABELS, size=64, keep_view=True)
    _, r2 = train_mask_classifier(dataclasses.replace(cfg, crop_prob=1.0), viewed[:6], viewed[6:], log=lambda s: None)
    assert r2["epochs"][0]["loss"] > 0
    _, r3 = train_mask_classifier(dataclasses.replace(cfg, frame_loss_weight=1.0), crops[:6], crops[6:],
                                  log=lambda s: None)
    assert r3["epochs"][0]["loss"] > 0 and "val_auc" in r3["val"]
    assert report["epochs"] and report["positive_cells"] > 0 and "val_auc" in report["val"]
    path = export_mask_classifier(model, tmp_path / "mask.onnx", cfg, report)
    clf = OnnxRegionClassifier(path)
    assert clf.labels == tuple(LABELS) and clf.info["kind"] == "mask_supervised"
    probs = clf.classify(crops[1].crop, [None, Box(x1=10, y1=10, x2=40, y2=30)])
    assert len(probs) == 2 and all(abs(sum(p.values()) - 1) < 1e-5 for p in probs)
    ref = lesion_probability(model, np.stack([crops[1].crop]), cfg.top_k)[0]
    assert probs[0]["hydronephrosis"] == pytest.approx(ref, abs=1e-3)
    # the same network read out on its single most confident cell
    from echo_agent.training.mask_classifier import set_top_k

    one = OnnxRegionClassifier(set_top_k(path, 1, tmp_path / "mask_top1.onnx"))
    ref1 = lesion_probability(model, np.stack([crops[1].crop]), 1)[0]
    assert one.classify(crops[1].crop, [None])[0]["hydronephrosis"] == pytest.approx(ref1, abs=1e-3)
    assert one.info["config"]["top_k"] == 1 and ref1 >= ref - 1e-6
    with pytest.raises(ValueError, match="top_k must be between"):
        set_top_k(path, 10_000, tmp_path / "x.onnx")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="must not be the input"):
        set_top_k(path, 2, path)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="no training images"):
        train_mask_classifier(cfg, [], crops)
