"""Typed stream events: the same objects feed the CLI, the web page and the server."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schemas import Diagnosis, Evidence


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(0, description="Index of the event within the run.")


class PerceivedEvent(_Event):
    """The image was loaded and routed to an organ."""

    type: Literal["perceived"] = "perceived"
    organ: str
    organ_confidence: float | None = None
    image_width: int
    image_height: int


class ReasonerEvent(_Event):
    """The reasoner spoke: its text and the tool calls it asked for."""

    type: Literal["reasoner"] = "reasoner"
    text: str = ""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ToolCalledEvent(_Event):
    """A tool call is about to run."""

    type: Literal["tool_called"] = "tool_called"
    name: str
    args: dict[str, Any]
    call_id: str


class EvidenceEvent(_Event):
    """A tool returned typed evidence."""

    type: Literal["evidence"] = "evidence"
    name: str
    call_id: str
    evidence: Evidence = Field(discriminator="kind")


class ToolErrorEvent(_Event):
    """A tool call failed; the reasoner sees the error message and may try again."""

    type: Literal["tool_error"] = "tool_error"
    name: str
    call_id: str
    error: str


class ReviewRequestedEvent(_Event):
    """The run paused for human review (resume it with the reviewer's decision)."""

    type: Literal["review_requested"] = "review_requested"
    thread_id: str | None = None
    diagnosis: Diagnosis


class DiagnosisEvent(_Event):
    """The final Diagnosis."""

    type: Literal["diagnosis"] = "diagnosis"
    diagnosis: Diagnosis


AgentEvent = (
    PerceivedEvent
    | ReasonerEvent
    | ToolCalledEvent
    | EvidenceEvent
    | ToolErrorEvent
    | ReviewRequestedEvent
    | DiagnosisEvent
)

__all__ = [
    "AgentEvent",
    "DiagnosisEvent",
    "EvidenceEvent",
    "PerceivedEvent",
    "ReasonerEvent",
    "ReviewRequestedEvent",
    "ToolCalledEvent",
    "ToolErrorEvent",
]
