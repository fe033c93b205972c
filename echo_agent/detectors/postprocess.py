"""Box post-processing shared by every detector backend (pure numpy).

* :func:`letterbox` / :func:`unletterbox_boxes` — the resize-and-pad used by ultralytics' exporter and
  predictor (``LetterBox(auto=False, center=True)``), and its exact inverse for boxes.
* :func:`nms` / :func:`batched_nms` — exact greedy non-maximum suppression, class-agnostic or per class.
* :func:`decode_yolo` — ultralytics YOLOv8/11 detection head output ``(B, 4 + nc, N)`` to boxes;
  :func:`decode_end2end` — NMS-free heads (YOLOv10/26) whose output is ``(B, K, 6)``.
* :func:`weighted_box_fusion` and :func:`tta_merge` — fuse several detection lists (models or
  test-time-augmented views) into one, following Solovyev et al., "Weighted boxes fusion: Ensembling
  boxes from different object detection models", Image and Vision Computing 107 (2021).

All box arrays are ``float`` ``(N, 4)`` pixel ``[x1, y1, x2, y2]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..schemas import Box, Detection

__all__ = [
    "DecodedBoxes",
    "LetterboxInfo",
    "batched_nms",
    "box_iou",
    "decode_end2end",
    "decode_yolo",
    "detections_from_arrays",
    "flip_detections_horizontal",
    "letterbox",
    "letterbox_boxes",
    "letterbox_info",
    "nms",
    "tta_merge",
    "unletterbox_boxes",
    "weighted_box_fusion",
]


# ---------------------------------------------------------------------------------------------
# letterbox
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LetterboxInfo:
    """How an image was letterboxed, enough to map boxes back to it.

    ``ratio`` is the common scale factor; because each resized side is rounded to whole pixels the
    exact per-axis gains are ``new_w / orig_w`` and ``new_h / orig_h`` (what ultralytics'
    ``scale_boxes`` uses too). ``pad_x`` / ``pad_y`` are the left / top borders in pixels.
    """

    ratio: float
    pad_x: int
    pad_y: int
    orig_w: int
    orig_h: int
    new_w: int
    new_h: int
    input_w: int
    input_h: int

    @property
    def gain_x(self) -> float:
        return self.new_w / self.orig_w

    @property
    def gain_y(self) -> float:
        return self.new_h / self.orig_h


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"letterbox size must be positive, got {size!r}")
    return h, w


def letterbox_info(orig_h: int, orig_w: int, size: int | tuple[int, int]) -> LetterboxInfo:
    """The geometry :func:`letterbox` would use for an ``orig_h`` x ``orig_w`` image (no pixels touched)."""
    in_h, in_w = _as_hw(size)
    if orig_h <= 0 or orig_w <= 0:
        raise ValueError(f"image size must be positive, got {orig_w}x{orig_h}")
    r = min(in_h / orig_h, in_w / orig_w)
    new_w = max(round(orig_w * r), 1)
    new_h = max(round(orig_h * r), 1)
    # Same split as ultralytics: the odd pixel of padding goes to the right / bottom.
    pad_x = round((in_w - new_w) / 2 - 0.1)
    pad_y = round((in_h - new_h) / 2 - 0.1)
    return LetterboxInfo(r, pad_x, pad_y, orig_w, orig_h, new_w, new_h, in_w, in_h)


def letterbox(
    image: np.ndarray,
    size: int | tuple[int, int],
    stride: int = 32,
    color: int = 114,
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize ``image`` keeping its aspect ratio and pad it (centred) to ``size`` x ``size``.

    Matches ultralytics' ``LetterBox(new_shape=size, auto=False, center=True)`` pixel for pixel
    (bilinear ``cv2.resize``, constant ``color`` border). ``stride`` is accepted for signature
    compatibility; a square export size is already a multiple of it. ``out`` may be a preallocated
    ``(size, size, C)`` uint8 array to fill (saves one allocation per call).

    >>> img = np.zeros((100, 200, 3), np.uint8)
    >>> padded, info = letterbox(img, 64)
    >>> padded.shape, (info.new_w, info.new_h, info.pad_x, info.pad_y)
    ((64, 64, 3), (64, 32, 0, 16))
    """
    if image.ndim not in (2, 3):
        raise ValueError(f"letterbox expects an HxW or HxWxC array, got shape {image.shape}")
    h, w = image.shape[:2]
    info = letterbox_info(h, w, size)
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if (info.new_w, info.new_h) != (w, h):
        import cv2  # lazy: keeps `import echo_agent.detectors` light

        resized = cv2.resize(image, (info.new_w, info.new_h), interpolation=cv2.INTER_LINEAR)
        if image.ndim == 3 and resized.ndim == 2:  # cv2 drops a trailing channel axis of size 1
            resized = resized[..., None]
    else:
        resized = image
    shape = (info.input_h, info.input_w) + image.shape[2:]
    if out is None:
        out = np.empty(shape, dtype=image.dtype)
    elif out.shape != shape or out.dtype != image.dtype:
        raise ValueError(f"out must be {shape} {image.dtype}, got {out.shape} {out.dtype}")
    out[...] = color
    out[info.pad_y : info.pad_y + info.new_h, info.pad_x : info.pad_x + info.new_w] = resized
    return out, info


def letterbox_boxes(boxes: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map ``(N, 4)`` xyxy boxes from the original image into letterboxed-input pixels (a new array)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] = b[:, [0, 2]] * info.gain_x + info.pad_x
    b[:, [1, 3]] = b[:, [1, 3]] * info.gain_y + info.pad_y
    return b


def unletterbox_boxes(boxes: np.ndarray, info: LetterboxInfo, clip: bool = True) -> np.ndarray:
    """Map ``(N, 4)`` xyxy boxes from letterboxed-input pixels back to the original image (a new array)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] -= info.pad_x
    b[:, [1, 3]] -= info.pad_y
    b[:, [0, 2]] /= info.gain_x
    b[:, [1, 3]] /= info.gain_y
    if clip:
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0.0, float(info.orig_w))
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0.0, float(info.orig_h))
    return b


# ---------------------------------------------------------------------------------------------
# IoU and NMS
# ---------------------------------------------------------------------------------------------
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` xyxy boxes -> ``(N, M)`` (0 where the union is empty)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None
) -> np.ndarray:
    """Exact greedy NMS: indices of kept boxes, highest score first.

    A box is dropped when its IoU with an already kept, higher-scored box is *greater* than
    ``iou_threshold`` (the torchvision / ultralytics convention), so kept boxes overlap pairwise by at
    most ``iou_threshold``. Ties in score keep the lower index first. ``max_keep`` stops after that
    many kept boxes (the result is the first ``max_keep`` of the full result, found faster).

    >>> boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], float)
    >>> nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5).tolist()
    [0, 2]
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"nms got {len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    if len(order) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep: list[int] = []
    limit = len(order) if max_keep is None else max(int(max_keep), 0)
    while order.size and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])
        ih = np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])
        inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    iou_threshold: float,
    max_keep: int | None = None,
) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other.

    Runs :func:`nms` per class (exact, no coordinate-offset rounding) and returns the kept indices
    sorted by descending score; ``max_keep`` returns only the best that many (each class stops early,
    since the overall best ``max_keep`` are among the best ``max_keep`` of every class).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    class_ids = np.asarray(class_ids).reshape(-1)
    if not (len(boxes) == len(scores) == len(class_ids)):
        raise ValueError(
            f"batched_nms got {len(boxes)} boxes, {len(scores)} scores and {len(class_ids)} class ids"
        )
    kept = []
    for c in np.unique(class_ids):
        idx = np.flatnonzero(class_ids == c)
        kept.append(idx[nms(boxes[idx], scores[idx], iou_threshold, max_keep)])
    if not kept:
        return np.zeros(0, dtype=np.int64)
    keep = np.concatenate(kept)
    return keep[np.argsort(-scores[keep], kind="stable")][:max_keep]


# ---------------------------------------------------------------------------------------------
# decoding model outputs
# ---------------------------------------------------------------------------------------------
class DecodedBoxes(NamedTuple):
    """Detections of one image: ``boxes`` (K, 4) xyxy, ``scores`` (K,), ``class_ids`` (K,) int."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray


def _empty_decoded() -> DecodedBoxes:
    return DecodedBoxes(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))


def decode_yolo(
    output: np.ndarray,
    *,
    score_threshold: float = 0.25,
    iou_threshold: float = 0.5,
    max_detections: int = 20,
    num_classes: int | None = None,
    agnostic: bool = False,
    max_nms: int = 30000,
) -> list[DecodedBoxes]:
    """Decode the ultralytics YOLOv8/11 detection head, one :class:`DecodedBoxes` per image.

    ``output`` has shape ``(B, 4 + nc, N)``: for each of ``N`` anchors, ``cx, cy, w, h`` in pixels of
    the letterboxed input, then ``nc`` class scores already passed through a sigmoid. As in
    ultralytics' ``non_max_suppression`` (``multi_label=False``) each anchor keeps its best class,
    anchors scoring *above* ``score_threshold`` survive, at most ``max_nms`` of them go through
    class-aware NMS (class-agnostic with ``agnostic=True``) and the ``max_detections`` best are returned.
    Boxes stay in letterboxed-input pixels; map them back with :func:`unletterbox_boxes`.
    """
    out = np.asarray(output)
    if out.ndim == 2:
        out = out[None]
    if out.ndim != 3 or out.shape[1] < 5:
        raise ValueError(
            f"YOLO output must have shape (batch, 4 + num_classes, anchors), got {tuple(np.shape(output))}"
        )
    if num_classes is not None and out.shape[1] != 4 + num_classes:
        raise ValueError(
            f"YOLO output has {out.shape[1]} rows per anchor but {num_classes} classes need {4 + num_classes}"
        )
    results = []
    for pred in out:  # (4 + nc, N)
        cls_scores = pred[4:]
        best = cls_scores.max(axis=0)
        cand = np.flatnonzero(best > score_threshold)
        if cand.size == 0:
            results.append(_empty_decoded())
            continue
        scores = best[cand].astype(np.float64)
        if cand.size > max_nms:
            top = np.argsort(-scores, kind="stable")[:max_nms]
            cand, scores = cand[top], scores[top]
        class_ids = cls_scores[:, cand].argmax(axis=0).astype(np.int64)
        cx, cy, w, h = (pred[k, cand].astype(np.float64) for k in range(4))
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        if agnostic:
            keep = nms(boxes, scores, iou_threshold, max_detections)
        else:
            keep = batched_nms(boxes, scores, class_ids, iou_threshold, max_detections)
        results.append(DecodedBoxes(boxes[keep], scores[keep], class_ids[keep]))
    return results


def decode_end2end(
    output: np.ndarray, *, score_threshold: float = 0.25, max_detections: int = 20
) -> list[DecodedBoxes]:
    """Decode an NMS-free head (YOLOv10 / YOLO26 export): ``(B, K, 6)`` rows ``x1, y1, x2, y2, score, class``."""
    out = np.asarray(output)
    if out.ndim != 3 or out.shape[2] < 6:
        raise ValueError(
            f"end-to-end YOLO output must have shape (batch, detections, 6), got {tuple(np.shape(output))}"
        )
    results = []
    for pred in out:
        scores = pred[:, 4].astype(np.float64)
        sel = np.flatnonzero(scores > score_threshold)
        sel = sel[np.argsort(-scores[sel], kind="stable")][:max_detections]
        results.append(
            DecodedBoxes(pred[sel, :4].astype(np.float64), scores[sel], pred[sel, 5].astype(np.int64))
        )
    return results


def detections_from_arrays(
    decoded: DecodedBoxes,
    labels: Sequence[str],
    *,
    width: int,
    height: int,
    source: str = "detector",
    min_size: float = 1e-3,
) -> list[Detection]:
    """Turn decoded arrays (already in original-image pixels) into :class:`Detection` objects.

    Boxes are clipped to ``width`` x ``height``; boxes thinner than ``min_size`` pixels after clipping
    are dropped (they have no area inside the image). Scores are clipped to [0, 1].
    """
    dets = []
    for (x1, y1, x2, y2), s, c in zip(decoded.boxes, decoded.scores, decoded.class_ids, strict=True):
        x1, x2 = min(max(float(x1), 0.0), width), min(max(float(x2), 0.0), width)
        y1, y2 = min(max(float(y1), 0.0), height), min(max(float(y2), 0.0), height)
        if x2 - x1 < min_size or y2 - y1 < min_size:
            continue
        ci = int(c)
        label = labels[ci] if 0 <= ci < len(labels) else f"class_{ci}"
        dets.append(
            Detection(
                box=Box(x1=x1, y1=y1, x2=x2, y2=y2),
                label=label,
                score=min(max(float(s), 0.0), 1.0),
                source=source,
            )
        )
    return dets


# ---------------------------------------------------------------------------------------------
# weighted box fusion and test-time augmentation
# ---------------------------------------------------------------------------------------------
def weighted_box_fusion(
    detection_lists: Sequence[Sequence[Detection]],
    iou_thr: float = 0.55,
    skip_thr: float = 0.0,
    weights: Sequence[float] | None = None,
    *,
    source: str = "wbf",
) -> list[Detection]:
    """Fuse the detections of several models (or TTA views) of ONE image into one list.

    Weighted boxes fusion (Solovyev et al., 2021), per label:

    1. Pool every box with score ``>= skip_thr`` from all lists, highest ``weight * score`` first.
    2. Walk the pool; a box joins the cluster whose current fused box overlaps it most, provided that
       IoU is greater than ``iou_thr``; otherwise it starts a new cluster. After each join the fused
       box is recomputed as the confidence-weighted mean of its members' coordinates (each member
       weighing ``weight * score``).
    3. Fused score = ``sum_m weight_m * mean score of model m's boxes in the cluster / sum_m weight_m``.
       With equal weights and one box per model this is the paper's "mean score x T / N"
       (``T`` boxes voted out of ``N`` models), so a box only one of two models found keeps half its score.

    Returns the fused detections sorted by descending score, with ``source`` set and ``id`` empty.

    >>> a = Detection(box=Box(x1=0, y1=0, x2=10, y2=10), label="x", score=0.8)
    >>> b = Detection(box=Box(x1=2, y1=0, x2=12, y2=10), label="x", score=0.4)
    >>> [round(v, 3) for v in weighted_box_fusion([[a], [b]], iou_thr=0.5)[0].box.to_list()]
    [0.667, 0.0, 10.667, 10.0]
    """
    n_models = len(detection_lists)
    if n_models == 0:
        return []
    w = np.ones(n_models) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n_models,):
        raise ValueError(f"weighted_box_fusion got {n_models} detection lists but {w.size} weights")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {w.tolist()}")

    # pool: (label, model index, score, box)
    pool: dict[str, list[tuple[int, float, np.ndarray]]] = {}
    for m, dets in enumerate(detection_lists):
        for d in dets:
            if d.score >= skip_thr:
                pool.setdefault(d.label, []).append((m, float(d.score), np.asarray(d.box.to_list())))

    fused: list[Detection] = []
    for label, items in pool.items():
        items.sort(key=lambda t: -w[t[0]] * t[1])
        members: list[list[tuple[int, float, np.ndarray]]] = []
        centres: list[np.ndarray] = []  # current fused box of each cluster
        for item in items:
            best, best_iou = -1, iou_thr
            if centres:
                ious = box_iou(item[2][None], np.stack(centres))[0]
                j = int(np.argmax(ious))
                if ious[j] > best_iou:
                    best, best_iou = j, float(ious[j])
            if best < 0:
                members.append([item])
                centres.append(item[2].copy())
            else:
                members[best].append(item)
                centres[best] = _fuse_coords(members[best], w)
        for cluster, box in zip(members, centres, strict=True):
            per_model: dict[int, list[float]] = {}
            for m, s, _ in cluster:
                per_model.setdefault(m, []).append(s)
            score = sum(w[m] * float(np.mean(ss)) for m, ss in per_model.items()) / float(w.sum())
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            fused.append(
                Detection(
                    box=Box.from_xyxy(box.tolist()),
                    label=label,
                    score=min(max(score, 0.0), 1.0),
                    source=source,
                )
            )
    fused.sort(key=lambda d: -d.score)
    return fused


def _fuse_coords(cluster: list[tuple[int, float, np.ndarray]], w: np.ndarray) -> np.ndarray:
    coefs = np.array([w[m] * s for m, s, _ in cluster])
    boxes = np.stack([b for _, _, b in cluster])
    if coefs.sum() <= 0:  # all-zero scores: plain mean
        return boxes.mean(axis=0)
    return (coefs[:, None] * boxes).sum(axis=0) / coefs.sum()


def flip_detections_horizontal(detections: Sequence[Detection], width: int) -> list[Detection]:
    """Mirror boxes left-right in an image ``width`` pixels wide (``x -> width - x``)."""
    return [
        d.model_copy(update={"box": Box(x1=width - d.box.x2, y1=d.box.y1, x2=width - d.box.x1, y2=d.box.y2)})
        for d in detections
    ]


def tta_merge(
    original: Sequence[Detection],
    flipped: Sequence[Detection],
    width: int,
    *,
    iou_thr: float = 0.55,
    max_detections: int | None = None,
) -> list[Detection]:
    """Merge detections of an image and of its horizontal mirror (boxes in mirror coordinates).

    The mirror's boxes are flipped back, both lists are fused by :func:`weighted_box_fusion` with
    equal weights, and the result is labelled ``source='tta'``. A lesion both views found keeps the
    mean of its two scores; one only a single view found keeps half its score.
    """
    merged = weighted_box_fusion(
        [list(original), flip_detections_horizontal(flipped, width)], iou_thr=iou_thr, source="tta"
    )
    return merged if max_detections is None else merged[:max_detections]
