"""What every fusion shares: the :class:`Fusion` protocol, the conflict rules, the citations and
:func:`assemble_diagnosis`, the one place a Diagnosis is put together from a fusion's decision."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ..organs import OrganSpec
from ..schemas import (
    ClinicalContext,
    Diagnosis,
    Evidence,
    EvidenceRef,
    Finding,
    KnowledgeResult,
    RegionClassification,
)
from .evidence import RunEvidence, lesion_probability, linked_classification, linked_descriptors


@runtime_checkable
class Fusion(Protocol):
    """Turns evidence into a Diagnosis (the reason node's default brain)."""

    name: str

    def fuse(
        self,
        organ: OrganSpec,
        evidence: Sequence[Evidence],
        *,
        clinical: ClinicalContext | None,
        image_size: tuple[int, int],
    ) -> Diagnosis: ...


# -- text -------------------------------------------------------------------------------------------
def describe_descriptors(descs: dict[str, Any], keys: Sequence[str]) -> str:
    parts = []
    for k in keys:
        d = descs.get(k)
        if d is not None and d.value not in (None, ""):
            v = f"{d.value:.1f}" if isinstance(d.value, float) else str(d.value)
            parts.append(f"{k.replace('_', ' ')} {v}")
    return ", ".join(parts)


def short_citation(source: str) -> str:
    """'Stavros AT, Thickman D, ... Radiology 1995;196:...' -> 'Stavros AT 1995' (full text stays in the snippet)."""
    first = re.split(r"[,.;(]", source, maxsplit=1)[0].strip()
    year = re.search(r"\b(19|20)\d{2}\b", source)
    return f"{first} {year.group(0)}" if year else first


def knowledge_refs(knowledge: Sequence[KnowledgeResult], limit: int = 3) -> list[EvidenceRef]:
    refs = []
    for res in knowledge:
        for s in res.snippets[:limit]:
            refs.append(EvidenceRef(kind="knowledge", ref=f"{res.id}:{s.id}", summary=f"{s.title} ({short_citation(s.source)})"))
    return refs


def clinical_refs(clinical: ClinicalContext | None) -> list[EvidenceRef]:
    """The clinical context as an evidence reference (none when it is empty)."""
    if clinical is None or clinical.is_empty():
        return []
    return [EvidenceRef(kind="clinical", ref="clinical", summary=clinical.as_text())]


# -- conflicts and recommendations -------------------------------------------------------------------
WEAK_EVIDENCE_RECOMMENDATION = "Evidence is weak: refer for a sonographer's or radiologist's review."
CONFLICT_RECOMMENDATION = (
    "The detector's reading and the sonographic features of its top candidate disagree: refer for a "
    "radiologist's review."
)
PRESENCE_RECOMMENDATION = (
    "Read as normal, but the second-look classifier sees a lesion: refer for a sonographer's or "
    "radiologist's review."
)
OVERRULED_RECOMMENDATION = (
    "The fused evidence read this image as normal, but the detector found a candidate lesion: refer for a "
    "sonographer's or radiologist's review."
)
#: A "normal" reading is referred when the second look gives a region (or the whole image) at
#: least this probability of a lesion.
PRESENCE_CONFLICT_MIN = 0.5


def secondary_min_score(organ: OrganSpec, override: float | None = None) -> float:
    """The score a candidate other than the leading one needs to be reported as a further finding:
    ``override`` (a fusion's own setting) when given, else the organ's ``secondary_finding_min_score``."""
    return organ.secondary_finding_min_score if override is None else float(override)


def evidence_conflict(organ: OrganSpec, label: str, descriptors: dict[str, Any]) -> str | None:
    """Why a label other than the organ's positive one conflicts with the top candidate's
    descriptors (``None``: no conflict). See ``OrganSpec.suspicious_descriptors``."""
    pos = organ.positive_label
    if not organ.suspicious_descriptors or pos is None or label == pos:
        return None
    hits = organ.suspicious_hits(descriptors)
    if len(hits) < organ.conflict_min_votes:
        return None
    return (f"evidence conflict: read as {label}, but the top candidate shows {len(hits)} of "
            f"{len(organ.suspicious_descriptors)} {pos} features ({', '.join(hits)})")


def second_look_sees_lesion(organ: OrganSpec, regions: Sequence[RegionClassification]) -> str | None:
    """The first of ``regions`` where the second look's lesion probability reaches
    :data:`PRESENCE_CONFLICT_MIN`, said as "the second look gives <where> lesion probability <p>"
    (``None``: nowhere)."""
    for r in regions:
        p = lesion_probability(organ, r)
        if p is not None and p >= PRESENCE_CONFLICT_MIN:
            where = "the whole image" if r.box is None else "a candidate region"
            return f"the second look gives {where} lesion probability {p:.2f}"
    return None


def presence_conflict(organ: OrganSpec, label: str, regions: Sequence[RegionClassification]) -> str | None:
    """Why a ``normal`` reading conflicts with the second look (``None``: no conflict): "normal" must
    not stand when the region classifier sees a lesion."""
    seen = second_look_sees_lesion(organ, regions) if label == organ.normal_label else None
    return f"evidence conflict: read as {label}, but {seen}" if seen else None


def recommendation_for(
    organ: OrganSpec, label: str, category: str | None, indeterminate: bool, conflict: bool = False,
    presence_conflict: bool = False, overruled: bool = False,
) -> str:
    """What to do next: refer when indeterminate (saying why when the evidence conflicts), else the
    category's management, else a default."""
    band = organ.band(category) if category else None
    if conflict:
        return CONFLICT_RECOMMENDATION
    if presence_conflict:
        return PRESENCE_RECOMMENDATION
    if overruled:
        return OVERRULED_RECOMMENDATION
    if indeterminate:
        return WEAK_EVIDENCE_RECOMMENDATION
    if band is not None and band.management:
        return band.management
    if label == organ.normal_label:
        return "No lesion identified; routine follow-up as clinically indicated."
    return "Correlate clinically and with the referring physician."


def head_category(organ: OrganSpec, evidence: RunEvidence, finding: Finding) -> str | None:
    """A finding's category from the organ's category head (``category_source: classifier``): the
    median of the latest second-look distribution of its region (linked by detection id, else by box
    IoU >= 0.5), else of the whole image; ``None`` when the finding was never classified."""
    best = linked_classification(evidence.classifications, finding.box, finding.detection_ids, with_categories=True)
    if best is None:
        best = evidence.whole_image
    return organ.category_from_distribution(best.categories) if best is not None and best.categories else None


def counted_categories(organ: OrganSpec, evidence: RunEvidence,
                       findings: Sequence[Finding]) -> tuple[list[Finding], str | None]:
    """``findings`` with the category ``OrganSpec.category_by_suspicious_count`` gives each described
    one (a finding never described keeps its category), and the sentence that explains the leading
    finding's (``None`` when it was not counted)."""
    out, why = [], None
    for i, f in enumerate(findings):
        descs = linked_descriptors(evidence.contexts, f.box, f.detection_ids)
        if not descs:
            out.append(f)
            continue
        hits = organ.suspicious_hits(descs)
        category = organ.category_for_count(len(hits))
        out.append(f.model_copy(update={"category": category}))
        if i == 0:
            shown = f" ({', '.join(hits)})" if hits else ""
            why = (f" Category {category}: the leading finding shows {len(hits)} of "
                   f"{len(organ.suspicious_descriptors)} suspicious features{shown}.")
    return out, why


# -- the Diagnosis --------------------------------------------------------------------------------------
def assemble_diagnosis(
    organ: OrganSpec,
    evidence: RunEvidence,
    *,
    label: str,
    probabilities: Mapping[str, float],
    findings: Sequence[Finding],
    refs: Sequence[EvidenceRef],
    rationale: str,
    clinical: ClinicalContext | None,
    lesion_found: bool,
    min_confidence: float,
    reasoner: str,
    image_size: tuple[int, int],
    conflict: str | None = None,
    presence: str | None = None,
    overruled: str | None = None,
    calibrated: bool = True,
    warnings: Sequence[str] = (),
) -> Diagnosis:
    """The Diagnosis of a fusion's decision: cites the knowledge and clinical context, assigns the
    category (from the positive label's probability, or from the organ's category head on the leading
    finding), refers when the top probability is below
    ``min_confidence``, the evidence conflicts or a normal reading was ``overruled`` (why), and says
    what to do next."""
    krefs = knowledge_refs(evidence.knowledge)
    if krefs:
        rationale += " Knowledge: " + "; ".join(r.summary for r in krefs[:2]) + "."
    all_refs = [*refs, *krefs, *clinical_refs(clinical)]
    probs = dict(probabilities)
    pos = organ.positive_label
    if organ.category_source == "classifier":
        findings = [f.model_copy(update={"category": head_category(organ, evidence, f)}) for f in findings]
        category = (findings[0].category if findings else None) if lesion_found else organ.no_lesion_category
    else:
        category = organ.category_for(probs.get(pos) if pos else None, lesion_found=lesion_found)
        if lesion_found and findings and organ.appearance_rules:
            descs = linked_descriptors(evidence.contexts, findings[0].box, findings[0].detection_ids)
            rule = organ.appearance_rule(label, descs, category)
            if rule is not None:
                shown = ", ".join(f"{k.replace('_', ' ')} {descs[k].value}" for k in rule.descriptors)
                rationale += (f" Category {rule.category} instead of {category}: the leading finding has the look "
                              f"of a {rule.name} ({shown}).")
                category = rule.category
    if organ.category_by_suspicious_count and lesion_found and findings:
        findings, why = counted_categories(organ, evidence, findings)
        if why is not None:
            category, rationale = findings[0].category, rationale + why
    conf = probs[label]
    what = "calibrated top probability" if calibrated else "top probability"
    reasons = [f"{what} {conf:.2f} < {min_confidence:.2f}"] if conf < min_confidence else []
    reasons += [r for r in (conflict, presence, overruled) if r]
    indeterminate = bool(reasons)
    recommendation = recommendation_for(organ, label, category, indeterminate, conflict=bool(conflict),
                                        presence_conflict=bool(presence), overruled=bool(overruled))
    w, h = image_size
    return Diagnosis(
        organ=organ.name, label=label, probabilities=probs, category=category,
        category_system=organ.category_system if category else None, findings=list(findings),
        evidence=all_refs, rationale=rationale, recommendation=recommendation, indeterminate=indeterminate,
        indeterminate_reason="; ".join(reasons) or None, reasoner=reasoner, image_width=w, image_height=h,
        warnings=list(warnings),
    )


__all__ = [
    "CONFLICT_RECOMMENDATION",
    "OVERRULED_RECOMMENDATION",
    "Fusion",
    "PRESENCE_CONFLICT_MIN",
    "PRESENCE_RECOMMENDATION",
    "WEAK_EVIDENCE_RECOMMENDATION",
    "assemble_diagnosis",
    "clinical_refs",
    "describe_descriptors",
    "evidence_conflict",
    "head_category",
    "knowledge_refs",
    "presence_conflict",
    "second_look_sees_lesion",
    "secondary_min_score",
    "recommendation_for",
    "short_citation",
]
