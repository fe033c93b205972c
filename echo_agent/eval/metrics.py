"""Evaluation metrics: box matching, localization / grounded F1, diagnosis accuracy, AUC, calibration.

Everything here is plain numpy on small typed inputs; scikit-learn (the ``eval`` extra) is imported
lazily, only for the ROC AUC. The exact definitions, with a worked example, are in ``docs/metrics.md``.

One image enters as a :class:`ScoredImage` (truth and one system's prediction); a list of them goes
into :func:`compute_metrics`, which returns a :class:`SystemMetrics` (``.to_dict()`` for JSON)::

    from echo_agent.schemas import Box
    from echo_agent.eval.metrics import PredictedBox, ScoredImage, compute_metrics

    img = ScoredImage(key="a.png", true_label="benign", true_boxes=(Box.from_xyxy([0, 0, 10, 10]),),
                      pred_label="benign",
                      pred_boxes=(PredictedBox(Box.from_xyxy([1, 1, 10, 10]), "benign", 0.9),))
    m = compute_metrics([img], labels=("normal", "benign", "malignant"), positive_label="malignant")
    m.localization.f1  # 1.0
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import MissingExtraError
from ..schemas import Box

#: Number of equal-width confidence bins of the expected calibration error.
ECE_BINS = 15
#: IoU a reported box needs with a ground-truth box to count as a hit.
IOU_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictedBox:
    """One box a system reports, with its image-level label and its score."""

    box: Box
    label: str
    score: float


@dataclass(frozen=True)
class ScoredImage:
    """Ground truth and one system's prediction for one image.

    ``probabilities`` is the system's distribution over the organ's image labels (``None`` when the
    system has none, e.g. the detector-only baseline; calibration is then not computed).
    ``positive_score`` is the number ranked by the AUC (e.g. the probability of ``malignant``).
    ``cluster`` identifies the resampling unit of the bootstrap (patient, clip, near-duplicate group).
    ``indeterminate`` (and its reason) is whether the system referred the image for review instead of
    standing by its label (``None``: the system has no such notion, e.g. the detector-only baseline).
    """

    key: str
    true_label: str
    true_boxes: tuple[Box, ...]
    pred_label: str
    pred_boxes: tuple[PredictedBox, ...] = ()
    probabilities: Mapping[str, float] | None = None
    positive_score: float | None = None
    cluster: str | None = None
    indeterminate: bool | None = None
    indeterminate_reason: str | None = None


# ---------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------
class _Result:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (floats, ints, strings, lists, ``None``)."""
        return _jsonable(asdict(self))  # type: ignore[call-overload]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


@dataclass(frozen=True)
class Match(_Result):
    """The outcome of matching one image's reported boxes to its ground-truth boxes.

    ``pairs`` holds ``(pred_index, gt_index, iou)``; indices refer to the input order.
    """

    pairs: tuple[tuple[int, int, float], ...]
    unmatched_pred: tuple[int, ...]
    unmatched_gt: tuple[int, ...]


@dataclass(frozen=True)
class ConfidenceInterval(_Result):
    """A percentile bootstrap interval."""

    low: float
    high: float
    level: float = 0.95
    n_boot: int = 0
    unit: str = "image"


@dataclass(frozen=True)
class DetectionScore(_Result):
    """TP / FP / FN summed over a dataset, and the precision, recall and F1 they give.

    ``f1`` is ``None`` when there is nothing to score (no ground-truth box and no reported box).
    """

    tp: int
    fp: int
    fn: int
    precision: float | None
    recall: float | None
    f1: float | None
    iou_threshold: float = IOU_THRESHOLD
    n_images: int = 0
    n_skipped_unannotated: int = 0
    ci: ConfidenceInterval | None = None


@dataclass(frozen=True)
class ClassScore(_Result):
    """Per-class accuracy (recall): of the images truly of this class, how many were called it."""

    label: str
    support: int
    correct: int
    predicted: int
    recall: float | None


@dataclass(frozen=True)
class ConfusionMatrix(_Result):
    """Rows are true labels, columns predicted labels, in ``labels`` order."""

    labels: tuple[str, ...]
    matrix: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ClassificationScore(_Result):
    """Image-level diagnosis metrics."""

    n_images: int
    accuracy: float | None
    balanced_accuracy: float | None
    per_class: tuple[ClassScore, ...]
    confusion: ConfusionMatrix
    accuracy_ci: ConfidenceInterval | None = None
    balanced_accuracy_ci: ConfidenceInterval | None = None


@dataclass(frozen=True)
class AUCScore(_Result):
    """ROC AUC of ``positive_label``'s score among images truly ``positive_label`` or ``negative_label``.

    ``value`` is ``None`` (with ``reason``) when the restricted set lacks one of the two classes or
    the system gives no score.
    """

    positive_label: str
    negative_label: str
    value: float | None
    n_positive: int
    n_negative: int
    reason: str | None = None


@dataclass(frozen=True)
class ReliabilityBin(_Result):
    """One confidence bin of the reliability diagram (``lower < conf <= upper``; bin 0 includes 0)."""

    lower: float
    upper: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


@dataclass(frozen=True)
class CalibrationScore(_Result):
    """Expected calibration error, multi-class Brier score, log-loss (mean negative log-likelihood of
    the true label, probabilities floored at 1e-12) and the reliability-diagram bins."""

    n_images: int
    ece: float
    brier: float
    n_bins: int
    bins: tuple[ReliabilityBin, ...]
    log_loss: float = float("nan")


@dataclass(frozen=True)
class ReferralScore(_Result):
    """How the images the system marked indeterminate (referred for review) split.

    ``accuracy_kept`` / ``accuracy_referred``: accuracy on the images it stood by / referred (``None``
    when there are none); ``positive_missed_kept``: images of the positive label the system neither
    labelled positive nor referred, i.e. the misses a reader of its output would not be warned about;
    ``positive_missed_referred``: positive images labelled otherwise but referred. ``by_reason``
    counts referrals by the first word group of their reason (e.g. ``evidence conflict``).
    """

    n_images: int
    n_referred: int
    referred_rate: float
    accuracy_kept: float | None
    accuracy_referred: float | None
    positive_missed_kept: int | None
    positive_missed_referred: int | None
    by_reason: dict[str, int] = field(default_factory=dict)


def referral_score(images: Sequence[ScoredImage], positive_label: str | None) -> ReferralScore | None:
    """The referral counts of a system whose predictions say whether they are indeterminate (else
    ``None``)."""
    if not images or any(i.indeterminate is None for i in images):
        return None
    referred = [i for i in images if i.indeterminate]
    kept = [i for i in images if not i.indeterminate]

    def acc(xs: Sequence[ScoredImage]) -> float | None:
        return sum(i.pred_label == i.true_label for i in xs) / len(xs) if xs else None

    def missed(xs: Sequence[ScoredImage]) -> int | None:
        if positive_label is None:
            return None
        return sum(i.true_label == positive_label and i.pred_label != positive_label for i in xs)

    reasons: dict[str, int] = {}
    for i in referred:
        for part in (i.indeterminate_reason or "unspecified").split("; "):
            # the reason's kind: its words before any ':' and without its numbers
            key = re.sub(r"[0-9.<>=]+", "", part.split(":")[0]).strip()
            reasons[key] = reasons.get(key, 0) + 1
    return ReferralScore(len(images), len(referred), len(referred) / len(images), acc(kept), acc(referred),
                         missed(kept), missed(referred), dict(sorted(reasons.items())))


@dataclass(frozen=True)
class SystemMetrics(_Result):
    """Every metric of one system (detector-only or agent) on one set of images."""

    n_images: int
    labels: tuple[str, ...]
    localization: DetectionScore
    grounded: DetectionScore
    classification: ClassificationScore
    auc: AUCScore | None
    calibration: CalibrationScore | None
    calibration_reason: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    referral: ReferralScore | None = None


# ---------------------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------------------
def match_boxes(
    pred: Sequence[PredictedBox], gt: Sequence[Box], iou_threshold: float = IOU_THRESHOLD
) -> Match:
    """Greedy one-to-one matching of reported boxes to ground-truth boxes.

    Reported boxes are visited by descending score (ties keep their input order); each takes the
    still-unmatched ground-truth box with the highest IoU, provided that IoU is ``>= iou_threshold``
    (IoU ties go to the lower ground-truth index). A ground-truth box is matched at most once, so a
    duplicate box on an already-found lesion stays unmatched (a false positive).
    """
    order = sorted(range(len(pred)), key=lambda i: -float(pred[i].score))  # sorted() is stable
    taken: set[int] = set()
    pairs: list[tuple[int, int, float]] = []
    for i in order:
        best_j, best_iou = -1, -1.0
        for j, g in enumerate(gt):
            if j in taken:
                continue
            iou = pred[i].box.iou(g)
            if iou >= iou_threshold and iou > best_iou:
                best_j, best_iou = j, iou
        if best_j >= 0:
            taken.add(best_j)
            pairs.append((i, best_j, best_iou))
    matched_pred = {p for p, _, _ in pairs}
    return Match(
        pairs=tuple(pairs),
        unmatched_pred=tuple(i for i in range(len(pred)) if i not in matched_pred),
        unmatched_gt=tuple(j for j in range(len(gt)) if j not in taken),
    )


def image_counts(
    image: ScoredImage, *, iou_threshold: float = IOU_THRESHOLD, grounded: bool = False
) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of one image.

    With ``grounded=True`` a matched pair counts as a TP only if the box's label equals the image's
    true label; otherwise it counts as one FP (the box) and one FN (the lesion). Matching itself is the
    same label-blind matching as for localization, so grounded TP <= localization TP always.
    """
    m = match_boxes(image.pred_boxes, image.true_boxes, iou_threshold)
    tp = len(m.pairs)
    if grounded:
        tp = sum(1 for i, _, _ in m.pairs if image.pred_boxes[i].label == image.true_label)
    fp = len(image.pred_boxes) - tp
    fn = len(image.true_boxes) - tp
    return tp, fp, fn


def _prf(tp: int, fp: int, fn: int) -> tuple[float | None, float | None, float | None]:
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    return precision, recall, f1


def _is_unannotated(image: ScoredImage, normal_label: str) -> bool:
    # A lesion label without any box: we do not know where the lesion is, so the image is left out
    # of box scoring rather than turning every correct box on it into a false positive.
    return image.true_label != normal_label and not image.true_boxes


def detection_score(
    images: Sequence[ScoredImage],
    *,
    grounded: bool = False,
    iou_threshold: float = IOU_THRESHOLD,
    normal_label: str = "normal",
) -> DetectionScore:
    """Localization (``grounded=False``) or grounded F1 over a dataset (counts summed, then F1)."""
    tp = fp = fn = skipped = n = 0
    for img in images:
        if _is_unannotated(img, normal_label):
            skipped += 1
            continue
        a, b, c = image_counts(img, iou_threshold=iou_threshold, grounded=grounded)
        tp, fp, fn, n = tp + a, fp + b, fn + c, n + 1
    p, r, f = _prf(tp, fp, fn)
    return DetectionScore(tp, fp, fn, p, r, f, iou_threshold, n, skipped)


# ---------------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------------
def _label_index(labels: Sequence[str], values: Sequence[str], what: str) -> np.ndarray:
    index = {lbl: i for i, lbl in enumerate(labels)}
    out = np.empty(len(values), dtype=np.int64)
    for k, v in enumerate(values):
        if v not in index:
            raise ValueError(f"{what} label {v!r} is not one of {list(labels)}; fix the manifest or the organ's labels")
        out[k] = index[v]
    return out


def confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> ConfusionMatrix:
    """Counts of (true, predicted) label pairs; rows true, columns predicted."""
    t = _label_index(labels, y_true, "true")
    p = _label_index(labels, y_pred, "predicted")
    k = len(labels)
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    return ConfusionMatrix(tuple(labels), tuple(tuple(int(v) for v in row) for row in cm))


def classification_score(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> ClassificationScore:
    """Accuracy, balanced accuracy (mean recall over classes present in ``y_true``), per-class recall."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    cm = confusion_matrix(y_true, y_pred, labels)
    mat = np.asarray(cm.matrix, dtype=np.int64).reshape(len(labels), len(labels))
    n = int(mat.sum())
    support = mat.sum(axis=1)
    correct = np.diag(mat)
    predicted = mat.sum(axis=0)
    per_class = tuple(
        ClassScore(
            label=lbl,
            support=int(support[i]),
            correct=int(correct[i]),
            predicted=int(predicted[i]),
            recall=float(correct[i] / support[i]) if support[i] else None,
        )
        for i, lbl in enumerate(labels)
    )
    recalls = [c.recall for c in per_class if c.recall is not None]
    return ClassificationScore(
        n_images=n,
        accuracy=float(correct.sum() / n) if n else None,
        balanced_accuracy=float(np.mean(recalls)) if recalls else None,
        per_class=per_class,
        confusion=cm,
    )


def auc_score(
    y_true: Sequence[str],
    scores: Sequence[float | None],
    positive_label: str,
    negative_label: str,
) -> AUCScore:
    """ROC AUC (scikit-learn) of ``scores`` for ``positive_label`` vs ``negative_label``.

    Images whose true label is neither are left out (for breast: normal images when scoring malignant
    vs benign). Returns ``value=None`` with a reason when either class is absent or a score is missing.
    """
    keep = [i for i, y in enumerate(y_true) if y in (positive_label, negative_label)]
    n_pos = sum(1 for i in keep if y_true[i] == positive_label)
    n_neg = len(keep) - n_pos
    if n_pos == 0 or n_neg == 0:
        return AUCScore(
            positive_label, negative_label, None, n_pos, n_neg,
            reason=f"needs {positive_label!r} and {negative_label!r} images, got {n_pos} and {n_neg}",
        )
    if any(scores[i] is None for i in keep):
        return AUCScore(
            positive_label, negative_label, None, n_pos, n_neg,
            reason=f"the system gave no {positive_label!r} score for some images",
        )
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError("scikit-learn", "eval", "the ROC AUC") from exc
    y = np.array([1 if y_true[i] == positive_label else 0 for i in keep])
    s = np.array([float(scores[i]) for i in keep])  # type: ignore[arg-type]
    return AUCScore(positive_label, negative_label, float(roc_auc_score(y, s)), n_pos, n_neg)


# ---------------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------------
def calibration_score(
    y_true: Sequence[str],
    probabilities: Sequence[Mapping[str, float]],
    labels: Sequence[str],
    n_bins: int = ECE_BINS,
) -> CalibrationScore:
    """ECE over ``n_bins`` equal-width bins of the top-label confidence, Brier score, reliability bins.

    The predicted label is the argmax of each distribution (first label in ``labels`` order on a tie)
    and its probability is the confidence. Bin ``b`` holds confidences in ``(b/n, (b+1)/n]`` (bin 0
    also holds 0). ECE = sum over bins of ``count/N * |accuracy - mean confidence|``. The Brier score is
    the multi-class one: the mean over images of ``sum_k (p_k - [y == k])^2`` (0 best, 2 worst).
    """
    if len(y_true) != len(probabilities):
        raise ValueError(f"y_true has {len(y_true)} labels but there are {len(probabilities)} distributions")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    t = _label_index(labels, y_true, "true")
    p = np.array([[float(d.get(lbl, 0.0)) for lbl in labels] for d in probabilities], dtype=np.float64)
    p = p.reshape(len(y_true), len(labels))
    n = len(y_true)
    if n == 0:
        return CalibrationScore(0, float("nan"), float("nan"), n_bins, ())
    pred = p.argmax(axis=1)
    conf = p[np.arange(n), pred]
    hit = (pred == t).astype(np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(n), t] = 1.0
    brier = float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    log_loss = float(-np.mean(np.log(np.clip(p[np.arange(n), t], 1e-12, None))))
    # searchsorted(side="left") on the inner edges puts conf in (e_b, e_{b+1}] into bin b; 0 -> bin 0.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    bins: list[ReliabilityBin] = []
    ece = 0.0
    for b in range(n_bins):
        sel = idx == b
        c = int(sel.sum())
        mc = float(conf[sel].mean()) if c else None
        acc = float(hit[sel].mean()) if c else None
        if c:
            ece += c / n * abs(acc - mc)  # type: ignore[operator]
        bins.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), c, mc, acc))
    return CalibrationScore(n, float(ece), brier, n_bins, tuple(bins), log_loss)


# ---------------------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------------------
def _cluster_sums(clusters: Sequence[str], table: np.ndarray) -> np.ndarray:
    """Sum the per-image rows of ``table`` within each cluster (clusters in first-seen order)."""
    ids: dict[str, int] = {}
    inv = np.array([ids.setdefault(c, len(ids)) for c in clusters], dtype=np.int64)
    out = np.zeros((len(ids), table.shape[1]), dtype=np.float64)
    np.add.at(out, inv, table)
    return out


def _bootstrap_weights(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """How many times each cluster is drawn in each of ``n_boot`` resamples (rows sum to n_clusters)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot).astype(np.float64)


def _percentile_ci(values: np.ndarray, level: float, n_boot: int, unit: str) -> ConfidenceInterval | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [a, 1.0 - a])
    return ConfidenceInterval(float(lo), float(hi), level, n_boot, unit)


def bootstrap_intervals(
    images: Sequence[ScoredImage],
    labels: Sequence[str],
    *,
    iou_threshold: float = IOU_THRESHOLD,
    normal_label: str = "normal",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, ConfidenceInterval | None]:
    """Percentile bootstrap intervals for accuracy, balanced accuracy, localization F1 and grounded F1.

    The resampling unit is the image's ``cluster`` (patient, clip or near-duplicate group) where one
    is given, else the image itself: whole clusters are drawn with replacement, so correlated images
    stay together. The seed is fixed, so the intervals are reproducible.
    """
    keys = ("accuracy", "balanced_accuracy", "localization_f1", "grounded_f1")
    if not images or n_boot <= 0:
        return dict.fromkeys(keys)
    k = len(labels)
    t = _label_index(labels, [i.true_label for i in images], "true")
    p = _label_index(labels, [i.pred_label for i in images], "predicted")
    # Per-image table: [correct, per-class support (k), per-class correct (k), loc tp/fp/fn, grd tp/fp/fn]
    table = np.zeros((len(images), 1 + 2 * k + 6), dtype=np.float64)
    table[:, 0] = t == p
    table[np.arange(len(images)), 1 + t] = 1.0
    table[np.arange(len(images)), 1 + k + t] = (t == p).astype(np.float64)
    for r, img in enumerate(images):
        if _is_unannotated(img, normal_label):
            continue
        table[r, 1 + 2 * k : 1 + 2 * k + 3] = image_counts(img, iou_threshold=iou_threshold)
        table[r, 1 + 2 * k + 3 :] = image_counts(img, iou_threshold=iou_threshold, grounded=True)
    with_cluster = any(i.cluster for i in images)
    clusters = [i.cluster or f"image:{i.key}" for i in images]
    sums = _cluster_sums(clusters, table)
    w = _bootstrap_weights(len(sums), n_boot, seed)
    boot = w @ sums  # (n_boot, columns)
    unit = "cluster" if with_cluster else "image"
    with np.errstate(invalid="ignore", divide="ignore"):
        n_img = boot[:, 1 : 1 + k].sum(axis=1)
        acc = boot[:, 0] / n_img
        support = boot[:, 1 : 1 + k]
        recall = np.where(support > 0, boot[:, 1 + k : 1 + 2 * k] / np.where(support > 0, support, 1), np.nan)
        present = (support > 0).sum(axis=1)
        bal = np.where(present > 0, np.nansum(recall, axis=1) / np.maximum(present, 1), np.nan)

        def f1(cols: np.ndarray) -> np.ndarray:
            tp, fp, fn = cols[:, 0], cols[:, 1], cols[:, 2]
            den = 2 * tp + fp + fn
            return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)

        loc = f1(boot[:, 1 + 2 * k : 1 + 2 * k + 3])
        grd = f1(boot[:, 1 + 2 * k + 3 :])
    return {
        "accuracy": _percentile_ci(acc, level, n_boot, unit),
        "balanced_accuracy": _percentile_ci(bal, level, n_boot, unit),
        "localization_f1": _percentile_ci(loc, level, n_boot, unit),
        "grounded_f1": _percentile_ci(grd, level, n_boot, unit),
    }


# ---------------------------------------------------------------------------------------------------
# everything at once
# ---------------------------------------------------------------------------------------------------
def compute_metrics(
    images: Sequence[ScoredImage],
    *,
    labels: Sequence[str],
    positive_label: str | None,
    normal_label: str = "normal",
    negative_label: str | None = None,
    iou_threshold: float = IOU_THRESHOLD,
    n_bins: int = ECE_BINS,
    n_boot: int = 1000,
    seed: int = 0,
) -> SystemMetrics:
    """All metrics of one system on ``images`` (which must all belong to one organ).

    ``negative_label`` is the other class of the AUC pair; by default it is the only other lesion
    label when the organ has two (breast: ``benign``), else ``normal_label`` (kidney: ``normal``).
    """
    labels = tuple(labels)
    if normal_label not in labels:
        raise ValueError(f"normal label {normal_label!r} is not one of {list(labels)}")
    notes: list[str] = []
    y_true = [i.true_label for i in images]
    y_pred = [i.pred_label for i in images]
    loc = detection_score(images, iou_threshold=iou_threshold, normal_label=normal_label)
    grd = detection_score(images, grounded=True, iou_threshold=iou_threshold, normal_label=normal_label)
    cls = classification_score(y_true, y_pred, labels)
    auc = None
    if positive_label is not None:
        neg = negative_label or default_negative_label(labels, positive_label, normal_label)
        auc = auc_score(y_true, [i.positive_score for i in images], positive_label, neg)
    cal, cal_reason = None, None
    if not images:
        cal_reason = "no images"
    elif any(i.probabilities is None for i in images):
        cal_reason = "the system gives no probability distribution over image labels"
    else:
        cal = calibration_score(y_true, [i.probabilities for i in images], labels, n_bins)  # type: ignore[misc]
    cis = bootstrap_intervals(
        images, labels, iou_threshold=iou_threshold, normal_label=normal_label, n_boot=n_boot, seed=seed
    )
    if loc.n_skipped_unannotated:
        notes.append(
            f"{loc.n_skipped_unannotated} image(s) with a lesion label but no box were left out of box scoring"
        )
    loc = replace(loc, ci=cis["localization_f1"])
    grd = replace(grd, ci=cis["grounded_f1"])
    cls = replace(cls, accuracy_ci=cis["accuracy"], balanced_accuracy_ci=cis["balanced_accuracy"])
    return SystemMetrics(len(images), labels, loc, grd, cls, auc, cal, cal_reason, tuple(notes),
                         referral_score(images, positive_label))


@dataclass(frozen=True)
class CategoryAgreement:
    """Agreement of predicted assessment categories (e.g. BI-RADS) with a reader's, on an ordinal scale.

    A reader category that stands for several steps of the scale (BI-RADS "4" for 4A / 4B / 4C, as
    centers that do not subdivide category 4 record it) is scored at that coarser level: any of its
    steps is exact, and within one is counted on the scale with those steps merged (``n_coarse``).
    Reader categories that are on neither scale (BI-RADS 0 or 6, a typing error) are not scored; their
    values and counts are kept in ``unscored`` so a report can say so.
    """

    n: int
    exact: float | None
    within_one: float | None
    order: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]  # rows: reader (``reader_order``), columns: predicted, in ``order``
    n_missing: int  # images with a reader category but no predicted one (scored as disagreement)
    reader_order: tuple[str, ...] = ()  # the confusion's rows: ``order`` plus any coarse reader category seen
    n_coarse: int = 0  # images whose reader category is a coarse one (scored at that level)
    unscored: tuple[tuple[str, int], ...] = ()  # reader categories on no scale, with their counts

    def __post_init__(self) -> None:
        if not self.reader_order:
            object.__setattr__(self, "reader_order", self.order)


_SYSTEM_PREFIX = re.compile(r"^[A-Z]{2}-?RADS[\s:_-]*")


def normalise_category(value: str | None) -> str | None:
    """A reader's or the agent's category in one spelling; empty -> None.

    >>> [normalise_category(v) for v in ("4a", " 5 ", "BI-RADS 4b", "birads:3", "TI-RADS 4 c", "4-A", "")]
    ['4A', '5', '4B', '3', '4C', '4A', None]
    """
    if value is None:
        return None
    v = _SYSTEM_PREFIX.sub("", str(value).strip().upper())
    v = re.sub(r"[\s_-]+", "", v)
    return v or None


def coarse_categories(order: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Coarse categories a reader may use for several adjacent steps of ``order``: a number whose
    lettered steps are on the scale but which is not on it itself (BI-RADS: ``{"4": ("4A", "4B", "4C")}``).

    >>> coarse_categories(["1", "2", "3", "4A", "4B", "4C", "5"])
    {'4': ('4A', '4B', '4C')}
    >>> coarse_categories(["2", "3", "4", "5"])
    {}
    """
    order = [normalise_category(o) or "" for o in order]
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(order):
        m = re.fullmatch(r"(\d+)[A-Z]", c)
        if m and m.group(1) not in order:
            groups.setdefault(m.group(1), []).append(i)
    return {g: tuple(order[i] for i in idx) for g, idx in groups.items()
            if len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1))}


def category_agreement(
    truth: Sequence[str | None], predicted: Sequence[str | None], order: Sequence[str]
) -> CategoryAgreement:
    """Exact and within-one-step agreement over images with a reader category on the scale ``order``.

    ``order`` is the ordinal scale (BI-RADS: 1, 2, 3, 4A, 4B, 4C, 5). A missing or unknown predicted
    category counts as disagreement (``n_missing``). A coarse reader category (BI-RADS "4") is scored at
    its level (see :class:`CategoryAgreement`); one on no scale is left out and listed in ``unscored``.

    >>> a = category_agreement(["4a", "5", "3", None], ["4A", "4C", "1", "2"], ["1", "2", "3", "4A", "4B", "4C", "5"])
    >>> (a.n, round(a.exact, 3), round(a.within_one, 3))
    (3, 0.333, 0.667)
    >>> b = category_agreement(["4", "4", "4", "0"], ["4C", "5", "3", "2"], ["1", "2", "3", "4A", "4B", "4C", "5"])
    >>> (b.n, b.n_coarse, round(b.exact, 3), round(b.within_one, 3), b.unscored)
    (3, 3, 0.333, 1.0, (('0', 1),))
    """
    order = tuple(normalise_category(o) or "" for o in order)
    index = {c: i for i, c in enumerate(order)}
    coarse = coarse_categories(order)
    level: dict[str, int] = {}  # each step's position on the scale with the coarse groups merged
    for c in order:
        parent = next((g for g, kids in coarse.items() if c in kids), None)
        key = parent or c
        if key not in level:
            level[key] = len(set(level.values()))
        level[c] = level[key]
    reader_rows = list(order)
    table = {c: [0] * len(order) for c in order}
    unscored: Counter[str] = Counter()
    n = exact = near = missing = n_coarse = 0
    for t, p in zip(truth, predicted, strict=True):
        tc, pc = normalise_category(t), normalise_category(p)
        if tc is None:
            continue
        if tc not in index and tc not in coarse:
            unscored[tc] += 1
            continue
        n += 1
        n_coarse += tc in coarse
        if pc not in index:
            missing += 1
            continue
        if tc not in table:
            table[tc] = [0] * len(order)
            reader_rows.append(tc)
        table[tc][index[pc]] += 1
        if tc in coarse:
            exact += pc in coarse[tc]
            near += abs(level[tc] - level[pc]) <= 1
        else:
            d = abs(index[tc] - index[pc])
            exact += d == 0
            near += d <= 1
    reader_order = tuple(sorted(reader_rows, key=lambda c: (level[c], c not in coarse, index.get(c, -1))))
    return CategoryAgreement(n, exact / n if n else None, near / n if n else None, order,
                             tuple(tuple(table[c]) for c in reader_order), missing, reader_order, n_coarse,
                             tuple(sorted(unscored.items())))


def default_negative_label(labels: Sequence[str], positive_label: str, normal_label: str) -> str:
    """The AUC's negative class: the other lesion label if there is exactly one, else the normal label."""
    others = [lbl for lbl in labels if lbl not in (positive_label, normal_label)]
    return others[0] if len(others) == 1 else normal_label


__all__ = [
    "CategoryAgreement",
    "ReferralScore",
    "category_agreement",
    "coarse_categories",
    "normalise_category",
    "referral_score",
    "ECE_BINS",
    "IOU_THRESHOLD",
    "AUCScore",
    "CalibrationScore",
    "ClassScore",
    "ClassificationScore",
    "ConfidenceInterval",
    "ConfusionMatrix",
    "DetectionScore",
    "Match",
    "PredictedBox",
    "ReliabilityBin",
    "ScoredImage",
    "SystemMetrics",
    "auc_score",
    "bootstrap_intervals",
    "calibration_score",
    "classification_score",
    "compute_metrics",
    "confusion_matrix",
    "default_negative_label",
    "detection_score",
    "image_counts",
    "match_boxes",
]
