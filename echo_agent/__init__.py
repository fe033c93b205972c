"""echo-agent: an invoke-and-reason agent for ultrasound diagnosis.

The public surface is small; everything else is reachable but not advertised::

    from echo_agent import EchoAgent
    dx = EchoAgent().run("breast.png", context={"age": 52, "symptoms": "palpable lump"})
    print(dx.label, dx.probability, dx.box, dx.rationale)

Names are imported lazily so ``import echo_agent`` stays fast (LangGraph alone takes ~0.6 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "EchoAgent": "echo_agent.agent",
    "AgentConfig": "echo_agent.config",
    "EndpointReasoner": "echo_agent.config",
    "ReviewTicket": "echo_agent.agent",
    "build_graph": "echo_agent.graph",
    "EchoRunContext": "echo_agent.graph",
    "ReviewDecision": "echo_agent.graph",
    "Toolkit": "echo_agent.tools",
    "make_tools": "echo_agent.tools",
    "EmbeddedPolicy": "echo_agent.reasoners",
    "QwenVLChatModel": "echo_agent.reasoners",
    "agent_from_endpoint": "echo_agent.agent",
    "OrganSpec": "echo_agent.organs",
    "CategoryBand": "echo_agent.organs",
    "register_organ": "echo_agent.organs",
    "get_organ": "echo_agent.organs",
    "list_organs": "echo_agent.organs",
    "load_image": "echo_agent.imaging",
    "example_image": "echo_agent.imaging",
    "Box": "echo_agent.schemas",
    "Detection": "echo_agent.schemas",
    "DetectorReport": "echo_agent.schemas",
    "ImageContext": "echo_agent.schemas",
    "KnowledgeSnippet": "echo_agent.schemas",
    "ClinicalContext": "echo_agent.schemas",
    "Diagnosis": "echo_agent.schemas",
    "EchoError": "echo_agent.errors",
    "EchoInputError": "echo_agent.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'echo_agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from .agent import EchoAgent, ReviewTicket, agent_from_endpoint
    from .config import AgentConfig, EndpointReasoner
    from .errors import EchoError, EchoInputError
    from .graph import EchoRunContext, ReviewDecision, build_graph
    from .imaging import example_image, load_image
    from .organs import CategoryBand, OrganSpec, get_organ, list_organs, register_organ
    from .reasoners import EmbeddedPolicy, QwenVLChatModel
    from .schemas import (
        Box,
        ClinicalContext,
        Detection,
        DetectorReport,
        Diagnosis,
        ImageContext,
        KnowledgeSnippet,
    )
    from .tools import Toolkit, make_tools
