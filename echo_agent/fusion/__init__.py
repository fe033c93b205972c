"""Evidence fusion: the reason node's step from one run's typed evidence to one Diagnosis.

- :class:`LearnedFusion` — the calibrated logistic fusion (or calibrated decision rule) per organ,
  parameters shipped as JSON in ``echo_agent/assets/fusion/``; the default.
- :class:`HeuristicFusion` — the transparent, uncalibrated baseline (and the fallback where no
  parameters ship or a run's evidence does not match them).
- :class:`RunEvidence` — a run's evidence sorted by kind once; :func:`assemble_diagnosis` — the one
  place a fusion's decision becomes a Diagnosis (citations, category, referral, recommendation).

Fitting the learned fusion lives in :mod:`echo_agent.training.fusion_fit` (``tools/train_policy.py``).
Any object with ``name`` and ``fuse(organ, evidence, *, clinical, image_size) -> Diagnosis`` is a
:class:`Fusion`.
"""

from __future__ import annotations

from .diagnosis import (
    CONFLICT_RECOMMENDATION,
    OVERRULED_RECOMMENDATION,
    PRESENCE_CONFLICT_MIN,
    PRESENCE_RECOMMENDATION,
    WEAK_EVIDENCE_RECOMMENDATION,
    Fusion,
    assemble_diagnosis,
    clinical_refs,
    describe_descriptors,
    evidence_conflict,
    knowledge_refs,
    presence_conflict,
    recommendation_for,
    secondary_min_score,
    short_citation,
)
from .evidence import (
    RunEvidence,
    class_score,
    classifications,
    collect,
    lesion_probability,
    merged_candidates,
    region_classification,
    region_descriptors,
    whole_image_classification,
)
from .heuristic import HeuristicFusion
from .learned import (
    CLS_PROB_PREFIX,
    DETECTOR_RULE,
    FUSION_KINDS,
    FUSION_VERSION,
    HEURISTIC_RULE,
    LOGISTIC,
    PRESENCE_VETO_MODES,
    RULE_CALIBRATIONS,
    FusionParams,
    LearnedFusion,
    fit_logistic,
    fit_rule_platt,
    fit_temperature,
    fusion_features,
    load_fusion_params,
    platt_rule_probs,
    recheck_candidate,
    rule_log_probs,
    softmax,
    veto_normal,
)

__all__ = [
    "CONFLICT_RECOMMENDATION",
    "CLS_PROB_PREFIX",
    "DETECTOR_RULE",
    "FUSION_KINDS",
    "FUSION_VERSION",
    "Fusion",
    "FusionParams",
    "HEURISTIC_RULE",
    "HeuristicFusion",
    "LOGISTIC",
    "LearnedFusion",
    "PRESENCE_CONFLICT_MIN",
    "OVERRULED_RECOMMENDATION",
    "PRESENCE_RECOMMENDATION",
    "PRESENCE_VETO_MODES",
    "RULE_CALIBRATIONS",
    "RunEvidence",
    "WEAK_EVIDENCE_RECOMMENDATION",
    "assemble_diagnosis",
    "class_score",
    "classifications",
    "clinical_refs",
    "collect",
    "describe_descriptors",
    "evidence_conflict",
    "fit_logistic",
    "fit_rule_platt",
    "fit_temperature",
    "fusion_features",
    "knowledge_refs",
    "lesion_probability",
    "load_fusion_params",
    "merged_candidates",
    "platt_rule_probs",
    "presence_conflict",
    "recheck_candidate",
    "recommendation_for",
    "region_classification",
    "region_descriptors",
    "rule_log_probs",
    "secondary_min_score",
    "short_citation",
    "softmax",
    "veto_normal",
    "whole_image_classification",
]
