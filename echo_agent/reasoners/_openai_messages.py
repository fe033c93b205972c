"""Messages for OpenAI-compatible endpoints: the graph's messages rewritten into what the API
takes, and the Qwen-VL resizing rule (used by :mod:`.openai_compat` and :mod:`._openai_chat`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

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


__all__ = ["QWEN2_5_VL_PIXELS", "prepare_messages", "qwen_resized_size"]
