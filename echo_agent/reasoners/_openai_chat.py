"""``EchoChatOpenAI``: LangChain's ``ChatOpenAI`` for the graph's messages (imports langchain-openai).

Import it through :mod:`echo_agent.reasoners.openai_compat`, which loads this module only when an
endpoint model is built, so langchain-openai stays optional.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_openai import ChatOpenAI

from ..imaging.store import ImageStore, default_store
from ._multimodal import is_image_block, resolve_image, text_of
from ._openai_messages import QWEN2_5_VL_PIXELS, prepare_messages, qwen_resized_size
from .qwen_vl import BoxConvention
from .toolcall_parsing import parse_tool_calls


def _first_image_size(messages: Sequence[BaseMessage], store: ImageStore) -> tuple[int, int] | None:
    for m in messages:
        if isinstance(m, HumanMessage) and isinstance(m.content, list):
            for b in m.content:
                if is_image_block(b):
                    arr = resolve_image(b, store)
                    return int(arr.shape[1]), int(arr.shape[0])
    return None



class EchoChatOpenAI(ChatOpenAI):
    """``ChatOpenAI`` that understands the graph's image references and overlay artifacts.

    Extra fields: ``image_store``, ``images_in_tool_messages`` (default True), ``image_max_side``
    (downscale images before sending; boxes are relative, so this is safe), ``image_format``
    (``'PNG'`` or ``'JPEG'``), ``box_convention`` (``'relative1000'`` or ``'absolute'`` for
    Qwen2.5-VL) and ``server_pixels`` (the server processor's ``(min_pixels, max_pixels)``).
    """

    image_store: Any = None
    images_in_tool_messages: bool = True
    image_max_side: int | None = None
    image_format: str = "PNG"
    box_convention: Literal["relative1000", "absolute"] = "relative1000"
    server_pixels: tuple[int, int] = QWEN2_5_VL_PIXELS

    def _convention(self, messages: Sequence[BaseMessage]) -> BoxConvention | None:
        if self.box_convention != "absolute":
            return None
        size = _first_image_size(messages, self.image_store or default_store())
        if size is None:
            return None
        w, h = size
        if self.image_max_side and max(w, h) > self.image_max_side:
            s = self.image_max_side / max(w, h)
            w, h = max(1, round(w * s)), max(1, round(h * s))
        lo, hi = self.server_pixels
        return BoxConvention(True, qwen_resized_size(w, h, min_pixels=lo, max_pixels=hi))

    def _get_request_payload(self, input_: Any, *, stop: list[str] | None = None, **kwargs: Any) -> dict:
        messages = self._convert_input(input_).to_messages()
        conv = self._convention(messages)
        prepared = prepare_messages(
            messages, store=self.image_store, images_in_tool_messages=self.images_in_tool_messages,
            image_max_side=self.image_max_side, image_format=self.image_format, convention=conv,
        )
        return super()._get_request_payload(prepared, stop=stop, **kwargs)

    def _create_chat_result(self, response: Any, generation_info: dict | None = None) -> Any:
        return _fix_result(super()._create_chat_result(response, generation_info), None)

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        return _fix_result(super()._generate(messages, *args, **kwargs), self._convention(messages))

    async def _agenerate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        return _fix_result(await super()._agenerate(messages, *args, **kwargs), self._convention(messages))


def _fix_result(result: Any, conv: BoxConvention | None) -> Any:
    """Parse ``<tool_call>`` text the server left in ``content`` (once: calls already found are kept)
    and convert the calls' boxes from the family's convention (when ``conv`` is absolute)."""
    for gen in result.generations:
        msg = gen.message
        if not isinstance(msg, AIMessage):
            continue
        update: dict[str, Any] = {}
        text = text_of(msg.content)
        if not msg.tool_calls and not msg.invalid_tool_calls and ("<tool_call>" in text or "<function=" in text):
            parsed = parse_tool_calls(text, id_prefix=f"call_{uuid.uuid4().hex[:8]}")
            update.update(content=parsed.content, tool_calls=parsed.tool_calls,
                          invalid_tool_calls=parsed.invalid_tool_calls)
        calls = update.get("tool_calls", msg.tool_calls)
        if conv is not None and calls:
            update["tool_calls"] = [{**c, "args": conv.args_from_family(c.get("args") or {})} for c in calls]
        if update:
            gen.message = msg.model_copy(update=update)
    return result


__all__ = ["EchoChatOpenAI"]
