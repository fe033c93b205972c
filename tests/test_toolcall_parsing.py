"""Tool-call parsing: a corpus of realistic replies, and the graph answering unreadable calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage

from echo_agent.errors import ReasonerOutputError
from echo_agent.reasoners.toolcall_parsing import parse_to_message, parse_tool_calls

CORPUS = Path(__file__).parent / "data" / "toolcall_corpus"
CASES = sorted(p.name.removesuffix(".txt") for p in CORPUS.glob("*.txt"))


def test_corpus_is_not_empty():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES)
def test_corpus_case(case: str) -> None:
    text = (CORPUS / f"{case}.txt").read_text("utf-8")
    expected = json.loads((CORPUS / f"{case}.expected.json").read_text("utf-8"))
    got = parse_tool_calls(text)
    assert got.content == expected["content"]
    assert [{"name": c["name"], "args": c["args"]} for c in got.tool_calls] == expected["tool_calls"]
    assert len(got.invalid_tool_calls) == len(expected["invalid"])
    for bad, exp in zip(got.invalid_tool_calls, expected["invalid"]):
        assert bad["name"] == exp["name"]
        assert exp["error_contains"] in bad["error"]
        assert isinstance(bad["args"], str)  # the raw text is kept for debugging
    ids = [c["id"] for c in got.tool_calls] + [c["id"] for c in got.invalid_tool_calls]
    assert len(set(ids)) == len(ids), "every call needs its own id"


def test_ids_follow_order_and_prefix():
    text = "".join(f'<tool_call>{{"name": "t{i}", "arguments": {{}}}}</tool_call>' for i in range(3))
    r = parse_tool_calls(text, id_prefix="turn4")
    assert [c["id"] for c in r.tool_calls] == ["turn4_0", "turn4_1", "turn4_2"]
    assert [c["name"] for c in r.tool_calls] == ["t0", "t1", "t2"]


def test_message_carries_invalid_calls_and_reasoning():
    msg = parse_to_message('<think>weak</think>ok <tool_call>{"name": "a", "arguments": {"x": </tool_call>')
    assert isinstance(msg, AIMessage)
    assert msg.content == "ok"
    assert msg.tool_calls == []
    assert msg.invalid_tool_calls[0]["name"] == "a"
    assert msg.additional_kwargs["reasoning_content"] == "weak"


def test_raise_for_errors():
    assert parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>').raise_for_errors().ok
    with pytest.raises(ReasonerOutputError, match="could not be parsed"):
        parse_tool_calls("<tool_call>{nope}</tool_call>").raise_for_errors()


def test_rejects_non_text():
    with pytest.raises(TypeError):
        parse_tool_calls(None)  # type: ignore[arg-type]


def test_graph_answers_unparseable_and_unknown_calls():
    """Run the real graph with a scripted model whose replies go through the parser: the
    unreadable call and the unknown tool both come back as error ToolMessages, and the run still
    ends in a valid Diagnosis."""
    from _fakes import ScriptedChatModel, fake_toolkit, speckle_image
    from langchain_core.messages import ToolMessage

    from echo_agent.graph import build_graph
    from echo_agent.schemas import Diagnosis

    script = [
        parse_to_message('<tool_call>{"name": "detect_breast_lesions", "arguments": {"tta": tr</tool_call>', id_prefix="t0"),
        parse_to_message('<tool_call>{"name": "measure_volume", "arguments": {}}</tool_call>', id_prefix="t1"),
        parse_to_message('<tool_call>{"name": "detect_breast_lesions", "arguments": {}}</tool_call>', id_prefix="t2"),
    ]
    tk = fake_toolkit()
    graph = build_graph(ScriptedChatModel(script=script), toolkit=tk, organs=["breast"]).compile()
    out = graph.invoke({"image": tk.get_store().put(speckle_image()), "organ": "breast"})
    tool_msgs = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert tool_msgs[0].status == "error" and "could not be parsed" in tool_msgs[0].content
    assert tool_msgs[1].status == "error" and "measure_volume" in tool_msgs[1].content
    assert tool_msgs[2].status != "error"
    dx = Diagnosis.model_validate(out["diagnosis"])
    assert dx.organ == "breast" and dx.findings
