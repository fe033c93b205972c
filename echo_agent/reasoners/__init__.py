"""Chat models that drive the graph (the evidence fusion is :mod:`echo_agent.fusion`; its names
stay importable from here).

``QwenVLChatModel`` (``vlm`` extra) and the OpenAI-compatible helpers load lazily, so importing this
package never pulls torch, transformers or langchain-openai.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..fusion import Fusion, HeuristicFusion, LearnedFusion
from .llm_finalizer import LLMFinalizer
from .policy import EmbeddedPolicy
from .toolcall_parsing import ParseResult, parse_tool_calls

_LAZY = {
    "QwenVLChatModel": ".qwen_vl",
    "agent_from_endpoint": "echo_agent.agent",  # EchoAgent.from_endpoint; an agent is a layer above
    "chat_model_from_endpoint": ".openai_compat",
    "EchoChatOpenAI": ".openai_compat",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EchoChatOpenAI",
    "EmbeddedPolicy",
    "Fusion",
    "HeuristicFusion",
    "LLMFinalizer",
    "LearnedFusion",
    "ParseResult",
    "QwenVLChatModel",
    "agent_from_endpoint",
    "chat_model_from_endpoint",
    "parse_tool_calls",
]
