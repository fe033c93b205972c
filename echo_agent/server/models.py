"""Request and response models of the HTTP API (they define its OpenAPI schema).

The events inside a run are the library's own :mod:`echo_agent.events` objects, serialised with
``model_dump(mode="json")``: the page, the JSON API and ``EchoAgent.astream`` share one format.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..events import AgentEvent
from ..schemas import ClinicalContext, Diagnosis

#: Where a run is: the agent is working, it waits for a reviewer, it is finished, or it failed.
RunStatus = Literal["running", "pending-review", "done", "error"]

#: One typed stream event, discriminated by its ``type``.
Event = Annotated[AgentEvent, Field(discriminator="type")]


class ImageInfo(BaseModel):
    """Size and id of the uploaded image (pixels live in the server's image store)."""

    id: str
    width: int
    height: int
    source_kind: str | None = None


class RunSummary(BaseModel):
    """One run in a listing."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="Run id; also the LangGraph thread id of the checkpointed run.")
    status: RunStatus
    created_at: str
    updated_at: str
    filename: str | None = None
    organ: str | None = Field(None, description="Requested organ, or the routed one once known.")
    label: str | None = Field(None, description="Label of the current Diagnosis, once there is one.")


class RunState(RunSummary):
    """Everything known about one run: its events so far, the Diagnosis and where to find the rest."""

    context: ClinicalContext | None = None
    image: ImageInfo | None = None
    events: list[Event] = Field(default_factory=list)
    diagnosis: Diagnosis | None = Field(
        None,
        description="The agent's Diagnosis while the run waits for review; the reviewed one once done "
        "(its 'review' field then records who changed what, next to the agent's original).",
    )
    error: str | None = None
    overlay_url: str
    events_url: str
    review_url: str


class ErrorBody(BaseModel):
    """Every error answer: one sentence saying what was wrong and what to do."""

    detail: str
    error: str = Field(description="Name of the echo-agent error class (or 'HTTPException').")


class OrganInfo(BaseModel):
    """What the page needs to offer edits for one organ."""

    name: str
    display_name: str
    labels: list[str]
    category_system: str | None = None
    categories: list[str]
