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

:func:`agent_from_endpoint` builds the whole agent in one call::

    from echo_agent.reasoners.openai_compat import agent_from_endpoint
    agent = agent_from_endpoint("http://localhost:8000/v1", "Qwen/Qwen3-VL-8B-Instruct", organ="breast")
    dx = agent.run("lesion.png", context={"age": 52})
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from ..errors import MissingExtraError
from ..imaging.store import ImageStore, default_store
from ._multimodal import (
    answered_history,
    data_url,
    get_image,
    is_image_block,
    overlay_ref,
    resolve_image,
    text_of,
)
from .qwen_vl import BoxConvention

#: Default pixel bounds of the Qwen2.5-VL processor (as in its preprocessor_config.json).
QWEN2_5_VL_PIXELS = (56 * 56, 28 * 28 * 16384)


def qwen_resized_size(width: int, height: int, *, factor: int = 28,
                      min_pixels: int = QWEN2_5_VL_PIXELS[0], max_pixels: int = QWEN2_5_VL_PIXELS[1]) -> tuple[int, int]:
    """(width, height) a Qwen-VL processor resizes an image to: both sides multiples of ``factor``,
    the area within ``[min_pixels, max_pixels]``, the aspect ratio kept as closely as possible.

    >>> qwen_resized_size(160, 120, min_pixels=56 * 56, max_pixels=112 * 112)
    (112, 84)
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def prepare_messages(
    messages: Sequence[BaseMessage],
    *,
    store: ImageStore | None = None,
    images_in_tool_messages: bool = True,
    image_max_side: int | None = None,
    image_format: str = "PNG",
    convention: BoxConvention | None = None,
) -> list[BaseMessage]:
    """The graph's messages rewritten for an OpenAI-compatible endpoint (see the module docstring)."""
    store = store or default_store()
    out: list[BaseMessage] = []
    pending: list[tuple[str, dict[str, Any]]] = []  # overlays waiting for the end of a tool-message run
    conv = convention if convention is not None and convention.absolute else None

    def image_part(array: Any) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": data_url(array, image_max_side, image_format)}}

    def flush() -> None:
        if pending:
            parts: list[dict[str, Any]] = []
            for call_id, ref in pending:
                parts.append({"type": "text", "text": f"Detector overlay for tool call {call_id}:"})
                parts.append(image_part(get_image(ref, store)))
            out.append(HumanMessage(content=parts))
            pending.clear()

    for m in answered_history(messages):
        if not isinstance(m, ToolMessage):
            flush()
        if isinstance(m, HumanMessage) and isinstance(m.content, list):
            parts = [image_part(resolve_image(b, store)) if is_image_block(b) else b for b in m.content]
            m = m.model_copy(update={"content": parts})
        elif isinstance(m, ToolMessage):
            text = text_of(m.content)
            if conv is not None:
                text = conv.text_to_family(text)
            ref = overlay_ref(m)
            if ref is not None and images_in_tool_messages:
                m = m.model_copy(update={"content": [{"type": "text", "text": text}, image_part(get_image(ref, store))]})
            else:
                m = m.model_copy(update={"content": text})
                if ref is not None:
                    pending.append((m.tool_call_id, ref))
        elif isinstance(m, AIMessage) and conv is not None and m.tool_calls:
            calls = [{**c, "args": conv.args_to_family(c.get("args") or {})} for c in m.tool_calls]
            m = m.model_copy(update={"tool_calls": calls})
        elif isinstance(m, SystemMessage) and conv is not None:
            m = m.model_copy(update={"content": conv.system_text(text_of(m.content))})
        out.append(m)
    flush()
    return out


def echo_chat_openai_class() -> type:
    """The ``EchoChatOpenAI`` class (imports langchain-openai on first use; it is optional)."""
    try:
        from ._openai_chat import EchoChatOpenAI
    except ImportError as exc:
        if "langchain_openai" in str(exc) or "openai" in str(exc):
            raise MissingExtraError("langchain-openai", "vlm", "OpenAI-compatible endpoints") from None
        raise
    return EchoChatOpenAI


def __getattr__(name: str) -> Any:
    if name == "EchoChatOpenAI":
        return echo_chat_openai_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def agent_from_endpoint(
    base_url: str,
    model: str,
    *,
    api_key: str = "EMPTY",
    images_in_tool_messages: bool = True,
    llm_finalizer: bool | Literal["json_schema", "text"] = True,
    box_convention: Literal["relative1000", "absolute"] = "relative1000",
    chat_kwargs: dict[str, Any] | None = None,
    **agent_kwargs: Any,
) -> Any:
    """Build an :class:`echo_agent.EchoAgent` whose reasoner is the model served at ``base_url``.

    Args:
        base_url: the server's OpenAI-compatible root, e.g. ``'http://localhost:8000/v1'``.
        model: the served model name (``--served-model-name`` of vLLM).
        api_key: the server's key (``'EMPTY'`` for a local vLLM without one).
        images_in_tool_messages: ``False`` for servers that reject images inside tool messages; the
            detector overlay then follows the tool results in a user message.
        llm_finalizer: also ask the model for the final Diagnosis (structured output, validated,
            one repair, fusion fallback: :class:`~echo_agent.reasoners.llm_finalizer.LLMFinalizer`);
            ``'text'`` asks for JSON in plain text, for servers without JSON-schema output.
        box_convention: ``'absolute'`` for Qwen2.5-VL, ``'relative1000'`` (default) otherwise.
        chat_kwargs: more settings for :func:`chat_model_from_endpoint`.
        agent_kwargs: passed to :class:`EchoAgent` (``organ``, ``toolkit``, ``max_tool_calls``, ...).
    """
    from ..agent import EchoAgent
    from ..tools import Toolkit

    toolkit = agent_kwargs.pop("toolkit", None) or Toolkit()
    llm = chat_model_from_endpoint(
        base_url, model, api_key=api_key, images_in_tool_messages=images_in_tool_messages,
        box_convention=box_convention, image_store=toolkit.get_store(), **(chat_kwargs or {}),
    )
    if llm_finalizer and agent_kwargs.get("finalizer") is None:
        from .llm_finalizer import LLMFinalizer

        mode = llm_finalizer if isinstance(llm_finalizer, str) else "json_schema"
        agent_kwargs["finalizer"] = LLMFinalizer(llm, structured=mode)
    return EchoAgent(reasoner=llm, toolkit=toolkit, **agent_kwargs)


__all__ = [
    "QWEN2_5_VL_PIXELS",
    "agent_from_endpoint",
    "chat_model_from_endpoint",
    "echo_chat_openai_class",
    "prepare_messages",
    "qwen_resized_size",
]
