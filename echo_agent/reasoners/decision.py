"""The *decision* answer of :class:`~echo_agent.reasoners.llm_finalizer.LLMFinalizer`.

In the default answer format the model writes the whole Diagnosis: label, probabilities, category,
findings with boxes, rationale. In the decision format (``LLMFinalizer(answer="decision")``) it
writes only what needs judgement -- the label it commits to, the detector candidates its findings
rest on (by id), a rationale and whether to refer -- and the numbers come from the tools: the
probabilities are the calibrated evidence fusion's, the category is the organ's band of that
probability (or the fusion's category head reading), each finding's box and score are those of the
fusion's finding on the candidate it cites first (merged over the detector calls), or else the
candidate's own. A model then never states a probability it cannot calibrate, and a small one
need not copy numbers (the micro policy of ``tools/train_micro_policy.py`` does not: docs/training.md).

A decision that departs from the fusion's label is kept, with the fusion's probabilities beside it,
and referred: the Diagnosis says that the reasoner and the calibrated evidence disagree.

>>> from echo_agent.organs import get_organ
>>> decision_schema(get_organ("breast"))["required"]
['label', 'findings', 'rationale']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..organs import OrganSpec
from ..schemas import Detection, Diagnosis, Finding

#: A decided Diagnosis carries this warning: what came from the model and what from the tools.
DECISION_NOTE = "label, findings and rationale from the LLM reasoner; probabilities and category from the calibrated evidence fusion"
#: The recommendation of a decision that departs from the calibrated evidence.
DISAGREEMENT_RECOMMENDATION = (
    "The reasoner's reading and the calibrated evidence disagree: refer for a sonographer's or radiologist's review."
)
_KEYS = ("label", "findings", "rationale", "indeterminate", "indeterminate_reason", "recommendation")
#: keys a model used to the full Diagnosis may still write; they are ignored (the tools give them)
_IGNORED = ("organ", "probabilities", "category", "category_system", "evidence")


def decision_schema(organ: OrganSpec) -> dict[str, Any]:
    """JSON schema of a decision answer for ``organ`` (constrained decoding, and the prompt)."""
    labels = list(organ.image_labels)
    nullable_str = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    return {
        "title": f"{organ.name}_decision",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "label": {"type": "string", "enum": labels},
            "findings": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "label": {"type": "string", "enum": labels},
                        "detection_ids": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    },
                    "required": ["label", "detection_ids"],
                },
            },
            "rationale": {"type": "string"},
            "indeterminate": {"type": "boolean"},
            "indeterminate_reason": nullable_str,
            "recommendation": nullable_str,
        },
        "required": ["label", "findings", "rationale"],
    }


def decision_from_diagnosis(dx: Diagnosis) -> dict[str, Any]:
    """The decision a Diagnosis amounts to: its label, its findings that cite detector candidates,
    a one-line rationale naming the leading candidate, and its referral flag. The finalizer shows
    the fusion's baseline this way (so keeping it is a copy), and the SFT traces use it as target."""
    findings = [{"label": f.label, "detection_ids": list(f.detection_ids)} for f in dx.findings if f.detection_ids]
    lead = findings[0] if findings else None
    rationale = (f"{dx.label}; strongest finding {lead['label']} at {lead['detection_ids'][0]}." if lead
                 else f"{dx.label}; no finding.")
    return {"label": dx.label, "findings": findings, "rationale": rationale, "indeterminate": bool(dx.indeterminate)}


def complete_decision(data: Mapping[str, Any], organ: OrganSpec, baseline: Diagnosis,
                      candidates: Mapping[str, Detection]) -> Diagnosis:
    """The Diagnosis of a model's decision ``data``, completed from the fusion's ``baseline`` and the
    run's detector ``candidates`` (:func:`echo_agent.schemas.detection_candidates`; see the module doc). Raises ``ValueError`` naming what is wrong:
    an unknown key or label, a finding without a cited candidate or citing one no tool returned, a
    normal reading with findings, an empty rationale."""
    unknown = sorted(set(data) - set(_KEYS) - set(_IGNORED))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; a decision has {list(_KEYS)}")
    labels = list(organ.image_labels)
    label = data.get("label")
    if label not in labels:
        raise ValueError(f"label must be one of {labels}, got {label!r}")
    raw = data.get("findings", [])
    if not isinstance(raw, list):
        raise ValueError("findings must be a list (empty when no lesion is reported)")
    findings: list[Finding] = []
    for i, f in enumerate(raw):
        if not isinstance(f, Mapping):
            raise ValueError(f"findings[{i}] must be an object with label and detection_ids")
        ids = f.get("detection_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(x, str) for x in ids):
            raise ValueError(f"findings[{i}] must cite at least one detector candidate id in detection_ids")
        missing = [x for x in ids if x not in candidates]
        if missing:
            have = ", ".join(sorted(candidates)) or "none"
            raise ValueError(f"findings[{i}] cites {missing}, which no detector call returned (candidates: {have})")
        flabel = f.get("label", label)
        if flabel not in labels or flabel == organ.normal_label:
            raise ValueError(f"findings[{i}].label must be a lesion label of {labels}, got {flabel!r}")
        # the fusion's own finding on that candidate has the box merged over the detector calls
        fused = next((b for b in baseline.findings if b.detection_ids[:1] == ids[:1]), None)
        lead = fused or candidates[ids[0]]
        findings.append(Finding(box=lead.box, label=flabel, score=lead.score, detection_ids=list(ids)))
    if label == organ.normal_label and findings:
        raise ValueError(f"a {label!r} reading reports no findings; give an empty list or a lesion label")
    rationale = data.get("rationale")
    if not isinstance(rationale, str) or not rationale.strip():
        raise ValueError("rationale must be a non-empty string")
    flag = data.get("indeterminate", False)
    if not isinstance(flag, bool):
        raise ValueError(f"indeterminate must be true or false, got {flag!r}")

    probs = dict(baseline.probabilities)
    lesion = label != organ.normal_label or bool(findings)
    base_lesion = baseline.label != organ.normal_label or bool(baseline.findings)
    if organ.category_from_probability:
        category = organ.category_for(probs.get(organ.positive_label), lesion_found=lesion)
    elif lesion == base_lesion:
        category = baseline.category
    else:
        category = None if lesion else organ.no_lesion_category
    disagree = label != baseline.label
    reasons = [str(data["indeterminate_reason"])] if flag and data.get("indeterminate_reason") else []
    if baseline.indeterminate and baseline.indeterminate_reason and not disagree:
        reasons.append(baseline.indeterminate_reason)  # the calibrated evidence's referral stands
    if flag and not reasons:
        reasons.append("the reasoner could not commit")
    if disagree:
        reasons.append(f"the reasoner reads {label}, the calibrated evidence {baseline.label} "
                       f"(P({label}) = {probs.get(label, 0.0):.2f})")
    recommendation = data.get("recommendation") or (DISAGREEMENT_RECOMMENDATION if disagree else baseline.recommendation)
    return Diagnosis(
        organ=organ.name, label=label, probabilities=probs, category=category,
        category_system=organ.category_system if category else None, findings=findings,
        evidence=list(baseline.evidence), rationale=rationale.strip(), recommendation=recommendation,
        indeterminate=bool(reasons), indeterminate_reason="; ".join(reasons) or None,
        image_width=baseline.image_width, image_height=baseline.image_height,
        warnings=[*baseline.warnings, DECISION_NOTE],
    )


__all__ = [
    "DECISION_NOTE",
    "DISAGREEMENT_RECOMMENDATION",
    "complete_decision",
    "decision_from_diagnosis",
    "decision_schema",
]
