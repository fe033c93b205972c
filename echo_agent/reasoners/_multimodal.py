"""Shared plumbing of the MLLM backends: resolving image blocks, overlay images, history hygiene.

Graph state never holds pixels: image content blocks are ``{"type": "image", "url":
"echo-image://<id>"}`` and the detector's overlay is an :class:`ImageRef` in a ToolMessage's
``artifact``. A backend resolves both through the :class:`ImageStore` right before it calls its
model; these helpers do that in one place for the local (transformers) and the endpoint backends.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from ..errors import EchoInputError
from ..imaging.store import ImageStore, default_store
from ..messages import image_id_from_block


def is_image_block(block: Any) -> bool:
    """True for LangChain / OpenAI image content blocks."""
    return isinstance(block, dict) and block.get("type") in ("image", "image_url")


def resolve_image(block: dict[str, Any], store: ImageStore | None = None) -> np.ndarray:
    """Pixels (HxWx3 uint8 RGB) of an image content block.

    Understands ``echo-image://<id>`` references (looked up in ``store``, default: the process-wide
    store), ``data:`` URLs, LangChain ``base64`` blocks and OpenAI ``image_url`` blocks. Remote URLs
    are refused: the agent never fetches images from the network.
    """
    url = block.get("url")
    if block.get("type") == "image_url":
        inner = block.get("image_url")
        url = inner.get("url") if isinstance(inner, dict) else inner
    image_id = image_id_from_block({"url": url}) if isinstance(url, str) else None
    if image_id is not None:
        return get_image(image_id, store)
    data: bytes | None = None
    try:
        if isinstance(url, str) and url.startswith("data:"):
            data = base64.b64decode(url.split(",", 1)[1])
        elif isinstance(block.get("base64"), str):
            data = base64.b64decode(block["base64"])
    except (binascii.Error, IndexError) as exc:
        raise EchoInputError(f"an image content block holds invalid base64 data ({exc}); re-encode the image") from None
    if data is None:
        raise EchoInputError(
            f"cannot resolve image block {str(url)[:80]!r}: use an echo-image:// reference, a data: URL or base64 "
            "(remote URLs are not fetched)"
        )
    from ..imaging import load_image

    return load_image(data).array


def get_image(ref: dict[str, Any] | str, store: ImageStore | None = None) -> np.ndarray:
    """Pixels of a stored image, with a hint when the reasoner looks in the wrong store."""
    try:
        return (store or default_store()).get(ref)
    except EchoInputError as exc:
        raise EchoInputError(
            f"{exc}. If the agent uses its own Toolkit(store=...), give the reasoner the same store "
            "(image_store=toolkit.get_store())"
        ) from None


def to_pil(array: np.ndarray, max_side: int | None = None) -> Any:
    """PIL image of a canonical array, optionally shrunk so its longer side is at most ``max_side``."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(array))
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return img


def data_url(array: np.ndarray, max_side: int | None = None, fmt: str = "PNG") -> str:
    """``data:image/png;base64,...`` URL of a canonical array (JPEG with ``fmt='JPEG'``)."""
    buf = io.BytesIO()
    to_pil(array, max_side).save(buf, format=fmt)
    mime = "image/jpeg" if fmt.upper() in ("JPEG", "JPG") else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def overlay_ref(msg: ToolMessage) -> dict[str, Any] | None:
    """The detector overlay ImageRef of a tool message, if it has one."""
    art = getattr(msg, "artifact", None)
    ref = art.get("overlay") if isinstance(art, dict) else None
    return ref if isinstance(ref, dict) and ref.get("id") else None


def answered_history(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """The conversation with tool calls that never got an answer removed.

    The graph can stop on a turn limit right after an assistant turn with tool calls; chat APIs
    (and chat templates) reject an assistant tool call that has no tool message after it.
    """
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    out: list[BaseMessage] = []
    for m in messages:
        if isinstance(m, AIMessage) and m.tool_calls and any(c.get("id") not in answered for c in m.tool_calls):
            kept = [c for c in m.tool_calls if c.get("id") in answered]
            m = m.model_copy(update={"tool_calls": kept, "invalid_tool_calls": []})
            if not kept and not m.content:
                continue
        out.append(m)
    return out


def text_of(content: Any) -> str:
    """Plain text of a message's content (string, or the text blocks of a block list)."""
    if isinstance(content, str):
        return content
    parts = []
    for b in content or []:
        if isinstance(b, str):
            parts.append(b)
        elif isinstance(b, dict) and b.get("type") == "text":
            parts.append(str(b.get("text", "")))
    return "".join(parts)
