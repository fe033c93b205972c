"""Human-in-the-loop review: the run pauses before END and resumes with a reviewer's decision."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

from langgraph.runtime import Runtime
from langgraph.types import interrupt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import EchoInputError
from ..events import DiagnosisEvent
from ..organs import OrganSpec, get_organ
from ..schemas import Box, Diagnosis, Finding, ReviewRecord
from .state import EchoRunContext


class ReviewDecision(BaseModel):
    """What a reviewer sends to resume a paused run (``Command(resume=decision.model_dump())``).

    ``edit`` may change ``label``, ``category`` and the lesion ``box`` (pixel ``[x1, y1, x2, y2]``);
    ``reject`` marks the Diagnosis indeterminate with the comment as the reason.
    """

    model_config = ConfigDict(extra="forbid")

    action: Literal["accept", "edit", "reject"]
    reviewer: str | None = Field(None, min_length=1, max_length=200)
    comment: str | None = Field(None, max_length=4000)
    label: str | None = None
    category: str | None = None
    box: list[float] | None = Field(None, min_length=4, max_length=4)

    @field_validator("box")
    @classmethod
    def _check_box(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return None
        if not all(math.isfinite(c) for c in v):
            raise ValueError(f"box coordinates must be finite numbers, got {v}")
        if v[2] <= v[0] or v[3] <= v[1]:
            raise ValueError(f"box must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1, got {v}")
        return v


def apply_review(dx: Diagnosis, decision: ReviewDecision, organ: OrganSpec, reviewer: str) -> Diagnosis:
    """Apply a reviewer's decision, recording who changed what next to the agent's original."""
    original = dx.model_dump(mode="json", exclude={"review"})
    changes: dict[str, Any] = {}
    update: dict[str, Any] = {}
    if decision.action == "edit":
        if decision.label is not None and decision.label != dx.label:
            if decision.label not in organ.image_labels:
                raise EchoInputError(
                    f"label {decision.label!r} is not a {organ.name} label; choose one of {list(organ.image_labels)}"
                )
            changes["label"] = {"from": dx.label, "to": decision.label}
            update["label"] = decision.label
            if decision.label == organ.normal_label and dx.findings:
                # "no lesion": the reviewer overrules every box
                changes["findings"] = {"from": [f.box.to_list() for f in dx.findings], "to": []}
                update["findings"] = []
            elif dx.findings and decision.box is None:
                top = max(range(len(dx.findings)), key=lambda i: dx.findings[i].score)
                findings = list(dx.findings)
                findings[top] = findings[top].model_copy(update={"label": decision.label})
                update["findings"] = findings
        if decision.category is not None and decision.category != dx.category:
            allowed = [b.name for b in organ.categories] + ([organ.no_lesion_category] if organ.no_lesion_category else [])
            if decision.category not in allowed:
                raise EchoInputError(
                    f"category {decision.category!r} is not valid for {organ.name}; choose one of {allowed}"
                )
            changes["category"] = {"from": dx.category, "to": decision.category}
            update["category"] = decision.category
            update["category_system"] = organ.category_system
        if decision.box is not None:
            try:  # a box partly outside the image is clipped to it; one entirely outside is refused
                box = Box.from_xyxy(decision.box).clip(dx.image_width, dx.image_height) if dx.image_width and dx.image_height \
                    else Box.from_xyxy(decision.box)
            except ValueError:
                raise EchoInputError(
                    f"box {decision.box} lies outside the {dx.image_width}x{dx.image_height} image"
                ) from None
            label = update.get("label", dx.label)
            findings = list(update.get("findings", dx.findings))
            top = max(range(len(findings)), key=lambda i: findings[i].score, default=None)
            new = Finding(box=box, label=label, score=1.0, detection_ids=[])
            old_box = findings[top].box.to_list() if top is not None else None
            if top is None:
                findings.append(new)
            else:
                findings[top] = new
            changes["box"] = {"from": old_box, "to": box.to_list()}
            update["findings"] = findings
        if not changes:
            raise EchoInputError("an 'edit' review must change label, category or box; use 'accept' otherwise")
    elif decision.action == "reject":
        update["indeterminate"] = True
        update["indeterminate_reason"] = f"rejected by reviewer {reviewer}" + (
            f": {decision.comment}" if decision.comment else ""
        )
        changes["indeterminate"] = {"from": dx.indeterminate, "to": True}
    record = ReviewRecord(
        reviewer=reviewer, action=decision.action, comment=decision.comment, changes=changes,
        original=original, timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    update["review"] = record
    return Diagnosis.model_validate({**dx.model_dump(), **{k: v for k, v in update.items()}})


def review_node(state: dict[str, Any], runtime: Runtime[EchoRunContext]) -> dict[str, Any]:
    """Pause with the Diagnosis; resume with a :class:`ReviewDecision` dict (the organ's spec from
    the registry; :func:`make_review_node` for a graph's own specs)."""
    return _review(state, runtime, get_organ)


def make_review_node(spec_of: Callable[[str], OrganSpec]) -> Callable[..., dict[str, Any]]:
    """The review node of a graph whose organ specs are resolved by ``spec_of`` (name -> spec)."""

    def review(state: dict[str, Any], runtime: Runtime[EchoRunContext]) -> dict[str, Any]:
        return _review(state, runtime, spec_of)

    return review


def _review(state: dict[str, Any], runtime: Runtime[EchoRunContext], spec_of: Callable[[str], OrganSpec]) -> dict[str, Any]:
    dx = Diagnosis.model_validate(state["diagnosis"])
    raw = interrupt({"type": "review", "diagnosis": state["diagnosis"], "actions": ["accept", "edit", "reject"]})
    try:
        decision = raw if isinstance(raw, ReviewDecision) else ReviewDecision.model_validate(raw)
    except Exception as exc:
        raise EchoInputError(f"the review decision is invalid: {exc}") from exc
    ctx = getattr(runtime, "context", None)
    reviewer = decision.reviewer or (getattr(ctx, "reviewer", None) if ctx is not None else None)
    if not reviewer:
        raise EchoInputError("a review needs a reviewer id: set 'reviewer' in the decision or the run context")
    reviewed = apply_review(dx, decision, spec_of(dx.organ), reviewer)
    runtime.stream_writer(DiagnosisEvent(diagnosis=reviewed))
    return {"diagnosis": reviewed.model_dump(mode="json")}
