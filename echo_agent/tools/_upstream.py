"""The one place echo_agent uses private LangGraph / langchain-core APIs, each for a measured speed-up.

Everything else uses public APIs. Each private name used is listed in :data:`PRIVATE_APIS` with the
parameters we call it with; ``tests/test_upstream.py`` fails when an upstream release removes or
changes one, and ``pyproject.toml`` bounds langgraph, langgraph-prebuilt and langchain-core to the
minor versions checked. At run time a changed API falls back to the public path (slower, same
results), so a user is never broken by it; CI is.

- :class:`InlineToolNode`: a turn with one tool call runs it inline. LangGraph's ``ToolNode`` starts
  a thread pool for every turn, which on a 2-core machine cost more than the rest of the graph's
  plumbing (docs/benchmarks.md). Several calls in one turn still run in parallel in the parent.
- :func:`tool_args_and_kwargs`: how ``StructuredTool`` validates a call's arguments, so the tools
  can skip the callback machinery when nothing listens (about 1 ms per call).
- :func:`tracing_enabled`: whether LangSmith tracing is on (then the full path must run).
"""

from __future__ import annotations

import inspect
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.prebuilt import ToolNode
from langgraph.runtime import Runtime

#: ``(module, qualified name) -> parameter names`` (``None``: only its existence matters).
PRIVATE_APIS: dict[tuple[str, str], tuple[str, ...] | None] = {
    ("langgraph.prebuilt.tool_node", "ToolNode._func"): ("self", "input", "config", "runtime"),
    ("langgraph.prebuilt.tool_node", "ToolNode._parse_input"): ("self", "input"),
    ("langgraph.prebuilt.tool_node", "ToolNode._extract_state"): ("self", "input", "config"),
    ("langgraph.prebuilt.tool_node", "ToolNode._run_one"): ("self", "call", "input_type", "tool_runtime"),
    ("langgraph.prebuilt.tool_node", "ToolNode._combine_tool_outputs"): ("self", "outputs", "input_type"),
    ("langchain_core.tools.base", "BaseTool._to_args_and_kwargs"): ("self", "tool_input", "tool_call_id"),
    ("langchain_core.tracers.context", "_tracing_v2_is_enabled"): (),
}


def private_api_problems() -> list[str]:
    """What no longer matches :data:`PRIVATE_APIS` in the installed versions (empty: all good)."""
    import importlib

    problems = []
    for (module, qualname), params in PRIVATE_APIS.items():
        obj: Any = importlib.import_module(module)
        try:
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            problems.append(f"{module}.{qualname} is gone")
            continue
        if params is not None:
            sig = list(inspect.signature(obj).parameters.values())
            got = tuple(p.name for p in sig)
            # the names we pass, in order, and no new parameter without a default after them
            extra_required = any(p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                                 for p in sig[len(params):])
            if got[: len(params)] != params or extra_required:
                problems.append(f"{module}.{qualname} takes {got}, expected {params}")
    return problems


class InlineToolNode(ToolNode):
    """ToolNode that runs a turn's single tool call inline (see the module docstring)."""

    #: how many turns took the inline path (tests check that it engages)
    inline_turns = 0

    def _func(self, input: Any, config: RunnableConfig, runtime: Runtime) -> Any:
        try:
            tool_calls, input_type = self._parse_input(input)
        except AttributeError:  # private API changed: the parent's (public-behaviour) path
            return super()._func(input, config, runtime)
        if len(tool_calls) != 1:
            return super()._func(input, config, runtime)
        from langgraph.prebuilt import ToolRuntime

        call = tool_calls[0]
        tool_runtime = ToolRuntime(
            state=self._extract_state(input, config), tool_call_id=call["id"], config=config,
            context=runtime.context, store=runtime.store, stream_writer=runtime.stream_writer,
            tools=list(self.tools_by_name.values()), execution_info=getattr(runtime, "execution_info", None),
            server_info=getattr(runtime, "server_info", None),
        )
        type(self).inline_turns += 1
        return self._combine_tool_outputs([self._run_one(call, input_type, tool_runtime)], input_type)


def tool_args_and_kwargs(tool: Any, args: Any, call_id: str | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tool call's validated ``(args, kwargs)`` exactly as ``BaseTool.run`` computes them."""
    return tool._to_args_and_kwargs(args, call_id)


def tracing_enabled() -> bool:
    """Whether LangSmith tracing is switched on for this process / context."""
    from langchain_core.tracers.context import _tracing_v2_is_enabled

    return bool(_tracing_v2_is_enabled())


__all__ = ["PRIVATE_APIS", "InlineToolNode", "private_api_problems", "tool_args_and_kwargs", "tracing_enabled"]
