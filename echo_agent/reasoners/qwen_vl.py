"""``QwenVLChatModel``: a local Qwen2.5-VL or Qwen3-VL checkpoint (transformers) as the reasoner.

Needs the ``vlm`` extra (``pip install 'echo-agent[vlm]'``); torch, transformers and peft are
imported when the model is first used, never at import time.

The model sees the same conversation as every other reasoner (system prompt, user turn with the
image and the delimited clinical context, assistant tool calls, tool results), rendered through the
checkpoint's own chat template with the bound tools (``apply_chat_template(..., tools=...)``). Qwen2.5-VL
ships a template that does not render tools; for such templates the tools, tool calls and tool
results are written in the Hermes ``<tool_call>`` / ``<tool_response>`` format the Qwen models were
trained on (the text is the packaged prompt ``tool_calling.md``). Replies are parsed with
:func:`echo_agent.reasoners.toolcall_parsing.parse_tool_calls`; unreadable calls become
``invalid_tool_calls`` which the graph answers with an error.

Box conventions differ per family and are handled by :class:`BoxConvention` only: Qwen3-VL (and
Qwen2-VL) use 0..1000 like the rest of echo-agent; Qwen2.5-VL uses absolute pixels of the image as
the processor resized it.

Example::

    from echo_agent import EchoAgent
    from echo_agent.reasoners.qwen_vl import QwenVLChatModel

    llm = QwenVLChatModel(model_path="/models/Qwen3-VL-8B-Instruct", max_new_tokens=512)
    dx = EchoAgent(reasoner=llm, organ="breast").run("lesion.png")
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

from ..errors import MissingExtraError, ModelLoadError
from ..prompts import read_prompt
from ._multimodal import get_image, is_image_block, overlay_ref, resolve_image, text_of, to_pil
from .toolcall_parsing import parse_tool_calls

#: Model families whose boxes are absolute pixels of the processor-resized image.
ABSOLUTE_BOX_FAMILIES = frozenset({"qwen2_5_vl"})
#: Keys whose value is one box ``[x1, y1, x2, y2]`` in tool arguments, tool results and diagnoses.
BOX_KEYS = frozenset({"box", "region", "bbox_2d", "bbox"})
#: Keys whose value is a list of boxes.
BOX_LIST_KEYS = frozenset({"regions", "boxes"})

_CONVENTION_SENTENCE = "Boxes are [x1, y1, x2, y2] integers from 0 to 1000, relative to the image width and height."


def _is_box(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 4 and all(
        isinstance(c, (int, float)) and not isinstance(c, bool) for c in v
    )


def map_boxes(data: Any, fn: Callable[[list[float]], list[int]]) -> Any:
    """A copy of a JSON-like structure with ``fn`` applied to every box under a box key."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if k in BOX_KEYS and _is_box(v):
                out[k] = fn(list(v))
            elif k in BOX_LIST_KEYS and isinstance(v, list) and v and all(_is_box(b) for b in v):
                out[k] = [fn(list(b)) for b in v]
            else:
                out[k] = map_boxes(v, fn)
        return out
    if isinstance(data, list):
        return [map_boxes(v, fn) for v in data]
    return data


class BoxConvention:
    """Converts boxes between echo-agent's 0..1000 convention and a model family's own.

    ``absolute=False`` (Qwen3-VL, Qwen2-VL): the family already uses 0..1000, nothing changes.
    ``absolute=True`` (Qwen2.5-VL): the family reads and writes pixels of the image *as the processor
    resized it* (``resized_size = (width, height)``).

    >>> c = BoxConvention(absolute=True, resized_size=(200, 100))
    >>> c.to_family([100, 200, 600, 700])
    [20, 20, 120, 70]
    >>> c.from_family([20, 20, 120, 70])
    [100, 200, 600, 700]
    """

    def __init__(self, absolute: bool, resized_size: tuple[int, int] | None = None) -> None:
        if absolute and not resized_size:
            raise ValueError("an absolute-pixel box convention needs the resized image size")
        self.absolute = absolute
        self.resized_size = resized_size

    def to_family(self, box: Sequence[float]) -> list[int]:
        if not self.absolute:
            return [int(round(float(c))) for c in box]
        w, h = self.resized_size  # type: ignore[misc]
        x1, y1, x2, y2 = (float(c) for c in box)
        return [round(x1 * w / 1000), round(y1 * h / 1000), round(x2 * w / 1000), round(y2 * h / 1000)]

    def from_family(self, box: Sequence[float]) -> list[int]:
        def clamp(v: float) -> int:
            return int(min(max(round(v), 0), 1000))

        if not self.absolute:
            return [clamp(float(c)) for c in box]
        w, h = self.resized_size  # type: ignore[misc]
        x1, y1, x2, y2 = (float(c) for c in box)
        return [clamp(x1 * 1000 / w), clamp(y1 * 1000 / h), clamp(x2 * 1000 / w), clamp(y2 * 1000 / h)]

    def args_to_family(self, data: Any) -> Any:
        return data if not self.absolute else map_boxes(data, self.to_family)

    def args_from_family(self, data: Any) -> Any:
        return map_boxes(data, self.from_family)

    def text_to_family(self, text: str) -> str:
        """Convert the boxes of a JSON text (a tool result); non-JSON text is returned unchanged."""
        if not self.absolute:
            return text
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            return text
        return json.dumps(self.args_to_family(data), ensure_ascii=False, separators=(",", ":"))

    def system_text(self, text: str) -> str:
        """The system prompt with its box-convention sentence replaced by this family's."""
        if not self.absolute:
            return text
        return f"{text.replace(_CONVENTION_SENTENCE, '').rstrip()}\n\n{self.system_note()}"

    def system_note(self) -> str:
        if not self.absolute:
            return ""
        w, h = self.resized_size  # type: ignore[misc]
        return read_prompt("box_convention_absolute.md").format(width=w, height=h).strip()


def family_of(model_type: str) -> str:
    """Normalised family name of a transformers ``model_type`` (``qwen2_5_vl``, ``qwen3_vl`` ...)."""
    return model_type.removesuffix("_moe").removesuffix("_text")


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders a ``tools`` list (Qwen3-VL's does, Qwen2.5-VL's does not)."""
    return bool(chat_template) and "tools" in chat_template  # type: ignore[operator]


class QwenVLChatModel(BaseChatModel):
    """A local Qwen-VL checkpoint as a LangChain chat model with tool calling.

    Args:
        model_path: checkpoint directory (or hub id when the cache has it; the agent never downloads
            on its own: set ``HF_HUB_OFFLINE=1``). With only ``adapter_path`` given, the base model
            named in the adapter's config is used.
        adapter_path: a PEFT LoRA adapter directory applied on top of the base model.
        merge_adapter: merge the LoRA weights into the base model after loading (faster generation).
        family: ``'auto'`` (read from the checkpoint config), ``'qwen2_5_vl'``, ``'qwen3_vl'`` ...
        box_convention: ``'auto'`` (by family), ``'absolute'`` (Qwen2.5-VL pixels of the resized
            image) or ``'relative1000'`` (Qwen3-VL).
        max_new_tokens, temperature, do_sample, top_p, repetition_penalty: generation settings
            (greedy decoding by default, so runs are reproducible).
        seed: seeds torch before each sampled generation (``do_sample=True``).
        device: ``'auto'`` (CUDA when available), ``'cpu'``, ``'cuda'``, ``'cuda:1'`` ...
        dtype: ``'auto'`` (bfloat16 on GPU, float32 on CPU), ``'bfloat16'``, ``'float16'``, ``'float32'``.
        attn_implementation: passed to ``from_pretrained`` (e.g. ``'sdpa'``, ``'flash_attention_2'``).
        min_pixels / max_pixels: image resolution bounds of the processor (visual token budget).
        images_in_tool_messages: show the detector's overlay image inside the tool turn.
        image_store: where ``echo-image://`` references are resolved (default: the process-wide store;
            pass ``toolkit.get_store()`` when the agent uses its own store).
        trust_remote_code: forwarded to transformers (off by default).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model_path: str | None = None
    adapter_path: str | None = None
    merge_adapter: bool = False
    family: str = "auto"
    box_convention: Literal["auto", "absolute", "relative1000"] = "auto"
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    do_sample: bool = False
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    images_in_tool_messages: bool = True
    image_store: Any = None
    trust_remote_code: bool = False

    _model: Any = PrivateAttr(default=None)
    _processor: Any = PrivateAttr(default=None)
    _family: str | None = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)
    _resized_cache: dict[tuple[int, int], tuple[int, int]] = PrivateAttr(default_factory=dict)
    _enforcer_data: Any = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "echo-qwen-vl"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path, "adapter_path": self.adapter_path, "family": self.family,
            "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "do_sample": self.do_sample,
        }

    # -- loading -------------------------------------------------------------------------------------
    def _torch_setup(self) -> tuple[Any, str, Any]:
        try:
            import torch
        except ImportError:
            raise MissingExtraError("torch", "vlm", "the local Qwen-VL reasoner") from None
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, self.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ModelLoadError(f"unknown dtype {self.dtype!r}; use 'auto', 'bfloat16', 'float16' or 'float32'")
        return torch, device, dtype

    def load(self) -> QwenVLChatModel:
        """Load the processor and the weights now (otherwise done on the first call)."""
        with self._lock:
            if self._model is not None:
                return self
            try:
                import transformers
            except ImportError:
                raise MissingExtraError("transformers", "vlm", "the local Qwen-VL reasoner") from None
            from .lite_vision import try_register

            try_register()  # checkpoints whose vision side is a pretrained EfficientNet-Lite
            torch, device, dtype = self._torch_setup()
            base = self.model_path
            if self.adapter_path and not base:
                cfg_file = Path(self.adapter_path) / "adapter_config.json"
                if not cfg_file.exists():
                    raise ModelLoadError(f"no adapter_config.json in {self.adapter_path}; give model_path= as well")
                base = json.loads(cfg_file.read_text("utf-8")).get("base_model_name_or_path")
            if not base:
                raise ModelLoadError("QwenVLChatModel needs model_path= (a checkpoint directory) or adapter_path=")
            kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": self.trust_remote_code}
            if self.attn_implementation:
                kwargs["attn_implementation"] = self.attn_implementation
            if device.startswith("cuda"):
                kwargs["device_map"] = device  # load straight onto the GPU (needs accelerate)
            try:
                model = transformers.AutoModelForImageTextToText.from_pretrained(base, **kwargs)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(
                    f"could not load a Qwen-VL checkpoint from {base!r} ({exc}); give the path of a local "
                    "Qwen2.5-VL / Qwen3-VL checkpoint directory"
                ) from exc
            proc_src = base
            if self.adapter_path:
                try:
                    from peft import PeftModel
                except ImportError:
                    raise MissingExtraError("peft", "vlm", "loading a LoRA adapter") from None
                model = PeftModel.from_pretrained(model, self.adapter_path)
                if self.merge_adapter:
                    model = model.merge_and_unload()
                # transformers 5 saves processor_config.json, older versions preprocessor_config.json
                if any((Path(self.adapter_path) / n).exists() for n in ("processor_config.json", "preprocessor_config.json")):
                    proc_src = self.adapter_path
            proc_kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
            if self.min_pixels is not None:
                proc_kwargs["min_pixels"] = self.min_pixels
            if self.max_pixels is not None:
                proc_kwargs["max_pixels"] = self.max_pixels
            try:
                processor = transformers.AutoProcessor.from_pretrained(proc_src, **proc_kwargs)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"could not load the processor from {proc_src!r} ({exc})") from exc
            if not device.startswith("cuda"):
                model.to(device)
            model.eval()
            cfg = getattr(model, "config", None)
            model_type = getattr(cfg, "model_type", "") or ""
            self._family = family_of(model_type) if self.family == "auto" else self.family
            self._processor = processor
            self._model = model
        return self

    @property
    def resolved_family(self) -> str:
        """The model family (loads the model if needed)."""
        self.load()
        return str(self._family)

    @property
    def absolute_boxes(self) -> bool:
        if self.box_convention != "auto":
            return self.box_convention == "absolute"
        return self.resolved_family in ABSOLUTE_BOX_FAMILIES

    # -- tools ---------------------------------------------------------------------------------------
    def bind_tools(  # type: ignore[override]
        self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any
    ) -> Runnable[Any, AIMessage]:
        """Bind tools (LangChain tools, pydantic models, functions or OpenAI tool dicts).

        ``tool_choice`` cannot be enforced on a local model and is ignored.
        """
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    # -- constrained decoding ------------------------------------------------------------------------
    def with_structured_output(  # type: ignore[override]
        self, schema: Any, *, method: str = "json_schema", include_raw: bool = False, **kwargs: Any
    ) -> Runnable[Any, Any]:
        """Constrained decoding: every generated token keeps the reply a prefix of a JSON document
        valid under ``schema`` (a JSON-schema dict; needs ``lm-format-enforcer``, in the ``vlm``
        extra). Returns the parsed dict, or ``{"raw": AIMessage, "parsed": dict | None,
        "parsing_error": Exception | None}`` with ``include_raw``. A reply cut by ``max_new_tokens``
        is a valid prefix, not a document: ``parsed`` is then ``None``.

        Only ``method='json_schema'`` with a dict schema is supported.
        """
        if method != "json_schema" or not isinstance(schema, dict):
            raise ValueError("QwenVLChatModel supports with_structured_output(method='json_schema') with a "
                             f"JSON-schema dict only, got method={method!r} and a {type(schema).__name__}")
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")

        def parse(msg: AIMessage) -> Any:
            try:
                parsed, error = json.loads(text_of(msg.content)), None
            except ValueError as exc:
                parsed, error = None, exc
            return {"raw": msg, "parsed": parsed, "parsing_error": error} if include_raw else parsed

        return self.bind(json_schema=schema) | RunnableLambda(parse)

    def _json_constraint(self, schema: dict[str, Any]) -> Any:
        """A ``prefix_allowed_tokens_fn`` for ``generate`` that enforces ``schema`` (boxes in the
        family's convention: the 0..1000 bounds are dropped for absolute-pixel families)."""
        from ._constrained import prefix_allowed_tokens_fn, tokenizer_data

        if self.absolute_boxes:
            schema = _drop_box_bounds(schema)
        if self._enforcer_data is None:  # the vocabulary's prefix tree, built once per model
            cfg = getattr(self._model, "generation_config", None)
            self._enforcer_data = tokenizer_data(self._processor.tokenizer, getattr(cfg, "eos_token_id", None))
        return prefix_allowed_tokens_fn(self._enforcer_data, schema)

    # -- rendering -----------------------------------------------------------------------------------
    def _resized_size(self, image: Any) -> tuple[int, int]:
        """(width, height) the processor resizes an image to (exact: read from its patch grid)."""
        key = tuple(image.size)
        if key in self._resized_cache:
            return self._resized_cache[key]
        ip = self._processor.image_processor
        out = ip(images=[image], return_tensors="pt")
        _, gh, gw = (int(v) for v in out["image_grid_thw"][0])
        patch = int(getattr(ip, "patch_size", 14))
        size = (gw * patch, gh * patch)
        self._resized_cache[key] = size
        return size

    def render(
        self, messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]] | None = None
    ) -> tuple[str, list[Any], BoxConvention]:
        """The prompt text, the images (PIL, in order) and the box convention for a conversation.

        Public so the SFT curriculum and tests can see exactly what the model sees.
        """
        self.load()
        store = self.image_store
        images: list[Any] = []
        hf: list[dict[str, Any]] = []

        def add_image(block: dict[str, Any] | None, ref: dict[str, Any] | None = None) -> dict[str, Any]:
            arr = get_image(ref, store) if ref is not None else resolve_image(block or {}, store)
            images.append(to_pil(arr))
            return {"type": "image"}

        for m in messages:
            if isinstance(m, SystemMessage):
                hf.append({"role": "system", "content": [{"type": "text", "text": text_of(m.content)}]})
            elif isinstance(m, HumanMessage):
                content = m.content if isinstance(m.content, list) else [{"type": "text", "text": m.content}]
                blocks = []
                for b in content:
                    if is_image_block(b):
                        blocks.append(add_image(b))
                    elif isinstance(b, dict) and b.get("type") == "text":
                        blocks.append({"type": "text", "text": b.get("text", "")})
                    elif isinstance(b, str):
                        blocks.append({"type": "text", "text": b})
                hf.append({"role": "user", "content": blocks})
            elif isinstance(m, AIMessage):
                entry: dict[str, Any] = {"role": "assistant", "content": text_of(m.content)}
                if m.tool_calls:
                    entry["tool_calls"] = [
                        {"type": "function", "function": {"name": c["name"], "arguments": c.get("args") or {}}}
                        for c in m.tool_calls
                    ]
                hf.append(entry)
            elif isinstance(m, ToolMessage):
                blocks = [{"type": "text", "text": text_of(m.content)}]
                ref = overlay_ref(m)
                if ref is not None and self.images_in_tool_messages:
                    blocks.append(add_image(None, ref))
                hf.append({"role": "tool", "content": blocks})
        absolute = self.absolute_boxes
        if absolute and images:
            conv = BoxConvention(True, self._resized_size(images[0]))
        else:
            conv = BoxConvention(False)
        if conv.absolute:
            for e in hf:
                if e["role"] == "tool":
                    e["content"][0]["text"] = conv.text_to_family(e["content"][0]["text"])
                elif e["role"] == "assistant" and e.get("tool_calls"):
                    for c in e["tool_calls"]:
                        c["function"]["arguments"] = conv.args_to_family(c["function"]["arguments"])
                elif e["role"] == "system":
                    e["content"][0]["text"] = conv.system_text(e["content"][0]["text"])
        template = getattr(self._processor, "chat_template", None)
        if tools and not template_renders_tools(template):
            hf = _hermes_fallback(hf, tools)
            tools = None
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if tools:
            kwargs["tools"] = list(tools)
        text = self._processor.apply_chat_template(hf, **kwargs)
        return text, images, conv

    # -- generation -----------------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        tools = kwargs.pop("tools", None)
        kwargs.pop("tool_choice", None)
        schema = kwargs.pop("json_schema", None)
        t0 = time.perf_counter()
        text, images, conv = self.render(messages, tools)
        torch, device, _ = self._torch_setup()
        inputs = self._processor(text=[text], images=images or None, return_tensors="pt")
        inputs = inputs.to(self._model.device if hasattr(self._model, "device") else device)
        t1 = time.perf_counter()
        gen: dict[str, Any] = {"max_new_tokens": int(kwargs.pop("max_new_tokens", self.max_new_tokens))}
        do_sample = bool(kwargs.pop("do_sample", self.do_sample)) and self.temperature > 0
        gen["do_sample"] = do_sample
        if do_sample:
            if self.seed is not None:
                torch.manual_seed(self.seed)
            gen["temperature"] = self.temperature
            if self.top_p is not None:
                gen["top_p"] = self.top_p
        if self.repetition_penalty is not None:
            gen["repetition_penalty"] = self.repetition_penalty
        if stop:
            gen["stop_strings"] = list(stop)
            gen["tokenizer"] = self._processor.tokenizer
        if schema is not None:
            gen["prefix_allowed_tokens_fn"] = self._json_constraint(schema)
        with self._lock, torch.inference_mode():
            out = self._model.generate(**inputs, **gen)
        t2 = time.perf_counter()
        n_in = int(inputs["input_ids"].shape[1])
        new = out[0, n_in:]
        reply = self._processor.tokenizer.decode(new, skip_special_tokens=True)
        turn = sum(1 for m in messages if isinstance(m, AIMessage))
        parsed = parse_tool_calls(reply, id_prefix=f"call_{turn}")
        calls = [{**c, "args": conv.args_from_family(c["args"])} for c in parsed.tool_calls]
        image_tokens = 0
        if "image_grid_thw" in inputs:
            merge = int(getattr(self._processor.image_processor, "merge_size", 2))
            image_tokens = int(sum(int(t) * int(h) * int(w) for t, h, w in inputs["image_grid_thw"].tolist()) // (merge * merge))
        msg = AIMessage(
            content=parsed.content,
            tool_calls=calls,
            invalid_tool_calls=list(parsed.invalid_tool_calls),
            additional_kwargs={"reasoning_content": parsed.reasoning} if parsed.reasoning else {},
            response_metadata={
                "model_name": self.model_path or self.adapter_path,
                "family": self._family,
                "raw_text": reply,
                "timing_ms": {"preprocess": round((t1 - t0) * 1000, 1), "generate": round((t2 - t1) * 1000, 1)},
                "image_tokens": image_tokens,
                "n_images": len(images),
            },
            usage_metadata={"input_tokens": n_in, "output_tokens": int(new.shape[0]),
                            "total_tokens": n_in + int(new.shape[0])},
        )
        return ChatResult(generations=[ChatGeneration(message=msg)])


def _drop_box_bounds(schema: Any) -> Any:
    """``schema`` without the 0..1000 bounds of box coordinates (absolute-pixel families)."""
    if isinstance(schema, dict):
        out = {k: _drop_box_bounds(v) for k, v in schema.items()}
        if out.get("type") == "array" and out.get("minItems") == 4 and out.get("maxItems") == 4:
            items = dict(out.get("items") or {})
            items.pop("maximum", None)
            out["items"] = items
        return out
    if isinstance(schema, list):
        return [_drop_box_bounds(v) for v in schema]
    return schema


def _hermes_fallback(hf: list[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite a conversation for a template that does not render tools: tool list in the system
    turn, calls as ``<tool_call>`` text, consecutive tool results merged into one user turn."""
    tools_text = read_prompt("tool_calling.md").format(
        tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    ).strip()
    out: list[dict[str, Any]] = []
    if not hf or hf[0]["role"] != "system":
        out.append({"role": "system", "content": [{"type": "text", "text": tools_text}]})
    for e in hf:
        e = copy.copy(e)
        if e["role"] == "system" and not out:
            e["content"] = [{"type": "text", "text": f"{text_of(e['content'])}\n\n{tools_text}"}]
        elif e["role"] == "assistant":
            parts = [e["content"]] if e.get("content") else []
            for c in e.pop("tool_calls", None) or []:
                fn = c["function"]
                parts.append("<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": fn["arguments"]},
                                                           ensure_ascii=False) + "\n</tool_call>")
            e["content"] = "\n".join(parts)
        elif e["role"] == "tool":
            blocks = [{"type": "text", "text": "<tool_response>\n"}, *e["content"],
                      {"type": "text", "text": "\n</tool_response>"}]
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"].extend([{"type": "text", "text": "\n"}, *blocks])
                continue
            e = {"role": "user", "content": blocks, "_tool_turn": True}
        out.append(e)
    for e in out:
        e.pop("_tool_turn", None)
    return out


__all__ = ["BoxConvention", "QwenVLChatModel", "family_of", "map_boxes", "template_renders_tools"]
