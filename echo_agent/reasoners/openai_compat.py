"""Any OpenAI-compatible chat endpoint (vLLM, SGLang, Ollama, LM Studio, a hosted API) as the reasoner.

Needs ``langchain-openai`` (in the ``vlm`` extra). The endpoint must speak the chat-completions API
with tools; vLLM needs ``--enable-auto-tool-choice --tool-call-parser hermes`` for Qwen models
(see ``docs/mllm.md``).

:class:`EchoChatOpenAI` is LangChain's ``ChatOpenAI`` plus what the graph's messages need:

* ``echo-image://`` image blocks are resolved through the image store and sent as base64 data URLs
  (the graph state itself never holds pixels);
* the detector's overlay image (``ToolMessage.artifact['overlay']``) is sent inside the tool message,
  or, for servers that reject images in tool messages (``images_in_tool_messages=False``), in a user
  message right after the tool results;
* assistant tool calls that never got an answer (a run stopped on its turn limit) are dropped, as
  the API requires;
* a reply whose tool calls the server did not parse (``<tool_call>`` text in ``content``: a server
  started without a tool-call parser) is parsed on the client with
  :func:`~echo_agent.reasoners.toolcall_parsing.parse_tool_calls`;
* ``box_convention='absolute'`` serves Qwen2.5-VL, whose boxes are pixels of the image as the server
  resized it (computed with the Qwen resizing rule and the server's pixel bounds).

:meth:`echo_agent.EchoAgent.from_endpoint` builds the whole agent in one call::

    from echo_agent import EchoAgent
    agent = EchoAgent.from_endpoint("http://localhost:8000/v1", "Qwen/Qwen3-VL-8B-Instruct", organ="breast")
    dx = agent.run("lesion.png", context={"age": 52})
"""

from __future__ import annotations

from typing import Any, Literal

from ..errors import MissingExtraError
from ..imaging.store import ImageStore
from ._openai_messages import QWEN2_5_VL_PIXELS, prepare_messages, qwen_resized_size


def echo_chat_openai_class() -> type:
    """The ``EchoChatOpenAI`` class (imports langchain-openai on first use; it is optional)."""
    try:
        from ._openai_chat import EchoChatOpenAI
    except ImportError as exc:
        if "langchain_openai" in str(exc) or "openai" in str(exc):
            raise MissingExtraError("langchain-openai", "vlm", "OpenAI-compatible endpoints") from None
        raise
    return EchoChatOpenAI


def chat_model_from_endpoint(
    base_url: str,
    model: str,
    *,
    api_key: str = "EMPTY",
    images_in_tool_messages: bool = True,
    box_convention: Literal["relative1000", "absolute"] = "relative1000",
    image_store: ImageStore | None = None,
    temperature: float = 0.0,
    max_tokens: int | None = 1024,
    timeout: float | None = 120.0,
    max_retries: int = 2,
    **chat_kwargs: Any,
) -> Any:
    """An :class:`EchoChatOpenAI` for ``base_url`` (e.g. ``'http://localhost:8000/v1'``) and ``model``.

    Greedy decoding (``temperature=0``) by default so runs are reproducible; ``chat_kwargs`` go to
    ``ChatOpenAI`` (e.g. ``model_kwargs``, ``default_headers``, ``image_max_side=1024``).
    """
    cls = echo_chat_openai_class()
    return cls(
        base_url=base_url, model=model, api_key=api_key, temperature=temperature, max_tokens=max_tokens,
        timeout=timeout, max_retries=max_retries, image_store=image_store,
        images_in_tool_messages=images_in_tool_messages, box_convention=box_convention,
        disable_streaming=box_convention == "absolute",  # boxes are converted on whole replies
        **chat_kwargs,
    )


def __getattr__(name: str) -> Any:
    if name == "EchoChatOpenAI":
        return echo_chat_openai_class()
    # ``agent_from_endpoint`` builds an agent, which lives a layer above the chat models: it is
    # :meth:`echo_agent.EchoAgent.from_endpoint` now, resolved lazily here for old imports.
    if name == "agent_from_endpoint":
        import importlib

        return importlib.import_module("echo_agent.agent").agent_from_endpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "QWEN2_5_VL_PIXELS",
    "chat_model_from_endpoint",
    "echo_chat_openai_class",
    "prepare_messages",
    "qwen_resized_size",
]
