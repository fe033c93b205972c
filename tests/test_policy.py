"""The embedded policy's decisions on crafted evidence."""

from __future__ import annotations

from _fakes import FakeCaptioner, fake_toolkit, speckle_image
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from echo_agent.graph import build_graph
from echo_agent.reasoners.policy import EmbeddedPolicy
from echo_agent.schemas import Descriptor, ImageContext, RegionDescription

TOOLS = ["detect_breast_lesions", "describe_image", "retrieve_knowledge"]


def _policy():
    return EmbeddedPolicy().model_copy(update={"bound_tool_names": TOOLS})


def _run(tk, **kw):
    g = build_graph(toolkit=tk, **kw).compile()
    out = g.invoke({"image": tk.get_store().put(speckle_image()), "organ": "breast"})
    calls = [c for m in out["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
    return out, calls


def test_weak_evidence_triggers_one_tta_recheck():
    tk = fake_toolkit(detections=[([10, 10, 50, 40], "benign", 0.3)])
    tk.captioner = SuspiciousCaptioner({"shape": "oval"})
    _, calls = _run(tk)
    det = [c for c in calls if c["name"] == "detect_breast_lesions"]
    assert len(det) == 2 and det[1]["args"]["tta"] is True and det[1]["args"]["score_threshold"] < 0.25


def test_strong_evidence_is_not_rechecked():
    tk = fake_toolkit(detections=[([10, 10, 50, 40], "malignant", 0.9)])
    _, calls = _run(tk)
    assert [c["name"] for c in calls] == TOOLS


class SuspiciousCaptioner(FakeCaptioner):
    def __init__(self, values):
        self.values = values

    def describe(self, image, *, organ, regions=(), detection_ids=None, pixel_spacing_mm=None, evidence_id="desc"):
        ids = list(detection_ids) if detection_ids else [None] * len(regions)
        regs = [RegionDescription(box=b, detection_id=i, descriptors={k: Descriptor(value=v, confidence=0.8) for k, v in self.values.items()})
                for b, i in zip(regions, ids)]
        return ImageContext(id=evidence_id, organ=organ, image_width=image.shape[1], image_height=image.shape[0], regions=regs)


def test_label_disagreeing_with_descriptors_is_reconsidered():
    tk = fake_toolkit(detections=[([10, 10, 50, 40], "benign", 0.8)])
    tk.captioner = SuspiciousCaptioner({"shape": "irregular", "margin": "spiculated", "posterior_features": "shadowing"})
    out, calls = _run(tk)
    names = [c["name"] for c in calls]
    assert names == ["detect_breast_lesions", "describe_image", "detect_breast_lesions", "retrieve_knowledge"]
    region_call = calls[2]["args"]
    assert region_call["tta"] is True and len(region_call["region"]) == 4
    reasoner_text = [m.content for m in out["messages"] if isinstance(m, AIMessage) and m.tool_calls][2]
    assert "labelled benign but looks suspicious" in reasoner_text


def test_agreeing_descriptors_do_not_trigger_reconsideration():
    tk = fake_toolkit(detections=[([10, 10, 50, 40], "benign", 0.8)])
    tk.captioner = SuspiciousCaptioner({"shape": "oval", "margin": "circumscribed", "orientation": "parallel"})
    _, calls = _run(tk)
    assert [c["name"] for c in calls] == TOOLS


def test_nothing_found_gives_normal_with_a_probability():
    tk = fake_toolkit(detections=[])
    out, calls = _run(tk)
    dx = out["diagnosis"]
    assert dx["label"] == "normal" and 0 < dx["probabilities"]["normal"] <= 1 and dx["findings"] == []
    assert [c["name"] for c in calls].count("detect_breast_lesions") == 2


def test_budget_exhausted_stops():
    tk = fake_toolkit(detections=[([10, 10, 50, 40], "benign", 0.3)])
    out, calls = _run(tk, max_tool_calls=2)
    assert len(calls) == 2 and out["tool_calls_used"] == 2 and out["diagnosis"] is not None


def test_failed_tool_is_not_retried_forever():
    p = _policy()
    msgs = [HumanMessage(content="x"),
            AIMessage(content="", tool_calls=[{"name": "detect_breast_lesions", "args": {}, "id": "a", "type": "tool_call"}]),
            ToolMessage(content="Error: boom", tool_call_id="a", status="error")]
    nxt = p.decide(msgs)
    assert [c["name"] for c in nxt.tool_calls] == ["describe_image"]


def test_decisions_are_deterministic():
    a = [_run(fake_toolkit())[0]["diagnosis"] for _ in range(2)]
    assert a[0] == a[1]
