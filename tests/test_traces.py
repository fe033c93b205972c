"""Agent traces (``echo_agent.training.curriculum.traces``): conversations recorded from the agent's
own runs are in the inference format, their targets pass ``LLMFinalizer``, and replaying them through
the graph reproduces the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _fakes import ScriptedChatModel
from langchain_core.messages import AIMessage, SystemMessage, ToolMessage

from echo_agent import EchoAgent
from echo_agent.errors import EchoInputError
from echo_agent.eval.manifest import ManifestImage
from echo_agent.imaging import example_image
from echo_agent.organs import get_organ
from echo_agent.reasoners.llm_finalizer import LLMFinalizer, validate_diagnosis
from echo_agent.schemas import Box, Diagnosis, Finding
from echo_agent.training.curriculum import FINALIZER_TASKS, count_table, to_hf_record
from echo_agent.training.curriculum.traces import CLOSING_TEXT, agent_traces, compact_diagnosis, run_validity


def _image(name: str, split: str = "train", label: str = "malignant") -> ManifestImage:
    return ManifestImage(image=example_image(name), organ="breast", label=label, boxes=(), split=split,
                         center="examples")


@pytest.fixture(scope="module")
def agent() -> EchoAgent:
    return EchoAgent(router=None)


@pytest.fixture(scope="module")
def samples(agent: EchoAgent) -> list:
    return agent_traces(agent, [_image("breast_malignant"), _image("breast_benign", label="benign")])


def test_compact_diagnosis_is_accepted_and_sums_to_one() -> None:
    spec = get_organ("breast")
    for p_mal in (0.004, 0.0249, 0.5049, 0.951, 0.333):
        rest = 1.0 - p_mal
        dx = Diagnosis(organ="breast", label="malignant" if p_mal > 0.5 else "benign",
                       probabilities={"normal": rest / 3, "benign": 2 * rest / 3, "malignant": p_mal},
                       findings=[Finding(box=Box(x1=10, y1=20, x2=60, y2=80), label="benign", score=0.41234,
                                         detection_ids=["det1:0"])],
                       category="4A", image_width=200, image_height=100, rationale="long text " * 50)
        out = compact_diagnosis(dx, spec)
        assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert all(len(str(v).split(".")[-1]) <= 2 for v in out["probabilities"].values())
        checked = validate_diagnosis(json.loads(json.dumps(out)), spec, 200, 100)  # the band check passes
        assert checked.category == spec.category_for(out["probabilities"]["malignant"], lesion_found=True)
        assert out["findings"][0]["detection_ids"] == ["det1:0"] and out["findings"][0]["score"] == 0.41
        assert len(out["rationale"]) < 80


def test_compact_diagnosis_can_cite_candidates_instead_of_boxes() -> None:
    spec = get_organ("breast")
    box = Box(x1=10, y1=20, x2=60, y2=80)
    dx = Diagnosis(organ="breast", label="benign", probabilities={"normal": 0.1, "benign": 0.8, "malignant": 0.1},
                   findings=[Finding(box=box, label="benign", score=0.4, detection_ids=["det2:1"]),
                             Finding(box=box, label="benign", score=0.3)],
                   category="4B", image_width=200, image_height=100)
    out = compact_diagnosis(dx, spec, box_by_id=True)
    assert "box" not in out["findings"][0] and out["findings"][1]["box"] == box.to_model(200, 100)
    assert "det2:1" in out["rationale"] and "[" not in out["rationale"]
    checked = validate_diagnosis(json.loads(json.dumps(out)), spec, 200, 100, detections={"det2:1": box})
    assert checked.findings[0].box == box
    with pytest.raises(ValueError, match="det2:1"):
        validate_diagnosis(json.loads(json.dumps(out)), spec, 200, 100, detections={})


def test_traces_follow_the_agents_run(samples: list) -> None:
    assert [s.task for s in samples] == ["agent_trace", "agent_final"] * 2
    trace, final = samples[0], samples[1]
    assert isinstance(trace.messages[0], SystemMessage) and "Organ: breast" in trace.messages[0].content
    calls = [c["name"] for m in trace.messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls[0] == "detect_breast_lesions" and "classify_breast_regions" in calls
    assert calls == trace.meta["tools"]
    # every call is answered by its tool result, narration is dropped, the policy closes
    n_tools = sum(isinstance(m, ToolMessage) for m in trace.messages)
    assert n_tools == len(calls)
    assert all(m.content == "" for m in trace.messages if isinstance(m, AIMessage) and m.tool_calls)
    assert trace.messages[-1].content == CLOSING_TEXT and not trace.messages[-1].tool_calls
    # the final turn is LLMFinalizer's prompt answered with an accepted compact Diagnosis
    assert isinstance(final.messages[0], SystemMessage) and "breast_diagnosis" in final.messages[0].content
    assert "det1" in final.messages[1].content[-1]["text"]  # the evidence of the run is in the request
    answer = json.loads(final.messages[-1].content)
    assert answer["organ"] == "breast" and answer["label"] in get_organ("breast").image_labels
    assert trace.truth["label"] == "malignant" and trace.truth["width"] > 0
    # findings cite the run's candidates (no copied boxes); the truth keeps the candidates for the rewards
    assert answer["findings"] and all("box" not in f and f["detection_ids"] for f in answer["findings"])
    assert all(i in final.truth["detections"] for f in answer["findings"] for i in f["detection_ids"])
    # and the reasoner's own calls name candidates by id too
    args = [c["args"] for m in trace.messages if isinstance(m, AIMessage) for c in m.tool_calls
            if c["name"] == "classify_breast_regions"]
    assert args and "regions" not in args[0] and args[0]["detection_ids"]


def test_traces_carry_the_images_clinical_context(agent: EchoAgent) -> None:
    """The eval harness passes a manifest row's age and symptoms to the agent; traces must show the
    policy the same prompts (micro-policy run 3 never saw a clinical context in training and failed on
    every val image that had one)."""
    im = ManifestImage(image=example_image("breast_benign"), organ="breast", label="benign", boxes=(), split="train",
                       center="examples", age=57, symptoms="palpable lump")
    trace, final = agent_traces(agent, [im])
    for s in (trace, final):
        user = next(m for m in s.messages if m.type == "human")
        text = " ".join(b.get("text", "") for b in user.content) if isinstance(user.content, list) else user.content
        assert "<clinical_context>" in text and "palpable lump" in text and "57" in text


def _evidence_block(text: str) -> str:
    return text.split("<evidence>")[1].split("</evidence>")[0]


def test_counterfactual_finals_change_the_baseline_and_the_target_together(agent: EchoAgent) -> None:
    """``final_variants``: more final turns whose baseline numbers differ from the run's, each answered
    with exactly the baseline's numbers, so writing the commonest numbers no longer fits the targets."""
    im = _image("breast_malignant")
    out = agent_traces(agent, [im], tasks=("agent_final",), final_variants=3, seed=1)
    assert [s.meta.get("counterfactual", False) for s in out][:1] == [False] and len(out) >= 3
    breast = get_organ("breast")
    seen = set()
    for s in out:
        text = s.messages[1].content[-1]["text"]
        base = json.loads(text.split("<baseline_assessment>")[1].split("</baseline_assessment>")[0])
        answer = json.loads(s.messages[-1].content)
        # the target takes the baseline's numbers, label and category as written
        assert answer["probabilities"] == base["probabilities"] and answer["label"] == base["label"]
        assert answer["category"] == base["category"]
        validate_diagnosis(answer, breast, 100, 100, detections={i: Box.from_xyxy([0, 0, 10, 10]) for f in answer["findings"]
                                                                    for i in f["detection_ids"]})
        # the evidence in the prompt is the run's own in every variant
        assert _evidence_block(text) == _evidence_block(out[0].messages[1].content[-1]["text"])
        seen.add(json.dumps(answer["probabilities"], sort_keys=True))
    assert len(seen) >= 3  # the variants' numbers differ from the run's and from each other (2 decimals may tie)
    again = agent_traces(agent, [im], tasks=("agent_final",), final_variants=3, seed=1)
    assert [x.messages[-1].content for x in again] == [x.messages[-1].content for x in out]  # seeded
    with pytest.raises(EchoInputError, match="final_variants"):
        agent_traces(agent, [im], final_variants=-1)


def test_trace_records_are_in_the_inference_format(samples: list, tmp_path: Path) -> None:
    recs = [to_hf_record(s, tool_images=False, relative_to=tmp_path) for s in samples]
    assert "agent_final" in FINALIZER_TASKS
    for r in recs:
        assert (r["tools"] == "") == (r["task"] == "agent_final")
        assert len(r["images"]) == sum(1 for m in r["messages"] for b in m["content"] if b.get("type") == "image") == 1
    table = count_table(samples)
    assert "| agent_trace | agent traces | 2 | 2 | 0 |" in table and "| **all** | | 4 | 4 | 0 |" in table


def test_replaying_a_trace_reproduces_the_run(samples: list) -> None:
    """A reasoner that answers with the recorded tool calls and a finalizer that answers with the
    recorded target give the recorded Diagnosis, and the run counts as fully valid."""
    trace, final = samples[0], samples[1]
    script = [AIMessage(content=m.content, tool_calls=[{**c, "id": f"c{i}_{j}"} for j, c in enumerate(m.tool_calls)])
              for i, m in enumerate(m for m in trace.messages if isinstance(m, AIMessage))]
    writer = ScriptedChatModel(script=[AIMessage(content=final.messages[-1].content)])
    agent = EchoAgent(reasoner=ScriptedChatModel(script=script), finalizer=LLMFinalizer(writer, structured="text"),
                      router=None)
    state = agent.graph.invoke(agent.prepare_input(str(example_image("breast_malignant")), organ="breast"))
    v = run_validity(state)
    assert v == {"tool_calls": len(trace.meta["tools"]), "valid_tool_calls": len(trace.meta["tools"]),
                 "closed": True, "diagnosis": "first"}
    dx = Diagnosis.model_validate(state["diagnosis"])
    assert dx.label == json.loads(final.messages[-1].content)["label"]
    # the finalizer saw exactly the recorded prompt
    assert [m.content for m in writer.seen[0]] == [m.content for m in final.messages[:-1]]


def test_validity_of_bad_runs() -> None:
    bad_call = AIMessage(content="", tool_calls=[{"name": "detect_breast_lesions", "args": {"score_threshold": 7},
                                                  "id": "x", "type": "tool_call"}])
    junk = ScriptedChatModel(script=[AIMessage(content="not json"), AIMessage(content="still not")])
    agent = EchoAgent(reasoner=ScriptedChatModel(script=[bad_call]), finalizer=LLMFinalizer(junk, structured="text"),
                      router=None)
    state = agent.graph.invoke(agent.prepare_input(str(example_image("breast_benign")), organ="breast"))
    v = run_validity(state)
    assert v["tool_calls"] == 1 and v["valid_tool_calls"] == 0 and v["closed"] and v["diagnosis"] == "fallback"
    plain = EchoAgent(router=None)
    v2 = run_validity(plain.graph.invoke(plain.prepare_input(str(example_image("breast_benign")), organ="breast")))
    assert v2["diagnosis"] == "fusion" and v2["valid_tool_calls"] == v2["tool_calls"] > 0


def test_traces_refuse_test_images_and_report_failures(agent: EchoAgent) -> None:
    with pytest.raises(EchoInputError, match="test"):
        agent_traces(agent, [_image("breast_benign", split="test")])
    with pytest.raises(EchoInputError, match="unknown trace task"):
        agent_traces(agent, [_image("breast_benign")], tasks=("grounded_diagnosis",))
    missing = ManifestImage(image=Path("/nonexistent/x.png"), organ="breast", label="benign", boxes=(), split="train",
                            center="examples")
    failed: list[str] = []
    out = agent_traces(agent, [missing, _image("breast_benign", label="benign")],
                       on_error=lambda im, exc: failed.append(str(im.image)))
    assert failed == ["/nonexistent/x.png"] and [s.task for s in out] == ["agent_trace", "agent_final"]
