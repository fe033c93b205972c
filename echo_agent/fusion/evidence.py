"""One run's typed evidence, sorted once, and the lookups every fusion needs on it.

:class:`RunEvidence` splits the evidence list of a run into detector reports, image contexts,
knowledge results and second-look classifications in one pass; the fusions, their features and
the decision rules all read that one object instead of re-splitting the list.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

from ..organs import OrganSpec
from ..schemas import (
    Box,
    ClassificationResult,
    Detection,
    DetectorReport,
    Evidence,
    ImageContext,
    KnowledgeResult,
    RegionClassification,
    RegionDescription,
)

_R = TypeVar("_R", RegionClassification, RegionDescription)


@dataclass(frozen=True)
class RunEvidence:
    """The evidence of one run by kind, each list in call order (the last is the most refined)."""

    reports: tuple[DetectorReport, ...] = ()
    contexts: tuple[ImageContext, ...] = ()
    knowledge: tuple[KnowledgeResult, ...] = ()
    classifications: tuple[ClassificationResult, ...] = ()

    @classmethod
    def of(cls, evidence: Sequence[Evidence] | RunEvidence) -> RunEvidence:
        """Sort ``evidence`` by kind (a :class:`RunEvidence` is returned as it is)."""
        if isinstance(evidence, RunEvidence):
            return evidence
        buckets: dict[type, list[Any]] = {DetectorReport: [], ImageContext: [], KnowledgeResult: [], ClassificationResult: []}
        for e in evidence:
            for kind, bucket in buckets.items():
                if isinstance(e, kind):
                    bucket.append(e)
                    break
        return cls(
            reports=tuple(buckets[DetectorReport]), contexts=tuple(buckets[ImageContext]),
            knowledge=tuple(buckets[KnowledgeResult]), classifications=tuple(buckets[ClassificationResult]),
        )

    @cached_property
    def candidates(self) -> list[Detection]:
        """All detector calls' candidates merged (:func:`merged_candidates`), best first; computed once."""
        return merged_candidates(self.reports)

    @property
    def whole_image(self) -> RegionClassification | None:
        """The latest second-look classification of the whole image."""
        return whole_image_classification(self.classifications)

    def region_of(self, detection: Detection) -> RegionClassification | None:
        """The latest second-look classification of a candidate (:func:`region_classification`)."""
        return region_classification(self.classifications, detection)

    def descriptors_of(self, detection: Detection) -> dict[str, Any]:
        """The captioner's descriptors of a candidate's region (:func:`region_descriptors`)."""
        return region_descriptors(self.contexts, detection)


def collect(evidence: Sequence[Evidence]) -> tuple[list[DetectorReport], list[ImageContext], list[KnowledgeResult]]:
    """``(reports, contexts, knowledge)`` of a run (see :class:`RunEvidence` for all four kinds)."""
    ev = RunEvidence.of(evidence)
    return list(ev.reports), list(ev.contexts), list(ev.knowledge)


def merged_candidates(reports: Sequence[DetectorReport]) -> list[Detection]:
    """All detector calls' candidates merged: weighted box fusion when there were several calls."""
    lists = [r.detections for r in reports if r.detections]
    if not lists:
        return []
    if len(lists) == 1:
        return sorted(lists[0], key=lambda d: -d.score)
    from ..detectors.postprocess import weighted_box_fusion

    fused = weighted_box_fusion(lists, iou_thr=0.55)
    # keep the id of the best original candidate that overlaps each fused box (for citations)
    originals = [d for lst in lists for d in lst]
    out = []
    for f in fused:
        best = max(originals, key=lambda d: (d.box.iou(f.box) if d.label == f.label else -1, d.score))
        out.append(f.model_copy(update={"id": best.id, "class_scores": best.class_scores}))
    return sorted(out, key=lambda d: -d.score)


def class_score(d: Detection, label: str) -> float:
    """A candidate's score for ``label``: its ``class_scores`` entry where boxes of several classes were
    merged into it, else its score when it carries that label, else 0."""
    if d.class_scores is not None:
        return float(d.class_scores.get(label, 0.0))
    return d.score if d.label == label else 0.0


def classifications(evidence: Sequence[Evidence]) -> list[ClassificationResult]:
    """The second-look classifier's results among the evidence, in call order."""
    return list(RunEvidence.of(evidence).classifications)


def whole_image_classification(results: Sequence[ClassificationResult]) -> RegionClassification | None:
    """The latest classification of the whole image among ``results`` (None when there is none)."""
    return next((r for res in reversed(results) for r in res.regions if r.box is None), None)


def region_classification(results: Sequence[ClassificationResult], detection: Detection) -> RegionClassification | None:
    """The latest classification of a candidate: linked by detection id, else the best box IoU >= 0.5."""
    return linked_classification(results, detection.box, (detection.id,))


def linked_classification(results: Sequence[ClassificationResult], box: Box, ids: Collection[str], *,
                          with_categories: bool = False) -> RegionClassification | None:
    """The latest classification of a region: linked by one of the detection ``ids``, else the best box
    IoU >= 0.5 with ``box``; ``with_categories`` considers only regions with a category distribution."""
    return _linked_region((r for res in reversed(results) for r in res.regions
                           if r.box is not None and not (with_categories and r.categories is None)), box, ids)


def _linked_region(regions: Iterable[_R], box: Box, ids: Collection[str]) -> _R | None:
    """The first of ``regions`` whose ``detection_id`` is one of ``ids``, else the one overlapping ``box``
    best (IoU >= 0.5; on a tie the later one); ``None`` when none is linked."""
    best, best_iou = None, 0.5
    for r in regions:
        if r.detection_id and r.detection_id in ids:
            return r
        iou = r.box.iou(box)
        if iou >= best_iou:
            best, best_iou = r, iou
    return best


def region_descriptors(contexts: Sequence[ImageContext], detection: Detection) -> dict[str, Any]:
    """Descriptors of the region linked to a detection (by id, else by best IoU >= 0.5)."""
    return linked_descriptors(contexts, detection.box, (detection.id,))


def linked_descriptors(contexts: Sequence[ImageContext], box: Box, ids: Collection[str]) -> dict[str, Any]:
    """Descriptors of the described region with one of ``ids`` (a detection's or a finding's), else of
    the one overlapping ``box`` best (IoU >= 0.5); ``{}`` when none is linked."""
    region = _linked_region((r for ctx in contexts for r in ctx.regions), box, ids)
    return dict(region.descriptors) if region else {}


def lesion_probability(organ: OrganSpec, region: RegionClassification | None) -> float | None:
    """1 - p(normal) of a classified region (None when there is no classification)."""
    if region is None:
        return None
    return 1.0 - float(region.probabilities.get(organ.normal_label, 0.0))


__all__ = [
    "RunEvidence",
    "class_score",
    "classifications",
    "collect",
    "lesion_probability",
    "linked_descriptors",
    "merged_candidates",
    "linked_classification",
    "region_classification",
    "region_descriptors",
    "whole_image_classification",
]
