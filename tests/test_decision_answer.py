"""The decision answer of ``LLMFinalizer(answer="decision")``: the model decides and cites, the tools
and the calibrated fusion give the numbers (``echo_agent.reasoners.decision``)."""

from __future__ import annotations

import json

import pytest
from _fakes import ScriptedChatModel
from langchain_core.messages import AIMessage, SystemMessage

from echo_agent import EchoAgent
from echo_agent.eval.manifest import ManifestImage
from echo_agent.imaging import example_image
from echo_agent.organs import get_organ
from echo_agent.reasoners.decision import (
    DECISION_NOTE,
    DISAGREEMENT_RECOMMENDATION,
    complete_decision,
    decision_from_diagnosis,
    decision_schema,
)
from echo_agent.reasoners.llm_finalizer import FALLBACK_WARNING, REPAIRED_WARNING, LLMFinalizer
from echo_agent.schemas import Box, Detection, Diagnosis, Finding
from echo_agent.training.curriculum.traces import agent_traces, run_validity
from echo_agent.training.rewards import parse_answer, valid_diagnosis_reward

BREAST = get_organ("breast")
CANDS = {
    "det1:0": Detection(id="det1:0", box=Box(x1=20, y1=30, x2=80, y2=70), label="malignant", score=0.41),
    "det2:1": Detection(id="det2:1", box=Box(x1=100, y1=10, x2=150, y2=60), label="benign", score=0.22),
}


def _baseline(label: str = "malignant", p_mal: float = 0.62, indeterminate: bool = False) -> Diagnosis:
    rest = 1.0 - p_mal
    findings = [Finding(box=CANDS["det1:0"].box, label="malignant", score=0.41, detection_ids=["det1:0"])] if label != "normal" else []
    return Diagnosis(organ="breast", label=label, probabilities={"normal": rest / 2, "benign": rest / 2, "malignant": p_mal},
                     category=BREAST.category_for(p_mal, lesion_found=label != "normal"), category_system="BI-RADS",
                     findings=findings, rationale="fusion", recommendation="biopsy", indeterminate=indeterminate,
                     indeterminate_reason="weak" if indeterminate else None, image_width=200, image_height=100,
                     warnings=["w0"])


def test_the_baselines_own_decision_completes_to_the_baseline() -> None:
    base = _baseline()
    dec = decision_from_diagnosis(base)
    assert dec == {"label": "malignant", "findings": [{"label": "malignant", "detection_ids": ["det1:0"]}],
                   "rationale": "malignant; strongest finding malignant at det1:0.", "indeterminate": False}
    dx = complete_decision(json.loads(json.dumps(dec)), BREAST, base, CANDS)
    assert dx.label == base.label and dx.probabilities == base.probabilities and dx.category == base.category
    assert [f.box for f in dx.findings] == [CANDS["det1:0"].box] and dx.findings[0].score == 0.41
    assert not dx.indeterminate and dx.recommendation == "biopsy" and dx.warnings == ["w0", DECISION_NOTE]
    # the fusion's referral stands when the model agrees with it
    weak = complete_decision(decision_from_diagnosis(_baseline(indeterminate=True)), BREAST, _baseline(indeterminate=True), CANDS)
    assert weak.indeterminate and weak.indeterminate_reason == "weak"


def test_a_departure_keeps_the_calibrated_numbers_and_is_referred() -> None:
    base = _baseline()
    dx = complete_decision({"label": "benign", "findings": [{"label": "benign", "detection_ids": ["det2:1", "det1:0"]}],
                            "rationale": "oval, circumscribed"}, BREAST, base, CANDS)
    assert dx.label == "benign" and dx.probabilities == base.probabilities  # not the argmax: said so, referred
    assert dx.indeterminate and "the reasoner reads benign, the calibrated evidence malignant" in dx.indeterminate_reason
    assert dx.recommendation == DISAGREEMENT_RECOMMENDATION and dx.findings[0].box == CANDS["det2:1"].box
    assert dx.category == BREAST.category_for(base.probabilities["malignant"], lesion_found=True)
    normal = complete_decision({"label": "normal", "findings": [], "rationale": "nothing", "probabilities": {"x": 1}},
                               BREAST, base, CANDS)  # numbers a model writes anyway are ignored
    assert normal.category == "1" and normal.findings == [] and normal.indeterminate


@pytest.mark.parametrize("bad, message", [
    ({"label": "cyst", "findings": [], "rationale": "r"}, "label must be one of"),
    ({"label": "benign", "findings": [{"label": "benign", "detection_ids": []}], "rationale": "r"}, "at least one detector candidate"),
    ({"label": "benign", "findings": [{"label": "benign", "detection_ids": ["det9:0"]}], "rationale": "r"}, "no detector call returned"),
    ({"label": "benign", "findings": [{"label": "normal", "detection_ids": ["det1:0"]}], "rationale": "r"}, "lesion label"),
    ({"label": "normal", "findings": [{"label": "benign", "detection_ids": ["det1:0"]}], "rationale": "r"}, "reports no findings"),
    ({"label": "benign", "findings": [], "rationale": " "}, "rationale must be"),
    ({"label": "benign", "findings": [], "rationale": "r", "indeterminate": "no"}, "indeterminate must be"),
    ({"label": "benign", "findings": "det1:0", "rationale": "r"}, "findings must be a list"),
    ({"label": "benign", "findings": [], "rationale": "r", "box": [1, 2, 3, 4]}, "unknown key"),
])
def test_bad_decisions_name_the_problem(bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        complete_decision(bad, BREAST, _baseline(), CANDS)


def test_schema_and_prompt_ask_for_the_decision_only() -> None:
    schema = decision_schema(BREAST)
    assert set(schema["properties"]) >= {"label", "findings", "rationale", "indeterminate"}
    assert "probabilities" not in schema["properties"] and schema["additionalProperties"] is False
    with pytest.raises(ValueError, match="answer must be one of"):
        LLMFinalizer(None, answer="essay")


def _image(name: str, label: str) -> ManifestImage:
    return ManifestImage(image=example_image(name), organ="breast", label=label, boxes=(), split="train", center="examples")


def test_decision_traces_replay_as_valid_first_answers() -> None:
    agent = EchoAgent(router=None)
    samples = agent_traces(agent, [_image("breast_malignant", "malignant")], answer="decision")
    trace, final = samples
    target = json.loads(final.messages[-1].content)
    assert set(target) == {"label", "findings", "rationale", "indeterminate"}
    system = next(m for m in final.messages if isinstance(m, SystemMessage)).content
    assert "Do not write probabilities" in system and "_decision" in system
    script = [AIMessage(content=m.content, tool_calls=[{**c, "id": f"c{i}_{j}"} for j, c in enumerate(m.tool_calls)])
              for i, m in enumerate(m for m in trace.messages if isinstance(m, AIMessage))]
    writer = ScriptedChatModel(script=[AIMessage(content=final.messages[-1].content)])
    replay = EchoAgent(reasoner=ScriptedChatModel(script=script),
                       finalizer=LLMFinalizer(writer, structured="text", answer="decision"), router=None)
    state = replay.graph.invoke(replay.prepare_input(str(example_image("breast_malignant")), organ="breast"))
    assert run_validity(state)["diagnosis"] == "first"
    dx = Diagnosis.model_validate(state["diagnosis"])
    plain = agent.run(str(example_image("breast_malignant")), organ="breast")  # the fusion's reading
    assert dx.label == plain.label and dx.probabilities == plain.probabilities and dx.category == plain.category
    assert [f.box for f in dx.findings] == [f.box for f in plain.findings][: len(dx.findings)]
    assert DECISION_NOTE in dx.warnings and dx.reasoner.startswith("llm:")
    assert [m.content for m in writer.seen[0]] == [m.content for m in final.messages[:-1]]
    # the rewards read it too: label and the cited candidate's box
    dets = final.truth["detections"]
    ans = parse_answer(final.messages[-1].content, "breast", final.truth["width"], final.truth["height"], dets)
    assert ans is not None and ans["label"] == target["label"] and len(ans["boxes"]) == len(target["findings"])
    assert valid_diagnosis_reward([final.messages[-1].content, '{"label":"benign","findings":[{"label":"benign",'
                                   '"detection_ids":["det9:9"]}],"rationale":"r"}'],
                                  organ=["breast"] * 2, width=[200] * 2, height=[100] * 2,
                                  detections=[json.dumps(dets)] * 2) == [1.0, 0.0]


def test_an_invalid_decision_gets_one_repair_then_the_fusion_stands() -> None:
    good = '{"label":"malignant","findings":[],"rationale":"irregular, shadowing"}'
    for script, expected in ((["not json", good], REPAIRED_WARNING), (["not json", "{}"], FALLBACK_WARNING)):
        writer = ScriptedChatModel(script=[AIMessage(content=t) for t in script])
        agent = EchoAgent(finalizer=LLMFinalizer(writer, structured="text", answer="decision"), router=None)
        dx = agent.run(str(example_image("breast_malignant")), organ="breast")
        assert any(w.startswith(expected) for w in dx.warnings)


def test_doctests_of_the_decision_module() -> None:
    import doctest

    from echo_agent.reasoners import decision

    assert doctest.testmod(decision).failed == 0
