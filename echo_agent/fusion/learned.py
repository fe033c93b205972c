"""Learned, calibrated evidence fusion (the reason node's default where trained parameters ship).

Features come only from the typed evidence a run produced (detector candidates, captioner
descriptors, global image descriptors) and the clinical context, so training and inference see
exactly the same thing ("train as you serve"). The model is a multinomial logistic regression over
the organ's image labels with temperature scaling, stored as plain JSON (no pickle) in
``echo_agent/assets/fusion/<organ>.json`` and trained by ``tools/train_policy.py``.

The Diagnosis cites the features that drove the decision (largest contributions to the chosen
label), refines the lesion box (weighted box fusion over all detector calls) and sets
``indeterminate`` when the calibrated top probability is below the organ's threshold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from ..organs import OrganSpec
from ..schemas import (
    ClassificationResult,
    ClinicalContext,
    Detection,
    DetectorReport,
    Diagnosis,
    Evidence,
    EvidenceRef,
    Finding,
)
from .diagnosis import (
    assemble_diagnosis,
    describe_descriptors,
    evidence_conflict,
    presence_conflict,
    second_look_sees_lesion,
    secondary_min_score,
)
from .evidence import (
    RunEvidence,
    class_score,
    lesion_probability,
    region_classification,
    whole_image_classification,
)
from .heuristic import HeuristicFusion

FUSION_VERSION = "1"
#: Model kinds a parameter file may hold: a logistic regression over named features, or one of two
#: parameter-free decision rules whose probabilities are only temperature-calibrated.
LOGISTIC = "logistic"
DETECTOR_RULE = "detector_rule"  # the first detector call's top candidate (the detector-only decision)
HEURISTIC_RULE = "heuristic"  # the last (most refined) detector call's top candidate, as HeuristicFusion
FUSION_KINDS = (LOGISTIC, DETECTOR_RULE, HEURISTIC_RULE)
#: How a rule's probabilities are calibrated: one temperature over its log-probabilities, or a Platt
#: map of its vote's share (:func:`platt_rule_probs`).
RULE_CALIBRATIONS = ("temperature", "platt")
_PALPABLE = ("palpable", "lump", "mass", "nodule felt")


# -- features ------------------------------------------------------------------------------------------
#: Prefix of the second look's features on the probability scale (``clsprob_whole_<label>``,
#: ``clsprob_top_<label>``); ``cls_whole_<label>`` / ``cls_top_<label>`` are the same on the log scale.
CLS_PROB_PREFIX = "clsprob_"
#: Floor of a classifier probability before its log is taken (a feature of at least log(0.005)).
_CLS_FLOOR = 0.005


def _logp(p: float) -> float:
    return math.log(min(max(float(p), _CLS_FLOOR), 1.0))


def _vote_distribution(vote: np.ndarray, p_vote: np.ndarray, k: int) -> np.ndarray:
    """Rows over ``k`` labels where label ``vote`` gets ``p_vote``, kept in ``[1/k + 0.01, 0.999]`` so
    it stays the arg-max, and the other labels share the rest (a decision rule's probabilities)."""
    p_vote = np.clip(np.asarray(p_vote, dtype=np.float64), 1.0 / k + 0.01, 1.0 - 1e-3)
    out = np.repeat(((1.0 - p_vote) / max(k - 1, 1))[:, None], k, axis=1)
    out[np.arange(len(out)), vote] = p_vote
    return out


def rule_log_probs(organ: OrganSpec, reports: Sequence[DetectorReport], kind: str) -> np.ndarray:
    """Log-probabilities of a parameter-free decision rule over ``organ.image_labels``.

    The rule reads one detector call (the first for :data:`DETECTOR_RULE`, the last for
    :data:`HEURISTIC_RULE`): its top candidate's image label gets the candidate's score, the other
    labels share the rest; with no candidate, ``normal`` gets ``1 - threshold``. The voted label always
    stays the arg-max (its share is kept just above ``1/K``), so a temperature changes confidences only.
    """
    labels = list(organ.image_labels)
    k = len(labels)
    if not reports:
        return np.full(k, -math.log(k))
    rep = reports[0] if kind == DETECTOR_RULE else reports[-1]
    dets = sorted(rep.detections, key=lambda d: -d.score)
    if dets:
        label, share = organ.image_label_for(dets[0].label), dets[0].score
    else:
        label, share = organ.normal_label, 1.0 - rep.score_threshold
    return np.log(_vote_distribution(np.array([labels.index(label)]), np.array([share]), k)[0])


#: ``FusionParams.presence_veto``: which second-look readings can overrule a normal reading.
PRESENCE_VETO_MODES = ("off", "whole_image", "top_or_whole")

#: How far below the strongest lesion class a vetoed normal reading's probability is put (relative).
NORMAL_VETO_MARGIN = 0.01


def veto_normal(probs: np.ndarray, normal_index: int, lesion_found: np.ndarray | bool) -> np.ndarray:
    """Probabilities where a *normal* reading the detector contradicts does not stand.

    In every row whose arg-max is ``normal_index`` and whose ``lesion_found`` is true (the first
    detector call has a candidate at its threshold), normal's probability is capped just below the
    strongest other class's (by :data:`NORMAL_VETO_MARGIN` of it) and the row renormalised: that
    class becomes the reading, with a probability of at most 1 / (2 - margin), about one half.
    Other rows are unchanged.

    >>> veto_normal(np.array([0.7, 0.2, 0.1]), 0, True).round(3).tolist()
    [0.398, 0.402, 0.201]
    >>> veto_normal(np.array([0.7, 0.2, 0.1]), 0, False).tolist()
    [0.7, 0.2, 0.1]
    """
    p = np.array(probs, dtype=np.float64, copy=True)
    rows = np.atleast_2d(p)
    hit = (rows.argmax(1) == normal_index) & np.broadcast_to(np.asarray(lesion_found, dtype=bool), rows.shape[:1])
    if hit.any():
        others = np.delete(rows[hit], normal_index, axis=1).max(1)
        rows[hit, normal_index] = others * (1.0 - NORMAL_VETO_MARGIN)
        rows[hit] /= rows[hit].sum(1, keepdims=True)
    return p


def recheck_candidate(reports: Sequence[DetectorReport], min_score: float) -> Detection | None:
    """The strongest candidate at ``min_score`` or above of the whole-image re-checks (test-time
    augmentation, no region) after the first detector report, or None."""
    late = [d for r in reports[1:] if r.tta and r.region is None for d in r.detections if d.score >= min_score]
    return max(late, key=lambda d: d.score, default=None)


def _rule_votes(logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The voted label and the logit of its share, per row of rule log-probabilities."""
    logp = np.atleast_2d(np.asarray(logp, dtype=np.float64))
    vote = logp.argmax(1)
    share = np.clip(np.exp(logp[np.arange(len(vote)), vote]), 1e-6, 1 - 1e-6)
    return vote, np.log(share) - np.log1p(-share)


def platt_rule_probs(logp: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """A decision rule's probabilities with its vote's confidence re-mapped by a Platt curve.

    ``logp`` holds rows of :func:`rule_log_probs` over an organ's image labels, whose first is the
    normal label (:class:`~echo_agent.organs.OrganSpec` guarantees it): a vote for it is the rule's
    "no candidate" vote. Such a vote gets ``sigmoid(c)``; a vote for a lesion label gets
    ``sigmoid(a * logit(share) + b)`` (``a >= 0``: a higher detector score never lowers it). The
    vote is kept above ``1/K`` so it stays the arg-max (the rule's decisions are unchanged); the
    other labels share the rest. Unlike a temperature, the curve can give a low-scored vote a high
    probability when such votes are usually right (a detector whose scores are calibrated to a
    threshold, not to a probability), and judges "nothing found" on its own record.

    >>> p = platt_rule_probs(np.log([[0.3, 0.4, 0.3]]), a=1.0, b=2.0, c=0.0)
    >>> bool(p[0, 1] > 0.8) and bool(np.isclose(p[0, 0], p[0, 2]))
    True
    """
    vote, z = _rule_votes(logp)
    p_vote = 1.0 / (1.0 + np.exp(-np.where(vote == 0, c, a * z + b)))
    return _vote_distribution(vote, p_vote, np.atleast_2d(logp).shape[1])


def _logit_of_rate(hits: np.ndarray) -> float:
    """Logit of a hit rate, shrunk towards 1/2 by half a pseudo-count each way (finite at 0 and 1)."""
    r = (float(hits.sum()) + 0.5) / (len(hits) + 1.0)
    return math.log(r / (1.0 - r))


def fit_rule_platt(logp: np.ndarray, y: np.ndarray, *, l2: float = 1e-2, iters: int = 100) -> tuple[float, float, float]:
    """``(a, b, c)`` of :func:`platt_rule_probs` minimising the log-loss on rule log-probabilities
    ``logp`` with true label indices ``y``.

    ``c``: the logit of how often "no candidate" votes are right (half a pseudo-count each way).
    ``a, b``: a logistic regression of "the lesion vote is right" on the logit of its share (Newton
    steps; ``l2`` keeps it finite when those votes are all right or all wrong); where the best slope
    is negative, ``a = 0`` and ``b`` is the logit of their hit rate (a monotone map).
    """
    vote, z = _rule_votes(logp)
    hit = (vote == np.asarray(y)).astype(np.float64)
    none = vote == 0
    c = _logit_of_rate(hit[none]) if none.any() else 0.0
    z, t = z[~none], hit[~none]
    if not len(t):
        return 0.0, 0.0, c
    X = np.stack([z, np.ones_like(z)], axis=1)
    w = np.zeros(2)
    reg = np.diag([l2, l2])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        step = np.linalg.solve((X * (p * (1 - p))[:, None]).T @ X + reg, X.T @ (p - t) + reg @ w)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    if w[0] < 0:
        return 0.0, _logit_of_rate(t), c
    return float(w[0]), float(w[1]), c


def fusion_features(
    organ: OrganSpec,
    evidence: Sequence[Evidence] | RunEvidence,
    clinical: ClinicalContext | None,
    image_size: tuple[int, int],
) -> dict[str, float]:
    """The numeric features of one run's evidence (names are stable; absent ones are 0)."""
    w, h = image_size
    ev = RunEvidence.of(evidence)
    reports, cands = ev.reports, ev.candidates
    f: dict[str, float] = {"bias_detector_ran": float(bool(reports))}
    f["det_n"] = min(len(cands), 5) / 5.0
    f["det_top"] = cands[0].score if cands else 0.0
    for lbl in organ.detector_labels:
        f[f"det_max_{lbl}"] = max((class_score(d, lbl) for d in cands), default=0.0)
    f["det_tta"] = float(any(r.tta for r in reports))
    if cands:
        top = cands[0]
        f["det_top_area"] = math.sqrt(max(top.box.area, 0.0) / max(w * h, 1))
        f["det_top_taller"] = math.log(max(top.box.height, 1.0) / max(top.box.width, 1.0))
        f["det_top_depth"] = top.box.center[1] / max(h, 1)
        descs = ev.descriptors_of(top)
        f["desc_present"] = float(bool(descs))
        for name, values in organ.descriptor_vocabulary.items():
            d = descs.get(name)
            for v in values:
                f[f"desc_{name}={v}"] = float(d.confidence) if d is not None and d.value == v else 0.0
    # The second look: the region classifier's log-probabilities (``cls_*``) and probabilities
    # (``clsprob_*``) for the whole image and for the top candidate (the whole image's again when
    # there is no candidate or it was not classified). A fusion reads one of the two scales (its
    # feature set, fusion_fit.FEATURE_SETS).
    if ev.classifications:
        whole = ev.whole_image
        top_cls = ev.region_of(cands[0]) if cands else None
        f["cls_present"] = 1.0
        for lbl in organ.image_labels:
            for where, src in (("whole", whole), ("top", top_cls or whole)):
                if src is not None:
                    p = src.probabilities.get(lbl, 0.0)
                    f[f"cls_{where}_{lbl}"] = _logp(p)
                    f[f"{CLS_PROB_PREFIX}{where}_{lbl}"] = float(p)
    # Whole-image statistics (contrast, speckle, burned-in annotations) and "is the age known" are
    # left out on purpose: they identify the acquiring center rather than the lesion, and a fusion
    # trained on them learns center shortcuts that fail elsewhere (measured on held-out folds).
    age = clinical.age if clinical is not None else None
    f["age"] = (age - 50) / 15.0 if age is not None else 0.0
    text = " ".join(x for x in ((clinical.symptoms or ""), (clinical.notes or "")) if x).lower() if clinical else ""
    f["palpable"] = float(any(k in text for k in _PALPABLE))
    return f


# -- model -----------------------------------------------------------------------------------------
@dataclass
class FusionParams:
    """Parameters of one organ's fusion model (JSON-serialisable)."""

    organ: str
    labels: list[str]
    feature_names: list[str]
    mean: list[float]
    std: list[float]
    weights: list[list[float]]  # [n_labels][n_features]
    bias: list[float]
    temperature: float = 1.0
    indeterminate_below: float = 0.5
    version: str = FUSION_VERSION
    training: dict[str, Any] = field(default_factory=dict)
    #: one of :data:`FUSION_KINDS`; the rule kinds have no features and use only ``temperature``
    #: (or ``rule_platt``)
    kind: str = LOGISTIC
    #: rule kinds only: ``[a, b, c]`` of :func:`platt_rule_probs`, used instead of ``temperature``
    rule_platt: list[float] | None = None
    #: a normal reading needs the detector-only rule's agreement (:func:`veto_normal`)
    normal_veto: bool = False
    #: one of :data:`PRESENCE_VETO_MODES`: a normal reading the second look contradicts (lesion
    #: probability >= PRESENCE_CONFLICT_MIN, :func:`~echo_agent.fusion.diagnosis.presence_conflict`)
    #: on the whole image (``"whole_image"``) or on the top candidate or the whole image
    #: (``"top_or_whole"``) does not stand either: capped as :func:`veto_normal` caps it, instead of
    #: only being referred. ``"off"``: referred only
    presence_veto: str = "off"
    #: with :attr:`normal_veto`: when the first look has no candidate, a whole-image re-check (test-time
    #: augmentation, no region) with a candidate at this score or above also stands against a normal
    #: reading. ``None``: only the first look counts
    normal_veto_recheck: float | None = None

    def to_json(self) -> str:
        data = dict(self.__dict__)
        if data["rule_platt"] is None:
            del data["rule_platt"]  # files without it read as before
        if not data["normal_veto"]:
            del data["normal_veto"]  # files without it read as before
        if data["presence_veto"] == "off":
            del data["presence_veto"]
        if data["normal_veto_recheck"] is None:
            del data["normal_veto_recheck"]
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> FusionParams:
        try:
            data = json.loads(text)
            p = cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelLoadError(f"fusion parameters in {source} are not valid: {exc}") from None
        n_f, n_l = len(p.feature_names), len(p.labels)
        if len(p.mean) != n_f or len(p.std) != n_f or len(p.weights) != n_l or any(len(r) != n_f for r in p.weights) or len(p.bias) != n_l:
            raise ModelLoadError(f"fusion parameters in {source} have inconsistent shapes")
        if not (p.temperature > 0):
            raise ModelLoadError(f"fusion parameters in {source}: temperature must be > 0")
        if p.kind not in FUSION_KINDS:
            raise ModelLoadError(f"fusion parameters in {source} have kind {p.kind!r}; expected one of {', '.join(FUSION_KINDS)}")
        if not isinstance(p.normal_veto, bool):
            raise ModelLoadError(f"fusion parameters in {source}: normal_veto must be true or false, got {p.normal_veto!r}")
        if p.normal_veto_recheck is not None and (
                not p.normal_veto or isinstance(p.normal_veto_recheck, bool)
                or not isinstance(p.normal_veto_recheck, (int, float)) or not 0.0 < p.normal_veto_recheck < 1.0):
            raise ModelLoadError(f"fusion parameters in {source}: normal_veto_recheck must be a score in (0, 1) and "
                                 f"needs normal_veto, got {p.normal_veto_recheck!r}")
        if p.presence_veto not in PRESENCE_VETO_MODES:
            raise ModelLoadError(f"fusion parameters in {source}: presence_veto must be one of "
                                 f"{', '.join(PRESENCE_VETO_MODES)}, got {p.presence_veto!r}")
        if p.rule_platt is not None:
            if p.kind == LOGISTIC:
                raise ModelLoadError(f"fusion parameters in {source}: rule_platt only goes with a rule kind, not {p.kind!r}")
            if (not isinstance(p.rule_platt, list) or len(p.rule_platt) != 3
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in p.rule_platt)
                    or p.rule_platt[0] < 0):
                raise ModelLoadError(f"fusion parameters in {source}: rule_platt must be three finite numbers [a, b, c] "
                                     "with a >= 0")
        return p

    @property
    def calibration(self) -> str:
        """``'platt'`` for a rule with :attr:`rule_platt`, else ``'temperature'``."""
        return "platt" if self.rule_platt is not None else "temperature"

    def probabilities(self, z: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from :meth:`run_logits`' output."""
        if self.rule_platt is not None:
            return platt_rule_probs(z, *self.rule_platt)[0]
        return softmax(np.asarray(z) / self.temperature)

    def vector(self, feats: Mapping[str, float]) -> np.ndarray:
        x = np.array([feats.get(n, 0.0) for n in self.feature_names], dtype=np.float64)
        return (x - np.asarray(self.mean)) / np.asarray(self.std)

    def logits(self, feats: Mapping[str, float]) -> np.ndarray:
        return np.asarray(self.weights) @ self.vector(feats) + np.asarray(self.bias)

    def predict_proba(self, feats: Mapping[str, float]) -> np.ndarray:
        return softmax(self.logits(feats) / self.temperature)

    def run_logits(self, organ: OrganSpec, evidence: Sequence[Evidence] | RunEvidence, clinical: ClinicalContext | None,
                   image_size: tuple[int, int]) -> tuple[np.ndarray, dict[str, float]]:
        """Uncalibrated logits of one run's evidence (divide by ``temperature``) and its features."""
        if self.kind == LOGISTIC:
            feats = fusion_features(organ, evidence, clinical, image_size)
            return self.logits(feats), feats
        return rule_log_probs(organ, RunEvidence.of(evidence).reports, self.kind), {}


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def fit_logistic(
    X: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1.0, iters: int = 500, sample_weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (L2 on weights, not bias) fitted by gradient descent with a
    backtracking line search; deterministic. ``X`` must be standardised already."""
    n, d = X.shape
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    sw = sw / sw.mean()
    Y = np.eye(n_classes)[y]
    W = np.zeros((n_classes, d))
    b = np.log((Y * sw[:, None]).sum(0) + 1.0) - np.log(n + n_classes)

    def loss_grad(W: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        P = softmax(X @ W.T + b)
        ll = -(sw * np.log(np.clip((P * Y).sum(1), 1e-12, None))).sum() / n + 0.5 * l2 * (W**2).sum() / n
        G = (P - Y) * sw[:, None] / n
        return ll, G.T @ X + l2 * W / n, G.sum(0)

    step = 1.0
    loss, gW, gb = loss_grad(W, b)
    for _ in range(iters):
        while True:
            W2, b2 = W - step * gW, b - step * gb
            l2_, gW2, gb2 = loss_grad(W2, b2)
            if l2_ <= loss - 1e-4 * step * ((gW**2).sum() + (gb**2).sum()) or step < 1e-8:
                break
            step *= 0.5
        if abs(loss - l2_) < 1e-9:
            W, b, loss = W2, b2, l2_
            break
        W, b, loss, gW, gb = W2, b2, l2_, gW2, gb2
        step *= 1.5
    return W, b


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood (grid + refinement; deterministic)."""
    def nll(t: float) -> float:
        P = softmax(logits / t)
        return float(-np.log(np.clip(P[np.arange(len(y)), y], 1e-12, None)).mean())

    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))
    best = min(grid, key=nll)
    lo, hi = best / 1.12, best * 1.12
    for _ in range(30):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if nll(m1) < nll(m2):
            hi = m2
        else:
            lo = m1
    return float((lo + hi) / 2)


# -- loading -----------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def load_fusion_params(organ: str, path: str | None = None) -> FusionParams | None:
    """The packaged (or given) parameters for an organ, or ``None`` when none ship."""
    if path is None:
        ref = resources.files("echo_agent") / "assets" / "fusion" / f"{organ}.json"
        if not ref.is_file():
            return None
        return FusionParams.from_json(ref.read_text("utf-8"), source=f"package:fusion/{organ}.json")
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"fusion parameters file {p} does not exist")
    return FusionParams.from_json(p.read_text("utf-8"), source=str(p))


# -- the Fusion ------------------------------------------------------------------------------------
_FEATURE_TEXT = {
    "det_top": "strongest detector score",
    "det_n": "number of candidates",
    "det_top_area": "lesion size",
    "det_top_taller": "taller-than-wide geometry",
    "det_top_depth": "lesion depth",
    "age": "patient age",
    "palpable": "palpable finding",
}


def _feature_text(name: str, value: float) -> str:
    if name.startswith(("cls_whole_", "cls_top_", f"{CLS_PROB_PREFIX}whole_", f"{CLS_PROB_PREFIX}top_")):
        scale, rest = (math.exp, name[4:]) if name.startswith("cls_") else (float, name[len(CLS_PROB_PREFIX):])
        where, label = ("whole image", rest[6:]) if rest.startswith("whole_") else ("top candidate", rest[4:])
        p = scale(value)
        return f"second look, {where}: {label} {'likely' if p >= 0.5 else 'unlikely'} (p={p:.2f})"
    if name.startswith("det_max_"):
        return f"{name[8:]} detector score {value:.2f}"
    if name.startswith("desc_") and "=" in name:
        k, v = name[5:].split("=", 1)
        return f"{k.replace('_', ' ')} {v}"
    if name == "age":
        return f"patient age {value * 15 + 50:.0f}"
    if name.startswith("global_"):
        return f"image {name[7:].replace('_', ' ')} {value:g}"
    return f"{_FEATURE_TEXT.get(name, name)} {value:.2f}" if name != "palpable" else "palpable finding"


def _overrule_normal(probs: np.ndarray, normal_index: int, reason: str) -> tuple[np.ndarray, str | None]:
    """``probs`` with normal capped (:func:`veto_normal`) and, when that changes the reading, the
    sentence saying why (``reason``: the evidence that a lesion is there)."""
    capped = veto_normal(probs, normal_index, True)
    if capped.argmax() == probs.argmax():
        return capped, None
    return capped, f"a normal reading (p={probs.max():.2f}) overruled: {reason}"


class LearnedFusion:
    """Calibrated logistic fusion per organ; organs without parameters use :class:`HeuristicFusion`.

    Args:
        params: per-organ parameters (default: the packaged ``assets/fusion/<organ>.json``).
        secondary_min_score: score a lesion other than the leading one needs to be reported (None: the
            organ's ``secondary_finding_min_score``).
        rerank_with_classifier: order the candidates for the findings by detector score x the second
            look's lesion probability (unclassified candidates take the whole image's) instead of by
            detector score alone. Off by default (see docs/experiments/second_look/PREREGISTRATION.md, rule 3).
    """

    name = f"learned-fusion/{FUSION_VERSION}"

    def __init__(self, params: Mapping[str, FusionParams] | None = None, *, secondary_min_score: float | None = None,
                 rerank_with_classifier: bool = False) -> None:
        self._params = dict(params) if params is not None else None
        self.secondary_min_score = secondary_min_score
        self.rerank_with_classifier = rerank_with_classifier
        self._fallback = HeuristicFusion(secondary_min_score=secondary_min_score)

    @staticmethod
    def _ranked(organ: OrganSpec, cands: list[Detection], results: Sequence[ClassificationResult]) -> list[Detection]:
        """Candidates by detector score x second-look lesion probability (stable for ties)."""
        if not results:
            return cands
        whole = whole_image_classification(results)
        default = lesion_probability(organ, whole)
        default = 1.0 if default is None else default

        def support(d: Detection) -> float:
            p = lesion_probability(organ, region_classification(results, d))
            return d.score * (default if p is None else p)

        return sorted(cands, key=lambda d: -support(d))

    def params_for(self, organ: str) -> FusionParams | None:
        if self._params is not None:
            return self._params.get(organ)
        return load_fusion_params(organ)

    def fuse(
        self,
        organ: OrganSpec,
        evidence: Sequence[Evidence],
        *,
        clinical: ClinicalContext | None,
        image_size: tuple[int, int],
    ) -> Diagnosis:
        params = self.params_for(organ.name)
        ev = RunEvidence.of(evidence)
        reports = ev.reports
        if params is None or not reports:
            return self._fallback.fuse(organ, ev, clinical=clinical, image_size=image_size)
        trained_on = params.training.get("detectors") or []
        foreign = sorted({r.detector for r in reports} - set(trained_on)) if trained_on else []
        if foreign:
            # The weights encode one detector's score distribution; another detector's scores
            # would be read on the wrong scale, so the transparent fusion takes over.
            dx = self._fallback.fuse(organ, ev, clinical=clinical, image_size=image_size)
            note = (f"learned fusion skipped: it was trained on detector {', '.join(trained_on)}, "
                    f"this run used {', '.join(foreign)}")
            return dx.model_copy(update={"warnings": [*dx.warnings, note]})
        cls_trained = params.training.get("classifiers") or []
        cls_results = ev.classifications
        cls_used = sorted({c.classifier for c in cls_results})
        uses_cls = params.kind == LOGISTIC and any(n.startswith(("cls_", CLS_PROB_PREFIX)) for n in params.feature_names)
        if uses_cls and (not cls_results or (cls_trained and set(cls_used) - set(cls_trained))):
            # Features of a classifier the fusion was not trained with (or none at all) would be read
            # on the wrong scale or as "absent": the transparent fusion takes over.
            dx = self._fallback.fuse(organ, ev, clinical=clinical, image_size=image_size)
            note = ("learned fusion skipped: it needs the second-look classifier's evidence "
                    f"({', '.join(cls_trained) or 'any'}), this run has {', '.join(cls_used) or 'none'}")
            return dx.model_copy(update={"warnings": [*dx.warnings, note]})
        if list(params.labels) != list(organ.image_labels):
            raise ModelLoadError(
                f"fusion parameters for {organ.name} have labels {params.labels}, the organ has {list(organ.image_labels)}"
            )
        z, feats = params.run_logits(organ, ev, clinical, image_size)
        probs_arr = params.probabilities(z)
        vetoed = None
        ni = params.labels.index(organ.normal_label) if organ.normal_label in params.labels else None
        if params.normal_veto and ni is not None:
            first = max(reports[0].detections, key=lambda d: d.score, default=None)
            if first is not None:
                probs_arr, vetoed = _overrule_normal(
                    probs_arr, ni, f"the detector's first look has a {first.label} candidate at {first.score:.2f}")
            elif params.normal_veto_recheck is not None:
                late = recheck_candidate(reports, params.normal_veto_recheck)
                if late is not None:
                    probs_arr, vetoed = _overrule_normal(
                        probs_arr, ni, f"the detector's re-check has a {late.label} candidate at {late.score:.2f}")
        if params.presence_veto != "off" and ni is not None and cls_results and probs_arr.argmax() == ni:
            cands0 = ev.candidates if params.presence_veto == "top_or_whole" else []
            looked = [r for r in (ev.region_of(cands0[0]) if cands0 else None, ev.whole_image) if r is not None]
            seen = second_look_sees_lesion(organ, looked)
            if seen:
                probs_arr, vetoed = _overrule_normal(probs_arr, ni, seen)
        overruled = f"evidence conflict: {vetoed}" if vetoed else None
        probs = {lbl: float(p) for lbl, p in zip(params.labels, probs_arr)}
        label = max(probs, key=probs.__getitem__)
        k = params.labels.index(label)
        cands = ev.candidates
        if params.kind == LOGISTIC:
            x = params.vector(feats)
            W = np.asarray(params.weights)
            contrib = (W[k] - W.mean(axis=0)) * x
            order = [i for i in np.argsort(-contrib) if contrib[i] > 0.05 and feats.get(params.feature_names[i], 0.0) != 0.0][:3]
            drivers = [_feature_text(params.feature_names[i], feats.get(params.feature_names[i], 0.0)) for i in order]
        else:
            rep = reports[0] if params.kind == DETECTOR_RULE else reports[-1]
            top = max(rep.detections, key=lambda d: d.score, default=None)
            drivers = [f"{top.label} detector score {top.score:.2f}" if top is not None
                       else f"no candidate at threshold {rep.score_threshold:g} in the {'first' if params.kind == DETECTOR_RULE else 'last'} detector call"]

        refs: list[EvidenceRef] = [
            EvidenceRef(kind="detection", ref=r.id, summary=f"{len(r.detections)} candidate(s) at {r.score_threshold:g}"
                        + (" with TTA" if r.tta else "")) for r in reports
        ]
        findings: list[Finding] = []
        if label != organ.normal_label and cands:
            ranked = self._ranked(organ, cands, cls_results) if self.rerank_with_classifier else cands
            top = ranked[0]
            # The fused label overrides a disagreeing detector label: the detector is evidence.
            findings.append(Finding(box=top.box, label=label, score=top.score, detection_ids=[top.id]))
            min_score = secondary_min_score(organ, self.secondary_min_score)
            for d in ranked[1:]:
                # Secondary lesions must stand on their own (the organ's secondary score), and a box
                # on an already reported lesion under the other class label is the same lesion.
                if d.score < min_score or any(d.box.iou(f.box) >= 0.5 for f in findings):
                    continue
                findings.append(Finding(box=d.box, label=organ.image_label_for(d.label), score=d.score, detection_ids=[d.id]))
            refs.insert(0, EvidenceRef(kind="detection", ref=top.id, summary=f"{top.label} {top.score:.2f}"))
        desc_text = ""
        conflict = None
        if cands:
            top_descs = ev.descriptors_of(cands[0])
            conflict = evidence_conflict(organ, label, top_descs)
            desc_text = describe_descriptors(top_descs, list(organ.descriptor_vocabulary) + ["size_mm"])
            if desc_text and ev.contexts:
                refs.append(EvidenceRef(kind="description", ref=ev.contexts[-1].id, summary=desc_text))
        cls_text = ""
        presence = None
        if cls_results:
            whole = ev.whole_image
            top_cls = ev.region_of(cands[0]) if cands else None
            parts = []
            if top_cls is not None:
                parts.append(f"top candidate {top_cls.label} (p={top_cls.probabilities[top_cls.label]:.2f})")
            if whole is not None:
                parts.append(f"whole image {whole.label} (p={whole.probabilities[whole.label]:.2f})")
            cls_text = ", ".join(parts)
            if cls_text:
                refs.append(EvidenceRef(kind="classification", ref=cls_results[-1].id, summary=cls_text))
            presence = presence_conflict(organ, label, [r for r in (top_cls, whole) if r is not None])

        conf = probs[label]
        if findings:
            top = findings[0]
            rationale = f"{label.capitalize()} (p={conf:.2f}): candidate {top.detection_ids[0]} at score {top.score:.2f}"
        elif cands:
            rationale = (f"{label.capitalize()} (p={conf:.2f}): the detector's candidates (top {cands[0].label} "
                         f"{cands[0].score:.2f}) were not confirmed by the fused evidence")
        else:
            rationale = f"{label.capitalize()} (p={conf:.2f}): no lesion candidate in {len(reports)} detector call(s)"
        if drivers:
            rationale += "; driven by " + ", ".join(drivers)
        if vetoed:
            rationale += f"; {vetoed}"
        rationale += "."
        if cls_text:
            rationale += f" Second look: {cls_text}."
        if desc_text:
            rationale += f" Descriptors: {desc_text}."
        # A lesion judged present gets a category from its probability even without a box.
        return assemble_diagnosis(
            organ, ev, label=label, probabilities=probs, findings=findings, refs=refs, rationale=rationale,
            clinical=clinical, lesion_found=label != organ.normal_label, min_confidence=params.indeterminate_below,
            reasoner=self.name, image_size=image_size, conflict=conflict, presence=presence, overruled=overruled,
        )


__all__ = [
    "CLS_PROB_PREFIX",
    "DETECTOR_RULE",
    "FUSION_KINDS",
    "FUSION_VERSION",
    "FusionParams",
    "HEURISTIC_RULE",
    "LOGISTIC",
    "LearnedFusion",
    "NORMAL_VETO_MARGIN",
    "RULE_CALIBRATIONS",
    "fit_logistic",
    "fit_rule_platt",
    "fit_temperature",
    "fusion_features",
    "load_fusion_params",
    "platt_rule_probs",
    "recheck_candidate",
    "rule_log_probs",
    "softmax",
    "veto_normal",
]
