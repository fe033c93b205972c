"""Reading tool calls out of the text a language model generated.

Open-weight models do not return tool calls as structured data: they write them into their text and
a parser has to find them. This module reads the formats the Qwen family and its relatives write:

* Qwen / Hermes blocks: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (several per
  message, the closing tag possibly lost when generation stopped);
* the XML-style variant of newer Qwen coders:
  ``<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>``;
* ``<function=NAME>{...}</function>`` blocks;
* JSON in Markdown code fences (one call or a list of calls);
* a bare JSON object (or list) that is the whole reply.

A call is a JSON object with a ``name`` and ``arguments`` (also accepted: ``parameters``, ``args``,
an OpenAI-style ``{"function": {"name", "arguments"}}`` wrapper, and arguments given as a JSON string).

Whatever looks like a call but cannot be read (truncated, wrong JSON, no name, arguments that are
not an object) becomes an *invalid* call with an error message, in the shape of LangChain's
``AIMessage.invalid_tool_calls``; the graph answers those with an error ``ToolMessage`` so the model
can fix its output. Unknown tool names are *not* an error here: they are ordinary calls that the
graph's ``ToolNode`` answers ("not a valid tool").

>>> r = parse_tool_calls('Checking.<tool_call>{"name": "describe_image", "arguments": {}}</tool_call>')
>>> r.content, [c["name"] for c in r.tool_calls], r.invalid_tool_calls
('Checking.', ['describe_image'], [])
>>> parse_tool_calls('<tool_call>{"name": "describe_image", "argu').invalid_tool_calls[0]["error"][:24]
'truncated tool call: the'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, InvalidToolCall, ToolCall

from ..errors import ReasonerOutputError

_THINK_RE = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|(?=<tool_call>)|\Z)", re.DOTALL)
_FUNCTION_TAG_RE = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|\Z)", re.DOTALL)
_PARAMETER_RE = re.compile(r"<parameter=([^>\s]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_TRAILING_COMMA_RE = re.compile(r",\s*([}\]])")
_CALL_SHAPE_RE = re.compile(r'^\s*[\[{]\s*(\{\s*)?"(name|function)"\s*:')
_ARG_KEYS = ("arguments", "parameters", "args", "input")


@dataclass
class ParseResult:
    """What a model's reply contained.

    Attributes:
        content: the reply's text with tool-call blocks and ``<think>`` sections removed.
        tool_calls: readable calls (LangChain ``ToolCall`` dicts; unknown names included).
        invalid_tool_calls: calls that could not be read (LangChain ``InvalidToolCall`` dicts, each
            with an ``error`` saying what was wrong).
        reasoning: the text of ``<think>`` sections, if any.
    """

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
    reasoning: str = ""

    @property
    def ok(self) -> bool:
        """True when nothing that looked like a tool call failed to parse."""
        return not self.invalid_tool_calls

    def raise_for_errors(self) -> ParseResult:
        """Raise :class:`ReasonerOutputError` naming the first unreadable call (else return self)."""
        if self.invalid_tool_calls:
            bad = self.invalid_tool_calls[0]
            raise ReasonerOutputError(
                f"the model wrote a tool call that could not be parsed ({bad.get('error')}); "
                "fix the model's output format or its chat template"
            )
        return self

    def to_ai_message(self, **kwargs: Any) -> AIMessage:
        """An ``AIMessage`` carrying the text, the calls and the invalid calls."""
        extra = dict(kwargs.pop("additional_kwargs", {}) or {})
        if self.reasoning:
            extra.setdefault("reasoning_content", self.reasoning)
        return AIMessage(
            content=self.content,
            tool_calls=list(self.tool_calls),
            invalid_tool_calls=list(self.invalid_tool_calls),
            additional_kwargs=extra,
            **kwargs,
        )


class _Collector:
    def __init__(self, id_prefix: str) -> None:
        self.id_prefix = id_prefix
        self.calls: list[ToolCall] = []
        self.invalid: list[InvalidToolCall] = []

    def _next_id(self) -> str:
        return f"{self.id_prefix}_{len(self.calls) + len(self.invalid)}"

    def ok(self, name: str, args: dict[str, Any], call_id: str | None = None) -> None:
        self.calls.append(ToolCall(name=name, args=args, id=call_id or self._next_id(), type="tool_call"))

    def bad(self, error: str, raw: str, name: str | None = None) -> None:
        self.invalid.append(
            InvalidToolCall(name=name, args=raw.strip()[:2000], id=self._next_id(), error=error, type="invalid_tool_call")
        )


def _loads(text: str) -> Any:
    """``json.loads`` with two forgiving repairs models often need: trailing commas and an
    unbalanced closing brace count at the very end (e.g. ``{"a": {}}}``)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        repaired = _TRAILING_COMMA_RE.sub(r"\1", text)
        try:
            return json.loads(repaired)
        except json.JSONDecodeError:
            pass
        try:
            obj, end = json.JSONDecoder().raw_decode(repaired)
        except json.JSONDecodeError:
            raise first from None
        if repaired[end:].strip().strip("}").strip() == "":
            return obj
        raise first from None


def _looks_truncated(text: str) -> bool:
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return in_str or depth > 0


def _name_hint(raw: str) -> str | None:
    m = re.search(r'"name"\s*:\s*"([^"\\]{1,100})"', raw)
    return m.group(1) if m else None


def _call_from_obj(obj: Any) -> tuple[str, dict[str, Any]] | str:
    """(name, args) from a decoded call object, or an error string."""
    if not isinstance(obj, dict):
        return f"a tool call must be a JSON object, got {type(obj).__name__}"
    if isinstance(obj.get("function"), dict):  # OpenAI-style wrapper
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return "the tool call has no 'name' string"
    args: Any = {}
    for key in _ARG_KEYS:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):
        try:
            args = _loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            return f"the 'arguments' string of {name!r} is not valid JSON ({exc.msg} at char {exc.pos})"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return f"the 'arguments' of {name!r} must be a JSON object, got {type(args).__name__}"
    return name.strip(), args


def _is_call_obj(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    if isinstance(obj.get("function"), dict) and "name" in obj["function"]:
        return True
    return "name" in obj and any(k in obj for k in _ARG_KEYS) and len(obj) <= 4


def _add_json_block(col: _Collector, raw: str, *, strict: bool) -> bool:
    """Parse a JSON call (or list of calls). ``strict``: the text was inside call tags, so any
    failure is an invalid call; otherwise a failure means "not a call" and returns False."""
    body = raw.strip()
    if not body:
        if strict:
            col.bad("empty tool call block", raw)
        return strict
    try:
        obj = _loads(body)
    except json.JSONDecodeError as exc:
        if not strict and not _CALL_SHAPE_RE.search(body):
            return False
        if _looks_truncated(body):
            col.bad("truncated tool call: the JSON ends before it is closed (generation stopped early?)",
                    raw, _name_hint(body))
        else:
            col.bad(f"tool call is not valid JSON ({exc.msg} at char {exc.pos})", raw, _name_hint(body))
        return True
    items = obj if isinstance(obj, list) else [obj]
    if not strict and not (items and all(_is_call_obj(o) for o in items)):
        return False
    for item in items:
        got = _call_from_obj(item)
        if isinstance(got, str):
            col.bad(got, json.dumps(item, ensure_ascii=False) if not isinstance(item, str) else item,
                    item.get("name") if isinstance(item, dict) and isinstance(item.get("name"), str) else None)
        else:
            col.ok(*got)
    return True


def _parameter_value(text: str) -> Any:
    v = text.strip("\n")
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _add_function_tag(col: _Collector, name: str, body: str, whole: str) -> None:
    """``<function=NAME>`` with either ``<parameter=K>V</parameter>`` children or a JSON body."""
    params = _PARAMETER_RE.findall(body)
    if params:
        col.ok(name, {k: _parameter_value(v) for k, v in params})
        return
    if not body.strip():
        col.ok(name, {})
        return
    try:
        args = _loads(body)
    except json.JSONDecodeError as exc:
        err = ("truncated tool call: the JSON ends before it is closed" if _looks_truncated(body)
               else f"arguments of {name!r} are not valid JSON ({exc.msg} at char {exc.pos})")
        col.bad(err, whole, name)
        return
    if not isinstance(args, dict):
        col.bad(f"the arguments of {name!r} must be a JSON object, got {type(args).__name__}", whole, name)
        return
    col.ok(name, args)


def parse_tool_calls(text: str, *, id_prefix: str = "call") -> ParseResult:
    """Find the tool calls in a model's reply (see the module docstring for the formats).

    Args:
        text: the generated text (special tokens such as ``<|im_end|>`` may still be in it).
        id_prefix: tool-call ids are ``<id_prefix>_<n>`` in order of appearance.

    Returns:
        A :class:`ParseResult`; it never raises on bad model output.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_tool_calls expects the generated text as str, got {type(text).__name__}")
    text = text.replace("<|im_end|>", "").replace("<|endoftext|>", "")
    reasoning = "\n".join(m.group(0)[len("<think>"):].removesuffix("</think>").strip() for m in _THINK_RE.finditer(text))
    text = _THINK_RE.sub("", text).replace("</think>", "")
    col = _Collector(id_prefix)

    if "<tool_call>" in text:
        pieces = []
        last = 0
        for m in _TOOL_CALL_RE.finditer(text):
            pieces.append(text[last : m.start()])
            last = m.end()
            body = m.group(1)
            fn = _FUNCTION_TAG_RE.search(body)
            if fn and not body.strip().startswith("{"):
                _add_function_tag(col, fn.group(1), fn.group(2), body)
            else:
                _add_json_block(col, body, strict=True)
        pieces.append(text[last:])
        content = "".join(pieces).replace("</tool_call>", "")
    elif "<function=" in text:
        pieces, last = [], 0
        for m in _FUNCTION_TAG_RE.finditer(text):
            pieces.append(text[last : m.start()])
            last = m.end()
            _add_function_tag(col, m.group(1), m.group(2), m.group(0))
        pieces.append(text[last:])
        content = "".join(pieces)
    else:
        content = text
        pieces, last = [], 0
        for m in _FENCE_RE.finditer(text):
            lang = m.group(1).lower()
            if lang not in ("", "json", "tool_call", "tool_code"):
                continue
            if _add_json_block(col, m.group(2), strict=lang in ("tool_call", "tool_code")):
                pieces.append(text[last : m.start()])
                last = m.end()
        if last:
            pieces.append(text[last:])
            content = "".join(pieces)
        elif text.strip().startswith(("{", "[")):
            if _add_json_block(col, text, strict=False):
                content = ""
    return ParseResult(
        content=content.strip(), tool_calls=col.calls, invalid_tool_calls=col.invalid, reasoning=reasoning
    )


def parse_to_message(text: str, *, id_prefix: str = "call", **kwargs: Any) -> AIMessage:
    """``parse_tool_calls(text).to_ai_message(**kwargs)``."""
    return parse_tool_calls(text, id_prefix=id_prefix).to_ai_message(**kwargs)


__all__ = ["ParseResult", "parse_to_message", "parse_tool_calls"]
