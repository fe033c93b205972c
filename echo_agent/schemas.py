"""Typed data that crosses every boundary of echo-agent.

Pixel boxes are ``[x1, y1, x2, y2]`` in the coordinates of the image the user gave us (floats, ``x2 > x1``,
``y2 > y1``). Boxes cross the model boundary (prompts, tool arguments an LLM writes, training
conversations) in one convention only: integers in ``0..1000`` relative to the image width and height,
as Qwen3-VL uses. :meth:`Box.to_model` and :meth:`Box.from_model` are the only conversion between the two.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
    model_validator,
)

#: Scale of the model-facing box convention (Qwen3-VL style, 0..1000).
MODEL_BOX_SCALE = 1000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Box(_Model):
    """An axis-aligned box in pixel coordinates of the original image.

    >>> b = Box(x1=10, y1=20, x2=110, y2=70)
    >>> b.width, b.height, b.area
    (100.0, 50.0, 5000.0)
    >>> b.to_model(width=200, height=100)
    [50, 200, 550, 700]
    >>> Box.from_model([50, 200, 550, 700], width=200, height=100) == b
    True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    x1: float
    y1: float
    x2: float
    y2: float

    @model_validator(mode="after")
    def _check(self) -> Box:
        vals = (self.x1, self.y1, self.x2, self.y2)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"box coordinates must be finite numbers, got {list(vals)}")
        if self.x2 <= self.x1 or self.y2 <= self.y1:
            raise ValueError(
                f"box must have x2 > x1 and y2 > y1 (pixel [x1, y1, x2, y2]), got {list(vals)}"
            )
        return self

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_xyxy(cls, xyxy: Sequence[float]) -> Box:
        """Build from a ``[x1, y1, x2, y2]`` sequence of pixel coordinates."""
        if len(xyxy) != 4:
            raise ValueError(f"a box needs 4 numbers [x1, y1, x2, y2], got {len(xyxy)}")
        x1, y1, x2, y2 = (float(v) for v in xyxy)
        return cls(x1=x1, y1=y1, x2=x2, y2=y2)

    @classmethod
    def from_model(cls, coords: Sequence[float], width: int, height: int) -> Box:
        """Convert a model-convention box (0..1000 of width/height) to pixels of a ``width`` x ``height`` image."""
        if len(coords) != 4:
            raise ValueError(f"a model box needs 4 numbers in 0..{MODEL_BOX_SCALE}, got {len(coords)}")
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        vals = [min(max(float(v), 0.0), float(MODEL_BOX_SCALE)) for v in coords]
        x1, y1, x2, y2 = vals
        return cls(
            x1=x1 * width / MODEL_BOX_SCALE,
            y1=y1 * height / MODEL_BOX_SCALE,
            x2=x2 * width / MODEL_BOX_SCALE,
            y2=y2 * height / MODEL_BOX_SCALE,
        )

    def to_model(self, width: int, height: int) -> list[int]:
        """Convert to the model convention: integers 0..1000 relative to a ``width`` x ``height`` image."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")

        def s(v: float, n: int) -> int:
            return int(round(min(max(v / n, 0.0), 1.0) * MODEL_BOX_SCALE))

        return [s(self.x1, width), s(self.y1, height), s(self.x2, width), s(self.y2, height)]

    # -- geometry -----------------------------------------------------------------------------
    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2.0, (self.y1 + self.y2) / 2.0)

    def to_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]

    def intersection(self, other: Box) -> float:
        w = min(self.x2, other.x2) - max(self.x1, other.x1)
        h = min(self.y2, other.y2) - max(self.y1, other.y1)
        return max(w, 0.0) * max(h, 0.0)

    def iou(self, other: Box) -> float:
        """Intersection over union with another box (0 when disjoint)."""
        inter = self.intersection(other)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def clip(self, width: int, height: int) -> Box:
        """Clip to the image; raises ``ValueError`` if nothing of the box lies inside it."""
        return Box(
            x1=min(max(self.x1, 0.0), width),
            y1=min(max(self.y1, 0.0), height),
            x2=min(max(self.x2, 0.0), width),
            y2=min(max(self.y2, 0.0), height),
        )

    def expand(self, factor: float, width: int | None = None, height: int | None = None) -> Box:
        """Grow (factor > 1) or shrink around the centre, optionally clipped to the image."""
        cx, cy = self.center
        hw, hh = self.width * factor / 2.0, self.height * factor / 2.0
        b = Box(x1=cx - hw, y1=cy - hh, x2=cx + hw, y2=cy + hh)
        if width is not None and height is not None:
            b = b.clip(width, height)
        return b


class Detection(_Model):
    """One lesion candidate from a detector (or a refined one from the reasoner)."""

    id: str = Field("", description="Stable reference, e.g. 'det1:0' = call 1, candidate 0.")
    box: Box
    label: str = Field(description="One of the organ's lesion labels, e.g. 'benign', 'malignant', 'lesion'.")
    score: float = Field(ge=0.0, le=1.0, description="Detector confidence in [0, 1].")
    source: str = Field("detector", description="What produced it: 'detector', 'tta', 'wbf', 'reasoner'.")
    class_scores: dict[str, float] | None = Field(
        None,
        description="Best score of every detector class at this location, set when overlapping boxes of "
        "different classes were merged into this one (class-agnostic suppression); includes the label's own score.",
    )


class DetectorReport(_Model):
    """The typed result of one ``detect_*_lesions`` tool call."""

    kind: Literal["detections"] = "detections"
    id: str = Field(description="Evidence id, e.g. 'det1'.")
    organ: str
    detector: str = Field(description="Detector name and version.")
    detections: list[Detection] = Field(default_factory=list)
    score_threshold: float
    tta: bool = False
    region: Box | None = None
    image_width: int
    image_height: int
    elapsed_ms: float = 0.0

    def top(self) -> Detection | None:
        return max(self.detections, key=lambda d: d.score, default=None)


class Descriptor(_Model):
    """One sonographic descriptor value with the captioner's confidence in it."""

    value: str | float | bool | None
    confidence: float = Field(1.0, ge=0.0, le=1.0)
    unit: str | None = None
    note: str | None = None


class RegionDescription(_Model):
    """Descriptors of one candidate region (usually a detector box)."""

    box: Box
    detection_id: str | None = None
    descriptors: dict[str, Descriptor] = Field(default_factory=dict)
    caption: str = ""


class ImageContext(_Model):
    """The global-context captioner's result: whole-image descriptors plus per-region descriptors."""

    kind: Literal["description"] = "description"
    id: str = Field(description="Evidence id, e.g. 'desc1'.")
    organ: str | None = None
    image_width: int
    image_height: int
    global_descriptors: dict[str, Descriptor] = Field(default_factory=dict)
    regions: list[RegionDescription] = Field(default_factory=list)
    caption: str = ""
    captioner: str = "pixel"
    elapsed_ms: float = 0.0


class KnowledgeSnippet(_Model):
    """One passage of the curated knowledge base, with its citation."""

    id: str = Field(description="Knowledge entry id, e.g. 'breast/birads-4'.")
    organ: str
    title: str
    passage: str = Field(description="The exact text of the passage.")
    source: str = Field(description="Citation of the public source the passage summarises.")
    finding: str | None = None
    category: str | None = None
    score: float = 0.0


class KnowledgeResult(_Model):
    """The typed result of one ``retrieve_knowledge`` tool call."""

    kind: Literal["knowledge"] = "knowledge"
    id: str = Field(description="Evidence id, e.g. 'kb1'.")
    query: str
    organ: str | None = None
    snippets: list[KnowledgeSnippet] = Field(default_factory=list)
    elapsed_ms: float = 0.0


class RegionClassification(_Model):
    """The second-look classifier's class probabilities for one region (or the whole image)."""

    box: Box | None = Field(None, description="The region in pixels; None = the whole image.")
    detection_id: str | None = None
    probabilities: dict[str, float] = Field(description="Calibrated probabilities over the organ's image labels.")
    categories: dict[str, float] | None = Field(
        None,
        description="Probabilities over the organ's assessment categories given a lesion, when its classifier is a "
        "category head (OrganSpec.category_source 'classifier'); None otherwise.",
    )

    @property
    def label(self) -> str:
        return max(self.probabilities, key=self.probabilities.__getitem__)


class ClassificationResult(_Model):
    """The typed result of one ``classify_*_regions`` tool call."""

    kind: Literal["classification"] = "classification"
    id: str = Field(description="Evidence id, e.g. 'cls1'.")
    organ: str
    classifier: str = Field(description="Classifier name and version.")
    regions: list[RegionClassification] = Field(default_factory=list)
    image_width: int
    image_height: int
    elapsed_ms: float = 0.0

    def whole_image(self) -> RegionClassification | None:
        return next((r for r in self.regions if r.box is None), None)


Evidence = DetectorReport | ImageContext | KnowledgeResult | ClassificationResult
"""Any typed tool result accumulated in the graph state (discriminated by ``kind``)."""


#: Characters removed from clinical free text (replaced by a space): C0/C1 control characters other
#: than tab and newline (NUL, ESC, ...), and Unicode bidirectional overrides and isolates, which can
#: make the text display differently from what it says in reports and FHIR resources.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f]")


class ClinicalContext(_Model):
    """Optional clinical information about the patient, passed to the reasoner as *data*.

    Free text is never interpreted as instructions by the reasoners.
    """

    age: int | None = Field(None, ge=0, le=130, description="Age in years.")
    sex: Literal["female", "male", "other"] | None = None
    symptoms: str | None = Field(None, max_length=2000)
    history: str | None = Field(None, max_length=4000, description="Relevant history, e.g. prior biopsy.")
    notes: str | None = Field(None, max_length=4000)

    @field_validator("symptoms", "history", "notes")
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = _CONTROL_CHARS.sub(" ", v).strip()
        return v or None

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in type(self).model_fields)

    def as_text(self) -> str:
        parts = []
        if self.age is not None:
            parts.append(f"age {self.age}")
        if self.sex:
            parts.append(f"sex {self.sex}")
        for f in ("symptoms", "history", "notes"):
            v = getattr(self, f)
            if v:
                parts.append(f"{f}: {v}")
        return "; ".join(parts) if parts else "none given"


class EvidenceRef(_Model):
    """A pointer from the Diagnosis to the evidence that supports it."""

    kind: Literal["detection", "description", "knowledge", "clinical", "image", "classification"]
    ref: str = Field(description="Evidence id such as 'det1:0', 'desc1', 'kb1:breast/birads-4'.")
    summary: str = ""


class Finding(_Model):
    """A lesion in the final Diagnosis, with its own label and score."""

    box: Box
    label: str
    score: float = Field(ge=0.0, le=1.0)
    category: str | None = None
    detection_ids: list[str] = Field(default_factory=list)


class ReviewRecord(_Model):
    """What a human reviewer did to the agent's Diagnosis."""

    reviewer: str
    action: Literal["accept", "edit", "reject"]
    comment: str | None = None
    changes: dict[str, Any] = Field(default_factory=dict, description="Field -> {'from': ..., 'to': ...}.")
    original: dict[str, Any] | None = Field(None, description="The agent's Diagnosis before review.")
    timestamp: str | None = None


class Diagnosis(_Model):
    """The agent's structured, grounded answer for one image.

    ``probabilities`` is a distribution over the organ's image-level labels; ``label`` is its argmax
    unless the reasoner says otherwise; ``indeterminate`` is set when the evidence is too weak to
    commit, with the reason and a recommendation.
    """

    organ: str
    label: str
    probabilities: dict[str, float]
    category: str | None = Field(None, description="Organ-specific category, e.g. BI-RADS '4A' for breast.")
    category_system: str | None = Field(None, description="e.g. 'BI-RADS'.")
    findings: list[Finding] = Field(default_factory=list)
    evidence: list[EvidenceRef] = Field(default_factory=list)
    rationale: str = ""
    recommendation: str = ""
    indeterminate: bool = False
    indeterminate_reason: str | None = None
    reasoner: str = Field("", description="Which reasoner/fusion produced it.")
    image_width: int | None = None
    image_height: int | None = None
    image_id: str | None = Field(None, description="Content id of the diagnosed image in the agent's image store.")
    warnings: list[str] = Field(default_factory=list)
    review: ReviewRecord | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_computed(cls, data: Any) -> Any:
        # ``probability`` and ``box`` are derived; accept them in input (a dumped Diagnosis round-trips).
        if isinstance(data, dict) and ("probability" in data or "box" in data):
            data = {k: v for k, v in data.items() if k not in ("probability", "box")}
        return data

    @model_validator(mode="after")
    def _check(self) -> Diagnosis:
        if not self.probabilities:
            raise ValueError("probabilities must not be empty")
        for k, p in self.probabilities.items():
            if not (0.0 <= p <= 1.0) or not math.isfinite(p):
                raise ValueError(f"probability of {k!r} must be in [0, 1], got {p}")
        total = sum(self.probabilities.values())
        if abs(total - 1.0) > 1e-3:
            raise ValueError(f"probabilities must sum to 1, got {total:.4f}")
        if self.label not in self.probabilities:
            raise ValueError(
                f"label {self.label!r} is not one of the probability keys {sorted(self.probabilities)}"
            )
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def probability(self) -> float:
        """Probability of ``label``."""
        return float(self.probabilities[self.label])

    @computed_field  # type: ignore[prop-decorator]
    @property
    def box(self) -> Box | None:
        """Box of the highest-scoring finding, or ``None`` when no lesion is reported."""
        top = max(self.findings, key=lambda f: f.score, default=None)
        return top.box if top else None

    def to_json(self, **kw: Any) -> str:
        return self.model_dump_json(**kw)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON schema of a Diagnosis (used for structured output of LLM reasoners)."""
        return cls.model_json_schema(mode="validation")


def normalise_probabilities(probs: dict[str, float]) -> dict[str, float]:
    """Clip to [0, 1] and renormalise to sum 1 (uniform if all zero)."""
    clipped = {k: min(max(float(v), 0.0), 1.0) for k, v in probs.items()}
    s = sum(clipped.values())
    if s <= 0:
        n = len(clipped)
        return {k: 1.0 / n for k in clipped}
    return {k: v / s for k, v in clipped.items()}


def parse_evidence(data: dict[str, Any]) -> Evidence:
    """Rebuild a typed evidence item from its dict form (as stored in graph state)."""
    kind = data.get("kind")
    if kind == "detections":
        return DetectorReport.model_validate(data)
    if kind == "description":
        return ImageContext.model_validate(data)
    if kind == "knowledge":
        return KnowledgeResult.model_validate(data)
    if kind == "classification":
        return ClassificationResult.model_validate(data)
    raise ValueError(f"unknown evidence kind {kind!r}; expected detections, description, knowledge or classification")


def detection_candidates(evidence: Iterable[Evidence | Mapping[str, Any]]) -> dict[str, Detection]:
    """A run's detector candidates by candidate id (``'det1:0'``), from its evidence (typed items or
    their dict form, as in graph state)."""
    out: dict[str, Detection] = {}
    for e in evidence:
        if isinstance(e, Mapping):
            if e.get("kind") != "detections":
                continue
            e = DetectorReport.model_validate(e)
        if isinstance(e, DetectorReport):
            out.update((d.id, d) for d in e.detections if d.id)
    return out


def detection_boxes(evidence: Iterable[Evidence | Mapping[str, Any]]) -> dict[str, Box]:
    """Pixel boxes of a run's detector candidates by candidate id (:func:`detection_candidates`).
    Tools and the final answer may cite a candidate by id instead of copying its box."""
    return {k: d.box for k, d in detection_candidates(evidence).items()}


__all__ = [
    "MODEL_BOX_SCALE",
    "Box",
    "ClassificationResult",
    "ClinicalContext",
    "Descriptor",
    "Detection",
    "DetectorReport",
    "Diagnosis",
    "Evidence",
    "EvidenceRef",
    "Finding",
    "ImageContext",
    "KnowledgeResult",
    "KnowledgeSnippet",
    "RegionClassification",
    "RegionDescription",
    "ReviewRecord",
    "detection_boxes",
    "detection_candidates",
    "normalise_probabilities",
    "parse_evidence",
]
