"""Training the learned fusion from real runs (``tools/train_policy.py`` is a thin CLI over this).

1. :func:`collect_runs` runs the real agent (embedded policy, real tools, the transparent heuristic
   fusion) on manifest images and keeps each run's typed evidence, so the features the fusion is
   trained on are exactly the ones it sees at inference.
2. :func:`fit_fusion` chooses the fusion by grouped cross-validation (groups = patient /
   near-duplicate group / clip, never images) among candidates fixed in advance
   (:func:`default_candidates`): two temperature-calibrated decision rules (the detector-only
   decision and the heuristic fusion's; optionally also Platt-calibrated) and logistic regressions
   over nested feature sets at three L2 strengths. Each candidate's whole procedure (fit +
   temperature, the temperature from an inner grouped CV) is scored on held-out groups;
   :func:`select_candidate` applies the rule written in :data:`SELECTION_RULES` (default ``"simplest"``). The chosen
   candidate is refitted on all images, its temperature fitted on out-of-fold logits, and returned
   as :class:`FusionParams` (plain JSON) carrying the CV table, the rule and n. Below
   ``min_images`` images only the calibrated rules are considered.

Out-of-fold discipline: the images given here must not have been used to train the detector whose
candidates they contain (use the detector's held-out split), or the fusion learns to trust
optimistic scores.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..fusion import (
    CLS_PROB_PREFIX,
    DETECTOR_RULE,
    HEURISTIC_RULE,
    LOGISTIC,
    RULE_CALIBRATIONS,
    FusionParams,
    LearnedFusion,
    fit_logistic,
    fit_rule_platt,
    fit_temperature,
    fusion_features,
    platt_rule_probs,
    rule_log_probs,
    softmax,
    veto_normal,
)
from ..organs import get_organ
from ..schemas import ClinicalContext, parse_evidence


@dataclass
class RunRecord:
    """One image's evidence and truth, as collected for fusion training."""

    key: str
    group: str
    organ: str
    label: str
    width: int
    height: int
    evidence: list[dict[str, Any]]
    clinical: dict[str, Any] | None

    def parsed(self) -> tuple[list[Any], ClinicalContext | None]:
        """The run's evidence as typed objects and its clinical context, as the fusion reads them."""
        clin = ClinicalContext.model_validate(self.clinical) if self.clinical else None
        return [parse_evidence(e) for e in self.evidence], clin

    def features(self) -> dict[str, float]:
        ev, clin = self.parsed()
        return fusion_features(get_organ(self.organ), ev, clin, (self.width, self.height))

    def rule_log_probs(self, kind: str) -> np.ndarray:
        """The log-probabilities of a decision rule (``detector_rule`` / ``heuristic``) on this run."""
        from ..schemas import DetectorReport

        reports = [e for e in map(parse_evidence, self.evidence) if isinstance(e, DetectorReport)]
        return rule_log_probs(get_organ(self.organ), reports, kind)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def load_runs(path: str | Path) -> list[RunRecord]:
    """The runs of a runs cache (one :meth:`RunRecord.to_json` line each; blank lines skipped)."""
    return [RunRecord(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def save_runs(records: Sequence[RunRecord], path: str | Path) -> None:
    """Write runs as a runs cache that :func:`load_runs` reads (the parent folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r.to_json() for r in records) + "\n")


def collect_runs(images: Sequence[Any], *, agent: Any = None, progress: Callable[[int, int], None] | None = None) -> list[RunRecord]:
    """Run the agent on manifest images (``ManifestImage``) and keep evidence + truth."""
    from ..agent import EchoAgent
    from ..config import AgentConfig
    from ..eval.splits import cv_group

    # The heuristic fusion: the runs feed the fusion being fitted, so they must not already use it.
    agent = agent or EchoAgent.from_config(AgentConfig(fusion="heuristic"))
    out: list[RunRecord] = []
    for i, im in enumerate(images):
        state = agent.run_state(im.image, organ=im.organ, context=im.clinical_context)
        ref = state["image"]
        out.append(RunRecord(
            key=im.key, group=cv_group(im), organ=im.organ, label=im.label,
            width=int(ref["width"]), height=int(ref["height"]), evidence=state.get("evidence") or [],
            clinical=state.get("clinical"),
        ))
        if progress is not None:
            progress(i + 1, len(images))
    return out


def _group_folds(groups: Sequence[str], k: int, seed: int) -> list[np.ndarray]:
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    fold_of = {uniq[j]: i % k for i, j in enumerate(order)}
    g = np.array([fold_of[x] for x in groups])
    return [np.where(g == f)[0] for f in range(k)]


# -- candidates ----------------------------------------------------------------------------------------
_GEOMETRY = ("det_top_area", "det_top_taller", "det_top_depth")
#: Nested feature sets of the logistic candidates, simplest first: the ones :func:`default_candidates`
#: compares unless told otherwise.
DEFAULT_FEATURE_SETS = ("detector", "detector+geometry", "classifier", "detector+classifier", "all")
#: The second-look sets with the classifier's probabilities (``clsprob_*``) in place of its
#: log-probabilities (``cls_*``). Opt-in (``default_candidates(feature_sets=...)``, the tool's
#: ``--feature-sets``): a bounded feature moves less when another center's images make the classifier
#: less sure of everything, where a log-probability of "normal" rising from 0.02 to 0.2 reads as strong
#: evidence of a normal image (docs/experiments/fusion_prob_features/).
PROB_FEATURE_SETS = ("classifier_prob", "detector+classifier_prob")
#: Every feature set :func:`feature_subset` and :class:`Candidate` accept.
FEATURE_SETS = DEFAULT_FEATURE_SETS + PROB_FEATURE_SETS


def feature_subset(names: Sequence[str], which: str) -> list[str]:
    """The names of ``names`` that belong to a feature set of :data:`FEATURE_SETS`.

    ``detector``: detector scores, count, TTA flag; ``detector+geometry``: plus the top candidate's
    size, taller-than-wide ratio and depth; ``classifier``: the second-look classifier's
    log-probabilities (whole image, top candidate) alone; ``detector+classifier``: detector,
    geometry and classifier; ``all``: plus descriptors and clinical context. ``classifier_prob`` and
    ``detector+classifier_prob``: as without the suffix, with the classifier's probabilities instead
    of its log-probabilities (:data:`PROB_FEATURE_SETS`).
    """
    if which not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {which!r}; expected one of {', '.join(FEATURE_SETS)}")
    if which == "all":
        return [n for n in names if not n.startswith(CLS_PROB_PREFIX)]
    prob = which in PROB_FEATURE_SETS
    which = which.removesuffix("_prob")
    cls = [n for n in names if n == "cls_present" or n.startswith(CLS_PROB_PREFIX if prob else "cls_")]
    if which == "classifier":
        return [n for n in names if n in cls or n.startswith("bias_")]
    keep = [n for n in names if (n.startswith("det_") or n.startswith("bias_")) and n not in _GEOMETRY]
    if which in ("detector+geometry", "detector+classifier"):
        keep += [n for n in names if n in _GEOMETRY]
    if which == "detector+classifier":
        keep += cls
    return [n for n in names if n in keep]


@dataclass(frozen=True)
class Candidate:
    """One fusion the selection may choose: a calibrated rule or a logistic model."""

    kind: str  # DETECTOR_RULE, HEURISTIC_RULE or LOGISTIC
    features: str | None = None  # a FEATURE_SETS entry for LOGISTIC
    l2: float | None = None
    balanced: bool = False  # LOGISTIC: classes weighted equally in the fit
    calibration: str = "temperature"  # rules: "temperature" or "platt" (RULE_CALIBRATIONS)

    def __post_init__(self) -> None:
        if self.calibration not in RULE_CALIBRATIONS or (self.kind == LOGISTIC and self.calibration != "temperature"):
            raise ValueError(f"calibration {self.calibration!r} does not go with kind {self.kind!r}")

    @property
    def name(self) -> str:
        if self.kind != LOGISTIC:
            return f"{self.kind}+{self.calibration}"
        return f"logistic[{self.features}] l2={self.l2:g}" + (" balanced" if self.balanced else "")

    @classmethod
    def from_name(cls, name: str) -> Candidate:
        """The candidate a :attr:`name` names: ``"<rule>+<calibration>"`` (``detector_rule+temperature``)
        or ``"logistic[<feature set>] l2=<strength>"`` with an optional ``" balanced"``. Raises
        ``ValueError`` saying what is expected."""
        text = " ".join(str(name).split())
        rules = {c.name: c for c in (cls(k, calibration=cal) for k in (DETECTOR_RULE, HEURISTIC_RULE)
                                     for cal in RULE_CALIBRATIONS)}
        if text in rules:
            return rules[text]
        m = re.fullmatch(r"logistic\[([a-z_+]+)\] l2=([0-9.eE+-]+)( balanced)?", text)
        if m is None or m.group(1) not in FEATURE_SETS:
            raise ValueError(f"unknown fusion candidate {name!r}: give one of {list(rules)} or "
                             f"'logistic[<feature set>] l2=<strength>[ balanced]' with a feature set of {FEATURE_SETS}")
        try:
            l2 = float(m.group(2))
        except ValueError:
            raise ValueError(f"fusion candidate {name!r}: l2={m.group(2)} is not a number") from None
        if not l2 > 0:
            raise ValueError(f"fusion candidate {name!r}: l2 must be positive")
        return cls(LOGISTIC, m.group(1), l2, bool(m.group(3)))


def default_candidates(l2_grid: Sequence[float] = (1.0, 10.0, 100.0),
                       rule_calibrations: Sequence[str] = ("temperature",),
                       feature_sets: Sequence[str] = DEFAULT_FEATURE_SETS) -> list[Candidate]:
    """The candidates compared by :func:`fit_fusion`: the two decision rules with each of
    ``rule_calibrations`` (default: a temperature; add ``"platt"`` for a Platt map of the vote's
    share, :func:`~echo_agent.fusion.platt_rule_probs`), then logistic models over each of
    ``feature_sets`` (default :data:`DEFAULT_FEATURE_SETS`; any of :data:`FEATURE_SETS`) x L2
    strength, fitted with natural and with balanced class weights.

    The Platt map is not a default: it calibrates far better where a temperature cannot (a detector
    whose scores sit near its threshold) but, where its slope is flat, it ranks all votes for a label
    alike, which cost 0.033 malignant AUC on the one center it was checked on
    (docs/experiments/cross_center_agent/)."""
    unknown = sorted(set(rule_calibrations) - set(RULE_CALIBRATIONS))
    if unknown or not rule_calibrations:
        raise ValueError(f"rule_calibrations must be a non-empty subset of {RULE_CALIBRATIONS}, got {tuple(rule_calibrations)}")
    rules = [Candidate(kind, calibration=cal) for kind in (DETECTOR_RULE, HEURISTIC_RULE) for cal in rule_calibrations]
    unknown_sets = sorted(set(feature_sets) - set(FEATURE_SETS))
    if unknown_sets or not feature_sets:
        raise ValueError(f"feature_sets must be a non-empty subset of {FEATURE_SETS}, got {tuple(feature_sets)}")
    return rules + [Candidate(LOGISTIC, fs, float(l2), bal) for fs in feature_sets for bal in (False, True) for l2 in l2_grid]


_GUARD_TEXT = (
    "guard: keep the candidates whose grouped-CV accuracy and balanced accuracy (over the classes "
    "with at least min_class_images images, default 1) are both >= the detector-only rule's "
    "(accuracy alone rewards calling every image the majority class); among them "
    "take the lowest CV log-loss, then"
)
#: How :func:`select_candidate` chooses among the candidates that pass the guard (``selection=``).
SELECTION_RULES: dict[str, str] = {
    "simplest": _GUARD_TEXT + (
        " (one-standard-error rule) the simplest candidate whose CV "
        "log-loss is within one cluster standard error of it (simplest = fewest features, then the "
        "strongest L2, then the lower log-loss)"
    ),
    "calibrated": _GUARD_TEXT + (
        " among the candidates whose CV log-loss is within one cluster standard error of it, the one "
        "with the lowest CV expected calibration error (ties: the simplest, as in 'simplest')"
    ),
}
#: The default rule (``selection="simplest"``).
SELECTION_RULE = SELECTION_RULES["simplest"]
#: The names ``select_candidate`` and ``fit_fusion`` accept as ``selection`` (``--selection`` of the tool).
SELECTION_MODES = tuple(SELECTION_RULES)


@dataclass
class CandidateScore:
    """A candidate's grouped cross-validation scores (out-of-fold, temperature included)."""

    name: str
    kind: str
    features: str | None
    l2: float | None
    balanced: bool
    n_features: int
    cv_log_loss: float
    cv_log_loss_se: float
    cv_accuracy: float
    cv_balanced_accuracy: float
    cv_ece: float
    cv_ece_ci: tuple[float, float] | None = None
    eligible: bool = True
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("cv_log_loss", "cv_log_loss_se", "cv_accuracy", "cv_balanced_accuracy", "cv_ece"):
            d[k] = round(float(d[k]), 4)
        d["cv_ece_ci"] = [round(float(v), 4) for v in self.cv_ece_ci] if self.cv_ece_ci else None
        return d


def _check_selection(selection: str) -> None:
    if selection not in SELECTION_RULES:
        raise ValueError(f"selection must be one of {', '.join(SELECTION_MODES)}, got {selection!r}")


def select_candidate(scores: Sequence[CandidateScore], detector_accuracy: float, detector_balanced_accuracy: float,
                     selection: str = "simplest") -> int:
    """Index of the chosen candidate under ``SELECTION_RULES[selection]`` (marks ``eligible``/``chosen``).

    ``"simplest"`` (default) takes the simplest candidate within one standard error of the lowest
    log-loss; ``"calibrated"`` takes, among the same near-best candidates, the one with the lowest CV
    expected calibration error: for an organ whose probabilities feed decisions (referral, the
    BI-RADS bands) and whose near-best candidates differ mostly in calibration.
    """
    _check_selection(selection)
    for s in scores:
        s.eligible = (s.cv_accuracy >= detector_accuracy - 1e-9
                      and s.cv_balanced_accuracy >= detector_balanced_accuracy - 1e-9)
        s.chosen = False
    pool = [i for i, s in enumerate(scores) if s.eligible]
    if not pool:  # cannot happen when the detector rule is a candidate; fall back to all
        pool = list(range(len(scores)))
    best = min(pool, key=lambda i: scores[i].cv_log_loss)
    bar = scores[best].cv_log_loss + scores[best].cv_log_loss_se
    near = [i for i in pool if scores[i].cv_log_loss <= bar + 1e-12]

    def simplicity(i: int) -> tuple[float, float, float]:
        s = scores[i]
        return (s.n_features, -(s.l2 if s.l2 is not None else math.inf), s.cv_log_loss)

    if selection == "calibrated":
        chosen = min(near, key=lambda i: (scores[i].cv_ece, *simplicity(i)))
    else:
        chosen = min(near, key=simplicity)
    scores[chosen].chosen = True
    return chosen


# -- cross-validation ----------------------------------------------------------------------------------
def _standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = X.mean(0), X.std(0)
    std[std < 1e-6] = 1.0
    return mean, std


def _logistic_logits(X: np.ndarray, y: np.ndarray, k: int, l2: float, tr: np.ndarray, te: np.ndarray,
                     sw: np.ndarray) -> np.ndarray:
    mean, std = _standardise(X[tr])
    W, b = fit_logistic((X[tr] - mean) / std, y[tr], k, l2=l2, sample_weight=sw[tr])
    return ((X[te] - mean) / std) @ W.T + b


def _oof_logits(X: np.ndarray, y: np.ndarray, k: int, l2: float, folds: Sequence[np.ndarray], sw: np.ndarray,
                within: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold logits of the logistic model over ``within`` (default: all rows)."""
    idx = np.arange(len(y)) if within is None else within
    out = np.zeros((len(y), k))
    for te in folds:
        tr = np.setdiff1d(idx, te)
        out[te] = _logistic_logits(X, y, k, l2, tr, te, sw)
    return out[idx]


def _cluster_se(values: np.ndarray, groups: Sequence[str]) -> float:
    """Standard error of the mean of ``values`` when rows of one group are correlated."""
    ids: dict[str, int] = {}
    inv = np.array([ids.setdefault(g, len(ids)) for g in groups])
    n, G = len(values), len(ids)
    if G < 2:
        return float("nan")
    resid = np.bincount(inv, weights=values - values.mean(), minlength=G)
    return float(math.sqrt(G / (G - 1) * (resid**2).sum()) / n)


def ece_with_interval(
    y: np.ndarray, probs: np.ndarray, labels: Sequence[str], groups: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
) -> tuple[float, tuple[float, float] | None]:
    """Top-label ECE (the harness's definition, :func:`echo_agent.eval.metrics.calibration_score`)
    and a 95 % percentile interval from a bootstrap that resamples whole groups.

    Note that ECE is biased upwards on small samples, and so are its bootstrap replicates.
    """
    from ..eval.metrics import ECE_BINS, calibration_score

    truth = [labels[i] for i in y]
    ece = calibration_score(truth, [dict(zip(labels, map(float, p))) for p in probs], labels).ece
    if n_boot <= 0:
        return float(ece), None
    # The same bins as calibration_score: conf in (b/n, (b+1)/n] -> bin b, 0 -> bin 0. Per group and
    # bin, the count and the sum of (hit - confidence); a replicate's ECE is then a weighted sum.
    pred = probs.argmax(1)
    conf = probs[np.arange(len(y)), pred]
    gap = (pred == y).astype(np.float64) - conf
    b = np.searchsorted(np.linspace(0.0, 1.0, ECE_BINS + 1)[1:-1], conf, side="left")
    ids: dict[str, int] = {}
    g = np.array([ids.setdefault(x, len(ids)) for x in groups])
    gap_t = np.zeros((len(ids), ECE_BINS))
    cnt_t = np.zeros((len(ids), ECE_BINS))
    np.add.at(gap_t, (g, b), gap)
    np.add.at(cnt_t, (g, b), 1.0)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=n_boot).astype(np.float64)
    boot = np.abs(w @ gap_t).sum(1) / (w @ cnt_t).sum(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(ece), (float(lo), float(hi))


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray, k: int, classes: Sequence[int] | None = None) -> float:
    """Mean recall over ``classes`` (default: every class present in ``y``)."""
    over = range(k) if classes is None else classes
    rec = [float((pred[y == c] == c).mean()) for c in over if (y == c).any()]
    return float(np.mean(rec))


def guard_classes(y: np.ndarray, k: int, min_class_images: int) -> list[int]:
    """The classes whose recall the guard's balanced accuracy averages: those with at least
    ``min_class_images`` images (a class of three images would decide it alone), or every class
    present when fewer than two reach it."""
    counts = np.bincount(y, minlength=k)
    big = [c for c in range(k) if counts[c] >= min_class_images]
    return big if len(big) >= 2 else [c for c in range(k) if counts[c] > 0]


def cross_validate(
    cand: Candidate, X: np.ndarray, R: Mapping[str, np.ndarray], y: np.ndarray, groups: Sequence[str], k: int,
    *, folds: int, seeds: Sequence[int], sw: np.ndarray,
) -> np.ndarray:
    """Out-of-fold probabilities of the candidate's whole procedure, one array per seed [seeds, n, k].

    Logistic: standardise + fit on the training groups, temperature from an inner grouped CV on the
    training groups. Rules: temperature fitted on the training groups. The held-out groups are never
    seen by either step.
    """
    n_groups = len(set(groups))
    out = np.zeros((len(seeds), len(y), k))
    for r, seed in enumerate(seeds):
        for te in _group_folds(groups, min(folds, n_groups), seed):
            tr = np.setdiff1d(np.arange(len(y)), te)
            if cand.kind == LOGISTIC:
                tr_groups = [groups[i] for i in tr]
                inner = [tr[f] for f in _group_folds(tr_groups, min(folds - 1, len(set(tr_groups))), seed + 1000)]
                inner_logits = _oof_logits(X, y, k, cand.l2 or 1.0, inner, sw, within=tr)
                t = fit_temperature(inner_logits, y[tr])
                out[r, te] = softmax(_logistic_logits(X, y, k, cand.l2 or 1.0, tr, te, sw) / t)
            elif cand.calibration == "platt":
                out[r, te] = platt_rule_probs(R[cand.kind][te], *fit_rule_platt(R[cand.kind][tr], y[tr]))
            else:
                t = fit_temperature(R[cand.kind][tr], y[tr])
                out[r, te] = softmax(R[cand.kind][te] / t)
    return out


@dataclass
class FitData:
    """What a fusion fit reads from one organ's runs: the feature matrix over every feature the runs
    have (``names``), the labels' indices, the groups, the decision rules' log-probabilities and the
    class-balancing weights. Build it with :meth:`from_runs`; :func:`fit_fusion` and any analysis of
    its out-of-fold readings share it."""

    names: list[str]
    X_all: np.ndarray
    y: np.ndarray
    groups: list[str]
    R: dict[str, np.ndarray]
    class_weights: np.ndarray
    k: int

    @classmethod
    def from_runs(cls, records: Sequence[RunRecord], labels: Sequence[str]) -> FitData:
        """The arrays of ``records`` (all of one organ, whose image labels are ``labels``)."""
        feats = [r.features() for r in records]
        names = sorted({n for f in feats for n in f})
        y = np.array([list(labels).index(r.label) for r in records])
        k = len(labels)
        counts = np.bincount(y, minlength=k).astype(float)
        return cls(
            names=names, X_all=np.array([[f.get(n, 0.0) for n in names] for f in feats], dtype=np.float64), y=y,
            groups=[r.group for r in records],
            R={kind: np.array([r.rule_log_probs(kind) for r in records]) for kind in (DETECTOR_RULE, HEURISTIC_RULE)},
            class_weights=(len(y) / (k * np.maximum(counts, 1)))[y], k=k,
        )

    def design(self, cand: Candidate) -> tuple[list[str], np.ndarray]:
        """The candidate's feature names and columns (none for a rule)."""
        subset = feature_subset(self.names, cand.features) if cand.kind == LOGISTIC else []
        X = self.X_all[:, [self.names.index(n) for n in subset]] if subset else np.zeros((len(self.y), 0))
        return subset, X

    def sample_weight(self, cand: Candidate) -> np.ndarray:
        """Per-run weights of the candidate's fit: class-balancing where it is ``balanced``, else ones."""
        return self.class_weights if cand.balanced else np.ones(len(self.y))

    def out_of_fold(self, cand: Candidate, *, folds: int, seeds: Sequence[int]) -> np.ndarray:
        """:func:`cross_validate` of the candidate on these runs: ``[seeds, n, k]`` probabilities."""
        return cross_validate(cand, self.design(cand)[1], self.R, self.y, self.groups, self.k, folds=folds, seeds=seeds,
                              sw=self.sample_weight(cand))


def fit_fusion(
    records: Sequence[RunRecord],
    *,
    organ: str,
    candidates: Sequence[Candidate] | None = None,
    folds: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    seed: int = 0,
    min_images: int = 50,
    min_class_images: int = 1,
    indeterminate_below: float = 0.5,
    n_boot: int = 1000,
    notes: dict[str, Any] | None = None,
    for_detectors: Sequence[str] | None = None,
    for_classifiers: Sequence[str] | None = None,
    normal_veto: str = "auto",
    selection: str = "simplest",
) -> FusionParams:
    """Choose and fit the fusion for one organ (see module docstring).

    Args:
        records: collected runs (:func:`collect_runs`); only ``organ``'s are used.
        candidates: the candidates (default :func:`default_candidates`).
        folds: grouped CV folds (capped by the number of groups); ``seeds``: fold assignments averaged.
        seed: seed of the final model's out-of-fold temperature fit.
        min_images: below this many images only the calibrated rules are considered (a logistic
            fusion fitted on a few dozen images does not transfer); the choice says so in ``warnings``.
        min_class_images: the guard's balanced accuracy averages the recall of the classes with at
            least this many images (:func:`guard_classes`; ``training.selection.guard_classes``).
            Default 1: every class present. A higher value lets a class too small to measure (3
            normal images among 204) stop deciding the guard, but the fusion may then never call
            that class: fitted on BrEaST with 10, it read none of 13 BUSI normal images normal
            (docs/experiments/cross_center_agent/, addendum 5), so it is not the default.
        for_detectors: the detector(s) the fusion is for, when the runs came from other ones:
            cross-fitted detectors, each trained without the images it ran on, stand in for the final
            detector trained on all of them (out-of-fold predictions). Default: the runs' detectors.
            The runs' own detectors are then kept in ``training.runs_detectors``.
        for_classifiers: the same for the second-look classifier (``training.runs_classifiers``).
        normal_veto: ``"auto"`` (default): the chosen fusion gets ``normal_veto``
            (:func:`~echo_agent.fusion.learned.veto_normal`: a normal reading needs the
            detector-only rule's agreement) unless it lowers the chosen fusion's grouped
            out-of-fold accuracy by more than :data:`NORMAL_VETO_MAX_COST`; ``"on"`` / ``"off"``
            force it. A fusion that learned what normal looks like at its centers otherwise reads
            lesions of other centers normal (docs/experiments/normal_veto/). The check is kept in
            ``training.normal_veto``.
        selection: the rule that picks among the candidates (:data:`SELECTION_RULES`): ``"simplest"``
            (default; the one-standard-error rule) or ``"calibrated"`` (the lowest CV ECE among the
            near-best); kept in ``training.selection``.
    """
    _check_selection(selection)
    if normal_veto not in NORMAL_VETO_MODES:
        raise ValueError(f"normal_veto must be one of {', '.join(NORMAL_VETO_MODES)}, got {normal_veto!r}")
    spec = get_organ(organ)
    if for_detectors is not None and not list(for_detectors):
        raise ValueError("for_detectors must name at least one detector")
    recs = [r for r in records if r.organ == organ]
    if len(recs) < 10:
        raise ValueError(f"need at least 10 {organ} runs to fit a fusion, got {len(recs)}")
    labels = list(spec.image_labels)
    data = FitData.from_runs(recs, labels)
    k, y, groups, R = data.k, data.y, data.groups, data.R
    warnings: list[str] = []
    cands = list(candidates or default_candidates())
    if len(recs) < min_images:
        cands = [c for c in cands if c.kind != LOGISTIC] or [Candidate(DETECTOR_RULE)]
        warnings.append(
            f"only {len(recs)} {organ} images (< {min_images}): learned candidates were not considered, "
            f"a calibrated rule is used instead; fit on more held-out images for a learned fusion"
        )
    if not any(c.kind == DETECTOR_RULE for c in cands):
        cands.insert(0, Candidate(DETECTOR_RULE))  # the guard's reference must be a candidate

    det_pred = R[DETECTOR_RULE].argmax(1)
    guard = guard_classes(y, k, min_class_images)
    det_acc, det_bacc = float((det_pred == y).mean()), _balanced_accuracy(y, det_pred, k, guard)
    scores: list[CandidateScore] = []
    oof: dict[str, np.ndarray] = {}
    for c in cands:
        subset = data.design(c)[0]
        P = data.out_of_fold(c, folds=folds, seeds=seeds)
        oof[c.name] = P
        loss = -np.log(np.clip(P[:, np.arange(len(y)), y], 1e-12, None)).mean(0)  # per image, over seeds
        pred = P.argmax(2)
        # ECE and its interval on the first fold assignment (the bootstrap already resamples groups)
        ece, ci = ece_with_interval(y, P[0], labels, groups, n_boot=n_boot)
        scores.append(CandidateScore(
            name=c.name, kind=c.kind, features=c.features, l2=c.l2, balanced=c.balanced, n_features=len(subset),
            cv_log_loss=float(loss.mean()), cv_log_loss_se=_cluster_se(loss, groups),
            cv_accuracy=float((pred == y).mean()),
            cv_balanced_accuracy=float(np.mean([_balanced_accuracy(y, p, k, guard) for p in pred])),
            cv_ece=float(ece), cv_ece_ci=ci,
        ))
    chosen = cands[select_candidate(scores, det_acc, det_bacc, selection)]
    sw = data.sample_weight(chosen)

    # Final fit on all images; temperature from grouped out-of-fold logits.
    fold_idx = _group_folds(groups, min(folds, len(set(groups))), seed)
    rule_platt = None
    if chosen.kind == LOGISTIC:
        subset, X = data.design(chosen)
        mean, std = _standardise(X)
        W, b = fit_logistic((X - mean) / std, y, k, l2=chosen.l2 or 1.0, sample_weight=sw)
        temperature = fit_temperature(_oof_logits(X, y, k, chosen.l2 or 1.0, fold_idx, sw), y)
        weights, bias, mean_l, std_l = W.tolist(), b.tolist(), mean.tolist(), std.tolist()
    else:
        subset, weights, bias, mean_l, std_l = [], [[] for _ in labels], [0.0] * k, [], []
        if chosen.calibration == "platt":
            rule_platt, temperature = list(fit_rule_platt(R[chosen.kind], y)), 1.0
        else:
            temperature = fit_temperature(R[chosen.kind], y)
    detectors = sorted({e.get("detector") for r in recs for e in r.evidence if e.get("kind") == "detections"} - {None})
    if for_detectors is not None:
        notes = {**(notes or {}), "runs_detectors": detectors}
        detectors = sorted(set(for_detectors))
    classifiers = sorted({e.get("classifier") for r in recs for e in r.evidence if e.get("kind") == "classification"} - {None})
    if for_classifiers is not None:
        notes = {**(notes or {}), "runs_classifiers": classifiers}
        classifiers = sorted(set(for_classifiers))
    chosen_score = next(s for s in scores if s.chosen)
    veto = _normal_veto_check(oof[chosen.name], y, labels, spec.normal_label, det_pred, normal_veto)
    P0 = oof[chosen.name][0]
    per_class = {lbl: float((P0.argmax(1)[y == i] == i).mean()) if (y == i).any() else None for i, lbl in enumerate(labels)}
    training = {
        "n": len(y), "n_groups": len(set(groups)), "class_counts": {lbl: int(c) for lbl, c in zip(labels, np.bincount(y, minlength=k))},
        "chosen": chosen.name, "l2": chosen.l2,
        "selection": {
            "mode": selection, "rule": SELECTION_RULES[selection], "detector_only_cv_accuracy": round(det_acc, 4),
            "detector_only_cv_balanced_accuracy": round(det_bacc, 4),
            "guard_classes": [labels[c] for c in guard], "min_class_images": min_class_images,
            "folds": min(folds, len(set(groups))), "cv_seeds": list(seeds), "min_images": min_images,
            "candidates": [s.to_dict() for s in scores],
        },
        "oof_accuracy": round(chosen_score.cv_accuracy, 4), "oof_per_class_recall": per_class,
        "cv_ece": round(chosen_score.cv_ece, 4),
        "cv_ece_ci95": [round(v, 4) for v in chosen_score.cv_ece_ci] if chosen_score.cv_ece_ci else None,
        "seed": seed, "balanced": chosen.balanced, "detectors": detectors, "classifiers": classifiers,
        "normal_veto": veto, "warnings": warnings,
        "date": time.strftime("%Y-%m-%d"), **(notes or {}),
    }
    return FusionParams(
        organ=organ, labels=labels, feature_names=subset, mean=mean_l, std=std_l,
        weights=weights, bias=bias, temperature=temperature,
        indeterminate_below=indeterminate_below, training=training, kind=chosen.kind, rule_platt=rule_platt,
        normal_veto=bool(veto["adopted"]),
    )


#: ``fit_fusion(normal_veto=...)``: decide by the out-of-fold check, or force it on / off.
NORMAL_VETO_MODES = ("auto", "on", "off")
#: The most out-of-fold accuracy ``"auto"`` gives up for the normal veto.
NORMAL_VETO_MAX_COST = 0.01


def _normal_veto_check(P: np.ndarray, y: np.ndarray, labels: Sequence[str], normal_label: str,
                       det_pred: np.ndarray, mode: str) -> dict[str, Any]:
    """The chosen fusion's out-of-fold readings ``P`` [seeds, n, k] with and without the normal veto,
    and whether it is adopted (see ``fit_fusion(normal_veto=...)``)."""
    if normal_label not in labels:
        return {"mode": mode, "adopted": False, "why": f"no {normal_label!r} label"}
    ni = list(labels).index(normal_label)
    found = det_pred != ni
    without, with_ = P.argmax(2), np.stack([veto_normal(p, ni, found) for p in P]).argmax(2)
    lesion, normal = y != ni, y == ni

    def summary(pred: np.ndarray) -> dict[str, float]:
        return {"oof_accuracy": round(float((pred == y).mean()), 4),
                "lesions_read_normal": round(float((pred[:, lesion] == ni).sum(1).mean()), 2),
                "normals_read_normal": round(float((pred[:, normal] == ni).sum(1).mean()), 2)}

    a, b = summary(without), summary(with_)
    cost = a["oof_accuracy"] - b["oof_accuracy"]
    adopted = mode == "on" or (mode == "auto" and cost <= NORMAL_VETO_MAX_COST)
    return {"mode": mode, "adopted": bool(adopted), "max_cost": NORMAL_VETO_MAX_COST, "without": a, "with": b,
            "n_lesions": int(lesion.sum()), "n_normals": int(normal.sum())}


# -- recalibration: the temperature of a fitted fusion, on runs of the models it is used with ---------
#: the fewest runs :func:`recalibrate_temperature` accepts
MIN_RECALIBRATION_RUNS = 20


def _fused_probabilities(params: FusionParams, records: Sequence[RunRecord],
                         parsed: Sequence[tuple[list[Any], ClinicalContext | None]]) -> np.ndarray:
    """The agent's own probabilities (``LearnedFusion.fuse``: temperature, normal veto and all) per run
    (``parsed``: each run's :meth:`RunRecord.parsed`)."""
    spec = get_organ(params.organ)
    fusion = LearnedFusion({params.organ: params})
    out = []
    for r, (ev, clin) in zip(records, parsed, strict=True):
        dx = fusion.fuse(spec, ev, clinical=clin, image_size=(r.width, r.height))
        skipped = [w for w in dx.warnings if w.startswith("learned fusion skipped")]
        if skipped:
            raise ValueError(f"the fusion steps aside on run {r.key}: {skipped[0]}; recalibrate it on runs of the "
                             "models it was fitted for")
        out.append([dx.probabilities.get(lbl, 0.0) for lbl in params.labels])
    return np.asarray(out, dtype=np.float64)


def _nll_acc_ece(P: np.ndarray, y: np.ndarray, labels: Sequence[str], groups: Sequence[str]) -> dict[str, float]:
    nll = float(-np.log(np.clip(P[np.arange(len(y)), y], 1e-12, None)).mean())
    ece, _ = ece_with_interval(y, P, labels, groups, n_boot=0)
    return {"nll": round(nll, 4), "accuracy": round(float((P.argmax(1) == y).mean()), 4), "ece": round(ece, 4)}


def retarget(params: FusionParams, *, detectors: Sequence[str] | None = None,
             classifiers: Sequence[str] | None = None) -> FusionParams:
    """The fusion made for other weights: a detector or classifier retrained with the same recipe
    replaces the one the fusion was fitted for (the fusion otherwise steps aside on its runs).

    Only the names in ``training.detectors`` / ``training.classifiers`` change; the weights stay and
    are then read on the new model's outputs, so refit the temperature on its runs
    (:func:`recalibrate_temperature`) and check the agent on labelled images before using it. The
    names replaced are kept in ``training.retargeted``."""
    if not detectors and not classifiers:
        raise ValueError("retarget needs the new detector(s) or classifier(s)")
    training = dict(params.training)
    moved = dict(training.get("retargeted") or {})
    for key, names in (("detectors", detectors), ("classifiers", classifiers)):
        if names:
            moved[key] = {"from": list(training.get(key) or []), "to": list(names)}
            training[key] = list(names)
    training["retargeted"] = moved
    return replace(params, training=training)


def recalibrate_temperature(
    params: FusionParams, records: Sequence[RunRecord], *, folds: int = 3, seed: int = 0,
    notes: Mapping[str, Any] | None = None,
) -> tuple[FusionParams, dict[str, Any]]:
    """Refit only the temperature of a fitted fusion on labelled runs of the models it is used with
    (a center's own images, or the shipped models' val split when the fusion was fitted on fold
    models' runs). The weights, the features and the decision rules stay; the new temperature
    minimises the negative log-likelihood of the uncalibrated logits (:func:`fit_temperature`).

    The report (also written to ``training.recalibration`` of the returned parameters) has NLL,
    accuracy and ECE of the agent's own probabilities (normal veto included) before and after, and a
    grouped ``folds``-fold estimate: the temperature refitted on the other folds' groups, scored on
    each fold, against the file's temperature on the same folds (``cv``; ``better_in_cv`` when the
    refit's NLL is lower and its ECE not higher). Raises ``ValueError`` for a Platt-mapped rule, too
    few runs, runs of one class, labels the fusion does not know, or runs of other models.
    """
    if params.rule_platt is not None:
        raise ValueError("this fusion is a rule with a Platt map; refit it with tools/train_policy.py instead")
    recs = [r for r in records if r.organ == params.organ]
    if len(recs) < MIN_RECALIBRATION_RUNS:
        raise ValueError(f"{len(recs)} {params.organ} run(s); recalibration needs at least {MIN_RECALIBRATION_RUNS}")
    labels = list(params.labels)
    unknown = sorted({r.label for r in recs} - set(labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not the fusion's {labels}")
    y = np.array([labels.index(r.label) for r in recs])
    if len(set(y.tolist())) < 2:
        raise ValueError("recalibration needs runs of at least two classes")
    spec = get_organ(params.organ)
    parsed = [r.parsed() for r in recs]
    Z = np.stack([params.run_logits(spec, ev, clin, (r.width, r.height))[0] for r, (ev, clin) in zip(recs, parsed)])
    groups = [r.group for r in recs]
    t_new = fit_temperature(Z, y)
    new = replace(params, temperature=t_new)
    # The file's temperature is the same on every fold, so its cross-validated column is ``before``.
    before = _nll_acc_ece(_fused_probabilities(params, recs, parsed), y, labels, groups)
    after = _nll_acc_ece(_fused_probabilities(new, recs, parsed), y, labels, groups)
    P_cv = np.zeros((len(recs), len(labels)))
    fold_t = []
    for test in _group_folds(groups, folds, seed):
        if not len(test):
            continue
        train = np.setdiff1d(np.arange(len(recs)), test)
        t = fit_temperature(Z[train], y[train])
        fold_t.append(round(t, 4))
        P_cv[test] = _fused_probabilities(replace(params, temperature=t), [recs[i] for i in test],
                                          [parsed[i] for i in test])
    cv_cur, cv_new = before, _nll_acc_ece(P_cv, y, labels, groups)
    report = {
        "n": len(recs), "groups": len(set(groups)), "temperature_before": params.temperature, "temperature": t_new,
        "before": before, "after": after,
        "cv": {"folds": folds, "seed": seed, "fold_temperatures": fold_t, "current": cv_cur, "refit": cv_new},
        "better_in_cv": cv_new["nll"] < cv_cur["nll"] and cv_new["ece"] <= cv_cur["ece"],
        **dict(notes or {}),
    }
    new.training = {**params.training, "recalibration": report}
    return new, report
