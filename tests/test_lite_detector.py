"""The pretrained-backbone detector (Lite-FCOS): targets, losses, augmentation, export behind OnnxDetector."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("efficientnet_lite_pytorch")

from echo_agent.detectors import OnnxDetector  # noqa: E402
from echo_agent.schemas import Box  # noqa: E402
from echo_agent.training.lite_detector import (  # noqa: E402
    DETECTOR_META_KEY,
    DetectionSample,
    LiteDetectorTrainConfig,
    WeightAverage,
    build_detector,
    build_export_module,
    detection_samples,
    export_onnx,
    fcos_targets,
    giou_loss,
    localization_by_threshold,
    paste_lesion,
    predict_boxes,
    random_crop,
    score_shift_for,
    train_detector,
    training_view,
)
from echo_agent.training.region_classifier import PreparedCase  # noqa: E402


def _points(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from echo_agent.training.lite_detector import STRIDES, _grid

    grid = [_grid(size, s) for s in STRIDES]
    pts = torch.from_numpy(np.concatenate(grid))
    strides = torch.from_numpy(np.concatenate([np.full(len(g), s, np.float32) for g, s in zip(grid, STRIDES, strict=True)]))
    return pts, strides


def test_fcos_targets_put_positives_in_the_box_centre_on_the_right_level() -> None:
    pts, strides = _points(256)
    small = torch.tensor([[20.0, 20.0, 44.0, 44.0]])  # reach <= 32 px: the stride-8 level
    cls_t, reg_t, ctr_t, pos = fcos_targets(pts, strides, small, torch.tensor([1]), 2, input_size=256)
    assert pos.any() and set(strides[pos].tolist()) == {8.0}
    assert cls_t[pos, 1].eq(1).all() and cls_t[pos, 0].eq(0).all() and cls_t[~pos].eq(0).all()
    px = pts[pos]
    assert ((px[:, 0] > 20) & (px[:, 0] < 44) & (px[:, 1] > 20) & (px[:, 1] < 44)).all()
    assert (reg_t[pos] > 0).all() and ((ctr_t[pos] > 0) & (ctr_t[pos] <= 1)).all() and ctr_t[~pos].eq(0).all()
    large = torch.tensor([[10.0, 10.0, 250.0, 240.0]])  # reach > 64 px: the stride-32 level
    _, _, _, pos = fcos_targets(pts, strides, large, torch.tensor([0]), 2, input_size=256)
    assert pos.any() and set(strides[pos].tolist()) == {32.0}
    empty = fcos_targets(pts, strides, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2, input_size=256)
    assert not empty[3].any() and empty[0].sum() == 0


def test_giou_loss_is_zero_for_equal_boxes_and_grows_apart() -> None:
    a = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert float(giou_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(giou_loss(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), a)) > float(giou_loss(torch.tensor([[4.0, 4.0, 4.0, 4.0]]), a))


def test_score_shift_maps_the_val_threshold_onto_the_operating_one() -> None:
    shift = score_shift_for(0.4, 0.25)
    mapped = 1 / (1 + math.exp(-(math.log(0.4 / 0.6) + shift)))
    assert mapped == pytest.approx(0.25)
    assert score_shift_for(0.1, 0.25) > 0 > score_shift_for(0.5, 0.25)


def test_augmented_views_keep_boxes_on_the_lesion() -> None:
    arr = np.full((120, 200, 3), 30, np.uint8)
    arr[40:80, 20:70] = 230  # a bright lesion on the left
    sample = DetectionSample("k", "g", arr, np.array([[20.0, 40.0, 70.0, 80.0]]), np.array([1]))
    rng = random.Random(0)
    for _ in range(20):
        img, boxes, classes = training_view(sample, 96, rng, crop_probability=0.7)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and classes.tolist() == [1]
        x1, y1, x2, y2 = np.round(boxes[0]).astype(int)
        inner = img[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].mean()
        assert inner > 120, "the box must still cover the bright lesion after crop/flip/letterbox"
    _, kept = random_crop(arr, sample.boxes, random.Random(1))
    area = (kept[0, 2] - kept[0, 0]) * (kept[0, 3] - kept[0, 1])
    assert area >= 0.6 * 50 * 40


def test_acquisition_augment_is_opt_in_and_keeps_the_border_and_boxes() -> None:
    arr = np.full((120, 200, 3), 30, np.uint8)
    arr[40:80, 20:70] = 230
    sample = DetectionSample("k", "g", arr, np.array([[20.0, 40.0, 70.0, 80.0]]), np.array([1]))
    # off: the same views as a call that does not know the option (same random stream)
    rng_a, rng_b = random.Random(3), random.Random(3)
    a = [training_view(sample, 96, rng_a, crop_probability=0.5) for _ in range(5)]
    b = [training_view(sample, 96, rng_b, crop_probability=0.5, acquisition_p=0.0) for _ in range(5)]
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    # always on (first view of equal streams: same flip and photometric draws, then the acquisition
    # change): the pixels change, the boxes and the letterbox border (inference grey) do not
    changed = 0
    for seed in range(8):
        on = training_view(sample, 96, random.Random(seed), crop_probability=0.0, acquisition_p=1.0)
        off = training_view(sample, 96, random.Random(seed), crop_probability=0.0)
        assert np.allclose(on[1], off[1])
        assert np.array_equal(on[0][:5], off[0][:5]), "the letterbox border keeps its grey"
        changed += int(not np.array_equal(on[0], off[0]))
    assert changed == 8
    with pytest.raises(ValueError, match="acquisition_augment"):
        LiteDetectorTrainConfig(organ="breast", labels=["lesion"], train_centers=["busi"], val_centers=["busi"],
                                acquisition_augment=1.5).check()


def test_copy_paste_adds_the_donor_lesion_upright_in_the_field_and_is_opt_in() -> None:
    # receiver: a scanned field (grey) on the left, black outside it, one lesion at the top left
    arr = np.zeros((160, 240, 3), np.uint8)
    arr[:, :150] = 90
    boxes, classes = np.array([[10.0, 10.0, 50.0, 40.0]]), np.array([0])
    # donor: a bright lesion with a dark column beneath it (posterior shadowing)
    d_arr = np.full((100, 100, 3), 90, np.uint8)
    d_arr[20:50, 30:70] = 250
    d_arr[50:65, 30:70] = 10
    donor = DetectionSample("d", "g", d_arr, np.array([[30.0, 20.0, 70.0, 50.0]]), np.array([1]))
    pasted = 0
    for seed in range(20):
        out, b, c = paste_lesion(arr, boxes, classes, donor, random.Random(seed))
        if out is arr:  # no place found in its tries: everything unchanged
            assert b is boxes and c is classes
            continue
        pasted += 1
        assert c.tolist() == [0, 1] and b.shape == (2, 4) and np.array_equal(b[0], boxes[0])
        x1, y1, x2, y2 = (int(v) for v in b[1])
        assert max(0, x2 - 150) <= 0.1 * (x2 - x1) + 1, "pasted in the scanned field (at most a tenth outside)"
        assert x2 <= 10 or x1 >= 50 or y2 <= 10 or y1 >= 40, "not over the lesion already there"
        assert 0.75 * 40 - 1 <= x2 - x1 <= 1.25 * 40 + 1 and 0.75 * 30 - 1 <= y2 - y1 <= 1.25 * 30 + 1
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        assert out[cy, cx, 0] > 200, "the lesion's centre is the donor's"
        below = out[y2 + 2 : y2 + 4, cx, 0]
        assert below.size == 0 or below.max() < 90, "the shadow stays beneath the lesion (upright)"
        changed = np.any(out != arr, axis=2)
        changed[y1 : y1 + int(1.5 * (y2 - y1)) + 2, x1:x2] = False  # the patch: lesion and column
        assert not changed.any(), "nothing changes outside the patch"
        assert np.array_equal(arr[:, :150], np.full((160, 150, 3), 90, np.uint8)), "the input is not modified"
    assert pasted >= 12
    # no place in the field for it: unchanged
    tiny = np.zeros((30, 30, 3), np.uint8)
    out, b, c = paste_lesion(tiny, np.zeros((0, 4)), np.zeros(0, np.int64), donor, random.Random(0))
    assert out is tiny and len(b) == 0 and len(c) == 0
    # training_view without a donor draws exactly as before; with one, the view has the extra box
    sample = DetectionSample("k", "g", arr, boxes, classes)
    a = training_view(sample, 96, random.Random(3), crop_probability=0.5)
    b2 = training_view(sample, 96, random.Random(3), crop_probability=0.5, donor=None)
    assert np.array_equal(a[0], b2[0]) and np.array_equal(a[1], b2[1])
    assert len(training_view(sample, 96, random.Random(3), crop_probability=0.0, donor=donor)[2]) == 2
    with pytest.raises(ValueError, match="copy_paste"):
        LiteDetectorTrainConfig(organ="breast", labels=["lesion"], train_centers=["busi"], val_centers=["busi"],
                                copy_paste=-0.1).check()


def test_detection_samples_map_labels_and_downscale() -> None:
    big = np.zeros((400, 800, 3), np.uint8)
    cases = [PreparedCase("a", "g1", big, 2, [Box(x1=100, y1=100, x2=300, y2=200)]),
             PreparedCase("b", "g2", big[:100, :100], 0, [])]
    s = detection_samples(cases, ["normal", "benign", "malignant"], ["benign", "malignant"], max_side=400)
    assert s[0].array.shape[:2] == (200, 400) and s[0].boxes.tolist() == [[50.0, 50.0, 150.0, 100.0]]
    assert s[0].classes.tolist() == [1] and len(s[1].boxes) == 0
    one = detection_samples(cases[:1], ["normal", "benign", "malignant"], ["lesion"], max_side=1000)
    assert one[0].classes.tolist() == [0]


def test_localization_counts_false_positives_on_lesion_free_images() -> None:
    s = [DetectionSample("a", "a", np.zeros((64, 64, 3), np.uint8), np.array([[10.0, 10.0, 30.0, 30.0]]), np.array([0])),
         DetectionSample("b", "b", np.zeros((64, 64, 3), np.uint8), np.zeros((0, 4)), np.zeros(0, np.int64))]
    preds = [(np.array([[10.0, 10.0, 30.0, 30.0]]), np.array([0.9])), (np.array([[1.0, 1.0, 9.0, 9.0]]), np.array([0.8]))]
    m = localization_by_threshold(s, preds, 64, thresholds=(0.5, 0.85, 0.95))
    assert m["0.5"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3)}
    assert m["0.85"]["precision"] == 1.0 and m["0.95"]["recall"] == 0.0


def test_config_is_checked(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("organ: breast\nlabels: [benign]\ntrain_centers: [busi]\nval_centers: [busi]\nwat: 1\n")
    with pytest.raises(ValueError, match="unknown LiteDetectorTrainConfig field"):
        LiteDetectorTrainConfig.from_yaml(p)
    with pytest.raises(ValueError, match="multiple of 32"):
        LiteDetectorTrainConfig("breast", ["benign"], ["busi"], ["busi"], input_size=100).check()


def test_config_overrides_apply_on_top_of_the_file_and_are_checked(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("organ: breast\nlabels: [benign]\ntrain_centers: [busi]\nval_centers: [busi]\ninput_size: 256\n")
    cfg = LiteDetectorTrainConfig.from_yaml(p, ["average_weights_from=0.5", "input_size=320", "train_centers=[busi, x]"])
    assert (cfg.average_weights_from, cfg.input_size, cfg.train_centers) == (0.5, 320, ["busi", "x"])
    assert LiteDetectorTrainConfig.from_yaml(p).average_weights_from == 0.0
    with pytest.raises(ValueError, match=r"average_weights_from must be in \[0, 1\)"):
        LiteDetectorTrainConfig.from_yaml(p, ["average_weights_from=1.5"])
    with pytest.raises(ValueError, match="unknown LiteDetectorTrainConfig field"):
        LiteDetectorTrainConfig.from_yaml(p, ["averge_weights_from=0.5"])
    with pytest.raises(ValueError, match="key=value"):
        LiteDetectorTrainConfig.from_yaml(p, ["average_weights_from"])


def _synthetic(n: int, seed: int) -> list[DetectionSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(20, 60, size=(64, 64, 3), dtype=np.uint8)
        x, y = rng.integers(4, 30, size=2)
        arr[y : y + 24, x : x + 24] = 220
        out.append(DetectionSample(f"s{i}", f"g{i}", arr, np.array([[x, y, x + 24, y + 24]], float), np.array([i % 2])))
    return out


def test_training_run_exports_a_model_that_onnx_detector_loads(tmp_path: Path) -> None:
    cfg = LiteDetectorTrainConfig("breast", ["benign", "malignant"], ["busi"], ["busi"], input_size=64, pretrained=False,
                                  epochs=2, batch_size=4, fpn_channels=16, crop_probability=0.0, threads=1)
    export, report = train_detector(cfg, _synthetic(8, 0), _synthetic(4, 1), log=lambda s: None)
    assert report["best_epoch"] in (1, 2) and len(report["epochs"]) == 2
    assert all(math.isfinite(e["loss"]) for e in report["epochs"])
    assert report["score_shift"] == pytest.approx(score_shift_for(report["val_threshold"], 0.25))
    path = export_onnx(export, tmp_path / "lite.onnx", cfg, report)

    det = OnnxDetector(path)
    assert det.labels == ("benign", "malignant") and det.input_size == 64
    img = _synthetic(1, 2)[0].array
    raw, _ = det.predict_raw([img, img])
    with torch.no_grad():
        ref = export(torch.from_numpy(np.stack([img, img]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)).numpy()
    assert raw.shape == (2, 6, 64 + 16 + 4) and np.allclose(raw, ref, rtol=1e-3, atol=1e-2)  # fp16 weights
    dets = det.detect(img, score_threshold=0.0, max_detections=5)
    assert dets and all(0 <= d.box.x1 < d.box.x2 <= 64 and 0 <= d.score <= 1 for d in dets)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    info = json.loads(props[DETECTOR_META_KEY])
    assert info["architecture"] == "lite-fcos" and info["initial_weights"] == "random"
    assert info["val_threshold"] == report["val_threshold"]


def test_weight_average_is_the_mean_of_the_steps_and_only_averaged_epochs_are_kept() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage()
    seen = []
    for k in range(4):
        with torch.no_grad():
            model[0].weight.fill_(float(k))
        seen.append(model[0].weight.clone())
        avg.update(model)
    state = avg.state_dict(model)
    assert avg.steps == 4 and torch.allclose(state["0.weight"], torch.stack(seen).mean(0))
    assert state["1.num_batches_tracked"].dtype == torch.long, "integer buffers are kept, not averaged"
    assert torch.equal(model[0].weight, seen[-1]), "the model's own weights are untouched"

    cfg = LiteDetectorTrainConfig("breast", ["benign", "malignant"], ["busi"], ["busi"], input_size=64, pretrained=False,
                                  epochs=3, batch_size=4, fpn_channels=16, crop_probability=0.0, threads=1,
                                  average_weights_from=0.5)
    _, report = train_detector(cfg, _synthetic(8, 0), _synthetic(4, 1), log=lambda s: None)
    # 2 steps per epoch, 6 planned: the mean starts at step 3 (in epoch 2), so epoch 1 cannot be kept
    assert "averaged_steps" not in report["epochs"][0]
    assert [e["averaged_steps"] for e in report["epochs"][1:]] == [2, 4]
    assert report["best_epoch"] in (2, 3)
    assert report["weight_average"]["from_step"] == 3
    assert report["weight_average"]["steps_in_kept_mean"] == report["epochs"][report["best_epoch"] - 1]["averaged_steps"]
    with pytest.raises(ValueError, match="average_weights_from"):
        LiteDetectorTrainConfig(organ="breast", labels=["lesion"], train_centers=["busi"], val_centers=["busi"],
                                average_weights_from=1.0).check()


def test_export_module_scores_are_monotone_in_the_shift() -> None:
    model = build_detector(1, pretrained=False, input_size=64, fpn_channels=16).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = build_export_module(model)(x)[0, 4]
        b = build_export_module(model, score_shift=1.0)(x)[0, 4]
    assert torch.all(b > a) and torch.equal(torch.argsort(a), torch.argsort(b))
    assert predict_boxes(build_export_module(model), _synthetic(2, 3), 64, agnostic=True)[0][0].shape[1] == 4


def test_half_precision_weights_halve_the_file_and_keep_the_outputs(tmp_path: Path) -> None:
    import onnxruntime as ort

    cfg = LiteDetectorTrainConfig("breast", ["benign"], ["busi"], ["busi"], input_size=64, pretrained=False, fpn_channels=16)
    export = build_export_module(build_detector(1, pretrained=False, input_size=64, fpn_channels=16)).eval()
    full = export_onnx(export, tmp_path / "f32.onnx", cfg, {}, fp16_weights=False)
    half = export_onnx(export, tmp_path / "f16.onnx", cfg, {})
    assert half.stat().st_size < 0.6 * full.stat().st_size
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0] for p in (full, half))
    assert b.dtype == np.float32 and np.allclose(a, b, rtol=1e-2, atol=1e-2)


def test_training_tool_on_real_images(shared_data: Path, tmp_path: Path) -> None:
    """The CLI end to end on a few real BrEaST images: prepare, train one epoch, export, check ONNX."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "lite.onnx"
    proc = subprocess.run(
        [sys.executable, str(repo / "tools" / "train_lite_detector.py"),
         str(repo / "configs" / "lite_detector" / "breast_breast_lesions_usg_only.yaml"),
         "--limit", "8", "--epochs", "1", "--threads", "1", "--train-split", "train+val", "--output", str(out)],
        capture_output=True, text=True, timeout=600, cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["train_images"] == 8 and report["best_epoch"] == 1 and report["bytes"] == out.stat().st_size
    assert OnnxDetector(out).labels == ("benign", "malignant")
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta[DETECTOR_META_KEY])["trained_on"]["split"] == "train+val"
    bad = subprocess.run([sys.executable, str(repo / "tools" / "train_lite_detector.py"),
                          str(repo / "configs" / "lite_detector" / "breast_busi_only.yaml"), "--fold", "1"],
                         capture_output=True, text=True, timeout=120, cwd=repo)
    assert bad.returncode == 2 and "--fold and --folds go together" in bad.stderr
    typo = subprocess.run([sys.executable, str(repo / "tools" / "train_lite_detector.py"),
                           str(repo / "configs" / "lite_detector" / "breast_busi_only.yaml"), "--set", "copy_pste=0.3"],
                          capture_output=True, text=True, timeout=120, cwd=repo)
    assert typo.returncode == 2 and "unknown LiteDetectorTrainConfig field(s) ['copy_pste']" in typo.stderr
