"""The private LangGraph / langchain-core APIs we rely on (echo_agent/tools/_upstream.py) still
exist with the parameters we call them with, and the fast paths they enable really engage. A
failure here means an upstream release changed them: update _upstream.py and the version bounds
in pyproject.toml together."""

from __future__ import annotations

from _fakes import fake_toolkit, speckle_image

from echo_agent.graph import build_graph
from echo_agent.tools._upstream import InlineToolNode, private_api_problems, tracing_enabled


def test_private_apis_are_where_we_expect_them():
    assert private_api_problems() == []


def test_single_tool_calls_take_the_inline_path_and_match_the_parent():
    tk = fake_toolkit(render_overlays=False)
    graph = build_graph(toolkit=tk, organs=["breast"]).compile()
    inp = {"image": tk.get_store().put(speckle_image()), "organ": "breast"}
    before = InlineToolNode.inline_turns
    fast = graph.invoke(inp)
    assert InlineToolNode.inline_turns > before  # the inline path engaged (no silent fallback)
    # the parent's path (thread pool) gives the same run
    original = InlineToolNode._func
    try:
        InlineToolNode._func = InlineToolNode.__mro__[1]._func  # type: ignore[method-assign]
        slow = graph.invoke(inp)
    finally:
        InlineToolNode._func = original  # type: ignore[method-assign]
    assert fast["diagnosis"] == slow["diagnosis"]
    assert [m.content for m in fast["messages"]] == [m.content for m in slow["messages"]]


def test_tracing_flag_is_readable(monkeypatch):
    monkeypatch.delenv("LANGSMITH_TRACING", raising=False)
    monkeypatch.delenv("LANGCHAIN_TRACING_V2", raising=False)
    assert tracing_enabled() is False
