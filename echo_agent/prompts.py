"""Prompts are data: they live in ``echo_agent/assets/prompts`` and are read once."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import yaml

from .organs import OrganSpec
from .schemas import ClinicalContext


@functools.cache
def read_prompt(name: str) -> str:
    """Text of a packaged prompt file (``system.md``, ``user.md``, ``tools.yaml`` ...)."""
    try:
        return (resources.files("echo_agent") / "assets" / "prompts" / name).read_text("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file {name!r} is missing from echo_agent/assets/prompts") from None


@functools.cache
def tool_texts() -> dict[str, dict[str, str]]:
    """Model-facing tool names and descriptions, keyed by tool kind."""
    return yaml.safe_load(read_prompt("tools.yaml"))


def tool_text(kind: str, organ: OrganSpec | None = None) -> tuple[str, str]:
    """(name, description) of a tool kind, filled for an organ."""
    entry = tool_texts()[kind]
    fill: dict[str, Any] = {}
    if organ is not None:
        fill = {"organ": organ.name, "labels": ", ".join(organ.detector_labels),
                "image_labels": ", ".join(organ.image_labels)}
    return entry["name"].format(**fill), " ".join(entry["description"].split()).format(**fill)


def system_prompt(organ: OrganSpec | None, max_tool_calls: int) -> str:
    organ_prompt = " ".join(organ.prompt.split()) if organ is not None else (
        "Organ: not yet known. Use the detector of the organ the image shows."
    )
    return read_prompt("system.md").format(max_tool_calls=max_tool_calls, organ_prompt=organ_prompt).strip()


def user_prompt(organ: OrganSpec | None, clinical: ClinicalContext | None) -> str:
    data = clinical.model_dump(exclude_none=True) if clinical is not None else {}
    # JSON keeps the context as data: quotes and newlines inside free text are escaped, so the text
    # cannot close the delimiter or pose as a new turn.
    clinical_json = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
    name = organ.name if organ is not None else "unknown-organ"
    return read_prompt("user.md").format(organ_name=name, clinical_json=clinical_json).strip()
