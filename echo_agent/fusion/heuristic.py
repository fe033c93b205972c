"""The transparent baseline fusion.

``HeuristicFusion``: the image label follows the strongest candidate of the last (most refined)
detector call, its score is read as a probability -- or, where the second-look classifier judged
that candidate, the classifier's probabilities for it (a candidate it reads as normal is no
lesion) -- and the descriptors and knowledge are cited in the rationale. Its probabilities are *not* calibrated (the Diagnosis says so in ``warnings``); the
learned, calibrated fusion (:class:`~echo_agent.fusion.LearnedFusion`) is the default wherever
trained parameters ship.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..organs import OrganSpec
from ..schemas import ClinicalContext, Diagnosis, Evidence, EvidenceRef, Finding, normalise_probabilities
from .diagnosis import (
    assemble_diagnosis,
    describe_descriptors,
    evidence_conflict,
    knowledge_refs,
    secondary_min_score,
)
from .evidence import RunEvidence


class HeuristicFusion:
    """Transparent, uncalibrated baseline fusion (see module docstring)."""

    name = "heuristic-fusion/0"

    def __init__(self, min_confidence: float = 0.5, *, secondary_min_score: float | None = None) -> None:
        self.min_confidence = min_confidence
        #: score a candidate other than the strongest needs to be reported as a finding (as LearnedFusion);
        #: None: the organ's ``secondary_finding_min_score``
        self.secondary_min_score = secondary_min_score

    def fuse(
        self,
        organ: OrganSpec,
        evidence: Sequence[Evidence],
        *,
        clinical: ClinicalContext | None,
        image_size: tuple[int, int],
    ) -> Diagnosis:
        w, h = image_size
        ev = RunEvidence.of(evidence)
        reports, contexts = ev.reports, ev.contexts
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
                evidence=knowledge_refs(ev.knowledge),
            )
        # The most recent report is the most refined one (TTA / lower threshold re-checks come later).
        report = reports[-1]
        dets = sorted(report.detections, key=lambda d: -d.score)
        min_score = secondary_min_score(organ, self.secondary_min_score)
        findings = [
            Finding(box=d.box, label=organ.image_label_for(d.label), score=d.score, detection_ids=[d.id])
            for i, d in enumerate(dets) if i == 0 or d.score >= min_score
        ]
        refs.append(EvidenceRef(
            kind="detection", ref=report.id,
            summary=f"{len(dets)} candidate(s) at threshold {report.score_threshold:g}" + (" with TTA" if report.tta else ""),
        ))
        second_look = ev.region_of(dets[0]) if dets else None
        strongest = dets[0].id if dets else "-"
        if second_look is not None and second_look.label == organ.normal_label:
            # the closer look finds nothing in the strongest candidate: read as no lesion
            refs.append(EvidenceRef(kind="classification", ref=second_look.detection_id or strongest,
                                    summary=f"second look: {organ.normal_label} p={second_look.probabilities[organ.normal_label]:.2f}"))
            dets, findings = [], []
        if dets:
            top = dets[0]
            label = organ.image_label_for(top.label)
            s = top.score
            raw = {lbl: (1.0 - s) / max(len(organ.image_labels) - 1, 1) for lbl in organ.image_labels}
            raw[label] = s
            probs = normalise_probabilities(raw)
            if second_look is not None:
                # the second look's calibrated probabilities of the candidate replace the detector score
                probs = normalise_probabilities({lbl: second_look.probabilities.get(lbl, 0.0) for lbl in organ.image_labels})
                label = max(probs, key=probs.__getitem__)
                findings[0] = findings[0].model_copy(update={"label": label, "score": round(probs[label], 4)})
            descs = ev.descriptors_of(top)
            conflict = evidence_conflict(organ, label, descs)
            desc_text = describe_descriptors(descs, list(organ.descriptor_vocabulary) + ["size_mm"])
            refs.insert(0, EvidenceRef(kind="detection", ref=top.id, summary=f"{top.label} {top.score:.2f}"))
            rationale = f"The detector's strongest candidate ({top.id}) is {top.label} with score {s:.2f}."
            if second_look is not None:
                rationale += f" A closer look at it reads {label} (p={probs[label]:.2f})."
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
            ) if second_look is None else (
                f"The strongest candidate ({strongest}) is read "
                f"{organ.normal_label} on a closer look (p={second_look.probabilities[organ.normal_label]:.2f})."
            )
        if contexts and contexts[-1].caption:
            rationale += f" Image: {contexts[-1].caption}"
        return assemble_diagnosis(
            organ, ev, label=label, probabilities=probs, findings=findings, refs=refs, rationale=rationale,
            clinical=clinical, lesion_found=bool(dets), min_confidence=self.min_confidence, reasoner=self.name,
            image_size=image_size, conflict=conflict, calibrated=False, warnings=warnings,
        )


__all__ = ["HeuristicFusion"]
