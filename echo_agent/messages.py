"""The message contract shared by inference, the SFT curriculum and RL rollouts.

A conversation is: a system prompt (``prompts.system_prompt``), a user turn with the image and the
clinical context (:func:`user_message`), assistant turns with tool calls, tool turns whose content is
the model-facing JSON of a typed tool result (this module), and a final assistant turn whose content
is the model-facing Diagnosis JSON (:func:`diagnosis_to_model`).

Model-facing JSON differs from the Python objects in one way only: boxes are ``[x1, y1, x2, y2]``
integers in 0..1000 (``Box.to_model``); the Python objects keep pixel boxes.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.messages import HumanMessage

from .imaging.store import ImageRef
from .organs import OrganSpec
from .prompts import user_prompt
from .schemas import (
    Box,
    ClassificationResult,
    ClinicalContext,
    Detection,
    DetectorReport,
    Diagnosis,
    Evidence,
    Finding,
    ImageContext,
    KnowledgeResult,
)

#: Scheme of the image reference inside message content blocks; MLLM backends resolve it through
#: the ImageStore right before calling their model, so checkpoints never hold pixels.
IMAGE_URI_PREFIX = "echo-image://"


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def image_block(ref: ImageRef | str) -> dict[str, Any]:
    """A LangChain image content block that points at an image in the store."""
    image_id = ref if isinstance(ref, str) else ref["id"]
    return {"type": "image", "url": f"{IMAGE_URI_PREFIX}{image_id}", "mime_type": "image/png"}


def image_id_from_block(block: dict[str, Any]) -> str | None:
    url = block.get("url") if isinstance(block, dict) else None
    if isinstance(url, str) and url.startswith(IMAGE_URI_PREFIX):
        return url[len(IMAGE_URI_PREFIX) :]
    return None


def user_message(ref: ImageRef, organ: OrganSpec | None, clinical: ClinicalContext | None) -> HumanMessage:
    """The first user turn: the prompt text with the delimited clinical context, then the image."""
    return HumanMessage(content=[{"type": "text", "text": user_prompt(organ, clinical)}, image_block(ref)])


# -- tool results -> model-facing JSON ---------------------------------------------------------------
def report_to_model(report: DetectorReport) -> dict[str, Any]:
    w, h = report.image_width, report.image_height
    return {
        "evidence_id": report.id,
        "organ": report.organ,
        "score_threshold": report.score_threshold,
        "tta": report.tta,
        "region": report.region.to_model(w, h) if report.region else None,
        "candidates": [_candidate_to_model(d, w, h) for d in report.detections],
    }


def _candidate_to_model(d: Detection, w: int, h: int) -> dict[str, Any]:
    out: dict[str, Any] = {"id": d.id, "box": d.box.to_model(w, h), "label": d.label, "score": _r(d.score)}
    if d.class_scores:
        out["class_scores"] = {k: _r(v) for k, v in d.class_scores.items()}
    return out


def _descriptors_to_model(descs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, d in descs.items():
        v = d.value
        out[k] = {"value": _r(v) if isinstance(v, float) else v, "confidence": _r(d.confidence, 2)}
        if d.unit:
            out[k]["unit"] = d.unit
    return out


def context_to_model(ctx: ImageContext) -> dict[str, Any]:
    w, h = ctx.image_width, ctx.image_height
    return {
        "evidence_id": ctx.id,
        "caption": ctx.caption,
        "global": _descriptors_to_model(ctx.global_descriptors),
        "regions": [
            {
                "box": r.box.to_model(w, h),
                "detection_id": r.detection_id,
                "descriptors": _descriptors_to_model(r.descriptors),
                "caption": r.caption,
            }
            for r in ctx.regions
        ],
    }


def knowledge_to_model(res: KnowledgeResult) -> dict[str, Any]:
    return {
        "evidence_id": res.id,
        "query": res.query,
        "snippets": [
            {"id": s.id, "title": s.title, "passage": s.passage, "source": s.source, "score": _r(s.score)}
            for s in res.snippets
        ],
    }


def classification_to_model(res: ClassificationResult) -> dict[str, Any]:
    w, h = res.image_width, res.image_height
    return {
        "evidence_id": res.id,
        "regions": [
            {
                "box": r.box.to_model(w, h) if r.box is not None else "whole image",
                "detection_id": r.detection_id,
                "label": r.label,
                "probabilities": {k: _r(v) for k, v in r.probabilities.items()},
            }
            for r in res.regions
        ],
    }


def evidence_to_model(item: Evidence) -> dict[str, Any]:
    """Model-facing dict of any typed tool result."""
    if isinstance(item, ClassificationResult):
        return classification_to_model(item)
    if isinstance(item, DetectorReport):
        return report_to_model(item)
    if isinstance(item, ImageContext):
        return context_to_model(item)
    if isinstance(item, KnowledgeResult):
        return knowledge_to_model(item)
    raise TypeError(f"not an evidence item: {type(item).__name__}")


def dumps(data: Any) -> str:
    """Compact, deterministic JSON for message content."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=False)


# -- Diagnosis <-> model-facing JSON -----------------------------------------------------------------
def diagnosis_to_model(dx: Diagnosis) -> dict[str, Any]:
    """The final assistant turn's content: the Diagnosis with 0..1000 boxes."""
    w, h = dx.image_width, dx.image_height
    data = dx.model_dump(mode="json", exclude={"box", "probability", "review", "warnings", "reasoner", "image_id"})
    if w and h:
        data["findings"] = [
            {**f.model_dump(mode="json"), "box": f.box.to_model(w, h)} for f in dx.findings
        ]
    return data


def diagnosis_from_model(data: dict[str, Any] | str, width: int, height: int) -> Diagnosis:
    """Parse a model-written Diagnosis (0..1000 boxes) into a pixel-box Diagnosis (validated)."""
    if isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, dict):
        raise ValueError(f"a Diagnosis must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    data.pop("box", None)
    data.pop("probability", None)
    findings = []
    for f in data.get("findings") or []:
        f = dict(f)
        b = f.get("box")
        if isinstance(b, (list, tuple)):
            f["box"] = Box.from_model(b, width, height)
        findings.append(Finding.model_validate(f))
    data["findings"] = findings
    data["image_width"], data["image_height"] = width, height
    return Diagnosis.model_validate(data)
