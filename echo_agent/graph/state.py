"""Graph state. Everything in it is JSON-serialisable so any checkpointer (memory, SQLite,
Postgres, a LangGraph server) can persist it: pixels live in the ImageStore, typed evidence is
stored as dicts and rebuilt with :func:`typed_evidence`."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Annotated, Any

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict

from ..imaging.store import ImageRef
from ..schemas import ClinicalContext, Diagnosis, Evidence, parse_evidence


class EchoInput(TypedDict, total=False):
    """What a caller (or a parent graph) passes in. Give ``image`` (a stored reference) or
    ``image_path``; ``organ`` is optional (routed when absent); ``clinical`` is a ClinicalContext dict."""

    image: ImageRef
    image_path: str
    organ: str | None
    clinical: dict[str, Any] | None


class EchoState(EchoInput, total=False):
    """Full state of one run."""

    organ_confidence: float | None
    messages: Annotated[list[AnyMessage], add_messages]
    evidence: Annotated[list[dict[str, Any]], operator.add]
    tool_calls_used: int
    diagnosis: dict[str, Any] | None
    warnings: Annotated[list[str], operator.add]
    #: Why the image failed the usability check of an explicitly given organ (None: it passed or
    #: was not checked); the reason node then marks the Diagnosis indeterminate.
    image_check: str | None


class EchoOutput(TypedDict, total=False):
    """What a run returns to its caller."""

    image: ImageRef
    organ: str | None
    messages: list[AnyMessage]
    evidence: list[dict[str, Any]]
    tool_calls_used: int
    diagnosis: dict[str, Any] | None
    warnings: list[str]


@dataclass
class EchoRunContext:
    """Run-scoped settings (LangGraph ``context_schema``): pass ``context=EchoRunContext(...)``.

    Attributes:
        max_tool_calls: overrides the graph's tool-call budget for this run.
        reviewer: id of the human reviewer for this run (recorded in the Diagnosis when review is on).
    """

    max_tool_calls: int | None = None
    reviewer: str | None = None


def typed_evidence(state: dict[str, Any]) -> list[Evidence]:
    """The state's evidence as typed objects (DetectorReport, ImageContext, KnowledgeResult)."""
    return [parse_evidence(e) for e in state.get("evidence") or []]


def clinical_of(state: dict[str, Any]) -> ClinicalContext | None:
    c = state.get("clinical")
    if not c:
        return None
    return c if isinstance(c, ClinicalContext) else ClinicalContext.model_validate(c)


def diagnosis_of(state: dict[str, Any]) -> Diagnosis | None:
    d = state.get("diagnosis")
    if d is None:
        return None
    return d if isinstance(d, Diagnosis) else Diagnosis.model_validate(d)
