"""Evidence fusion: turns the typed evidence of a run into one Diagnosis.

``HeuristicFusion`` is the transparent baseline: the image label follows the strongest detector
candidate, its score is read as a probability, and the descriptors and knowledge are cited in the
rationale. Its probabilities are *not* calibrated (the Diagnosis says so in ``warnings``); the
learned, calibrated fusion replaces it as the default once trained weights ship.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..organs import OrganSpec
from ..schemas import (
    ClinicalContext,
    Detection,
    DetectorReport,
    Diagnosis,
    Evidence,
    EvidenceRef,
    Finding,
    ImageContext,
    KnowledgeResult,
    normalise_probabilities,
)


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


def collect(evidence: Sequence[Evidence]) -> tuple[list[DetectorReport], list[ImageContext], list[KnowledgeResult]]:
    reports = [e for e in evidence if isinstance(e, DetectorReport)]
    contexts = [e for e in evidence if isinstance(e, ImageContext)]
    knowledge = [e for e in evidence if isinstance(e, KnowledgeResult)]
    return reports, contexts, knowledge


def region_descriptors(contexts: Sequence[ImageContext], detection: Detection) -> dict[str, Any]:
    """Descriptors of the region linked to a detection (by id, else by best IoU >= 0.5)."""
    best, best_iou = None, 0.5
    for ctx in contexts:
        for r in ctx.regions:
            if r.detection_id and r.detection_id == detection.id:
                return {k: d for k, d in r.descriptors.items()}
            iou = r.box.iou(detection.box)
            if iou >= best_iou:
                best, best_iou = r, iou
    return dict(best.descriptors) if best else {}


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


WEAK_EVIDENCE_RECOMMENDATION = "Evidence is weak: refer for a sonographer's or radiologist's review."


def evidence_conflict(organ: OrganSpec, label: str, descriptors: dict[str, Any]) -> str | None:
    """Why a label other than the organ's positive one conflicts with the top candidate's
    descriptors (``None``: no conflict). See ``OrganSpec.suspicious_descriptors``."""
    pos = organ.positive_label
    if not organ.suspicious_descriptors or pos is None or label == pos:
        return None
    hits = []
    for key, values in organ.suspicious_descriptors.items():
        d = descriptors.get(key)
        if d is not None and d.value in values:
            hits.append(f"{key.replace('_', ' ')} {d.value}")
    if len(hits) < organ.conflict_min_votes:
        return None
    return (f"evidence conflict: read as {label}, but the top candidate shows {len(hits)} of "
            f"{len(organ.suspicious_descriptors)} {pos} features ({', '.join(hits)})")


CONFLICT_RECOMMENDATION = (
    "The detector's reading and the sonographic features of its top candidate disagree: refer for a "
    "radiologist's review."
)
PRESENCE_RECOMMENDATION = (
    "Read as normal, but the second-look classifier sees a lesion: refer for a sonographer's or "
    "radiologist's review."
)


def recommendation_for(
    organ: OrganSpec, label: str, category: str | None, indeterminate: bool, conflict: bool = False,
    presence_conflict: bool = False,
) -> str:
    """What to do next: refer when indeterminate (saying why when the evidence conflicts), else the
    category's management, else a default."""
    band = organ.band(category) if category else None
    if conflict:
        return CONFLICT_RECOMMENDATION
    if presence_conflict:
        return PRESENCE_RECOMMENDATION
    if indeterminate:
        return WEAK_EVIDENCE_RECOMMENDATION
    if band is not None and band.management:
        return band.management
    if label == organ.normal_label:
        return "No lesion identified; routine follow-up as clinically indicated."
    return "Correlate clinically and with the referring physician."


def clinical_refs(clinical: ClinicalContext | None) -> list[EvidenceRef]:
    """The clinical context as an evidence reference (none when it is empty)."""
    if clinical is None or clinical.is_empty():
        return []
    return [EvidenceRef(kind="clinical", ref="clinical", summary=clinical.as_text())]


class HeuristicFusion:
    """Transparent, uncalibrated baseline fusion (see module docstring)."""

    name = "heuristic-fusion/0"

    def __init__(self, min_confidence: float = 0.5) -> None:
        self.min_confidence = min_confidence

    def fuse(
        self,
        organ: OrganSpec,
        evidence: Sequence[Evidence],
        *,
        clinical: ClinicalContext | None,
        image_size: tuple[int, int],
    ) -> Diagnosis:
        w, h = image_size
        reports, contexts, knowledge = collect(evidence)
        refs: list[EvidenceRef] = []
        warnings = ["probabilities come from the uncalibrated heuristic fusion"]
        if not reports:
            uniform = normalise_probabilities({lbl: 1.0 for lbl in organ.image_labels})
            return Diagnosis(
                organ=organ.name, label=organ.normal_label, probabilities=uniform,
                indeterminate=True, indeterminate_reason="no detector result was obtained",
                rationale="The lesion detector did not return a result, so no lesion could be assessed.",
                recommendation="Repeat the analysis or have the image read by a sonographer.",
                reasoner=self.name, image_width=w, image_height=h, warnings=warnings,
                evidence=knowledge_refs(knowledge),
            )
        # The most recent report is the most refined one (TTA / lower threshold re-checks come later).
        report = reports[-1]
        dets = sorted(report.detections, key=lambda d: -d.score)
        findings = [
            Finding(box=d.box, label=organ.image_label_for(d.label), score=d.score, detection_ids=[d.id])
            for d in dets
        ]
        refs.append(EvidenceRef(
            kind="detection", ref=report.id,
            summary=f"{len(dets)} candidate(s) at threshold {report.score_threshold:g}" + (" with TTA" if report.tta else ""),
        ))
        if dets:
            top = dets[0]
            label = organ.image_label_for(top.label)
            s = top.score
            raw = {lbl: (1.0 - s) / max(len(organ.image_labels) - 1, 1) for lbl in organ.image_labels}
            raw[label] = s
            probs = normalise_probabilities(raw)
            descs = region_descriptors(contexts, top)
            conflict = evidence_conflict(organ, label, descs)
            desc_text = describe_descriptors(descs, list(organ.descriptor_vocabulary) + ["size_mm"])
            refs.insert(0, EvidenceRef(kind="detection", ref=top.id, summary=f"{top.label} {top.score:.2f}"))
            rationale = f"The detector's strongest candidate ({top.id}) is {top.label} with score {s:.2f}."
            if desc_text:
                rationale += f" The captioner describes it as: {desc_text}."
                refs.append(EvidenceRef(kind="description", ref=contexts[-1].id, summary=desc_text))
        else:
            label = organ.normal_label
            conflict = None
            # With no candidate even at the report's threshold the image is read as normal; the
            # remaining mass reflects that the detector can miss lesions (uncalibrated).
            s = 1.0 - report.score_threshold
            raw = {lbl: report.score_threshold / max(len(organ.image_labels) - 1, 1) for lbl in organ.image_labels}
            raw[label] = s
            probs = normalise_probabilities(raw)
            rationale = (
                f"No lesion candidate scored at least {report.score_threshold:g} "
                f"({len(reports)} detector call(s))."
            )
        if contexts and contexts[-1].caption:
            rationale += f" Image: {contexts[-1].caption}"
        krefs = knowledge_refs(knowledge)
        if krefs:
            rationale += " Knowledge: " + "; ".join(r.summary for r in krefs[:2]) + "."
        refs.extend(krefs)
        refs.extend(clinical_refs(clinical))
        pos = organ.positive_label
        category = organ.category_for(probs.get(pos) if pos else None, lesion_found=bool(dets))
        confidence = probs[label]
        reasons = [f"top probability {confidence:.2f} < {self.min_confidence:.2f}"] if confidence < self.min_confidence else []
        reasons += [conflict] if conflict else []
        indeterminate = bool(reasons)
        recommendation = recommendation_for(organ, label, category, indeterminate, conflict=bool(conflict))
        return Diagnosis(
            organ=organ.name, label=label, probabilities=probs, category=category,
            category_system=organ.category_system if category else None, findings=findings,
            evidence=refs, rationale=rationale, recommendation=recommendation,
            indeterminate=indeterminate, indeterminate_reason="; ".join(reasons) or None,
            reasoner=self.name, image_width=w, image_height=h, warnings=warnings,
        )
