"""The invoke-and-reason graph: shape, tool plumbing, budget, errors, persistence, composition."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _fakes import FakeDetector, ScriptedChatModel, call, fake_toolkit, speckle_image
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from echo_agent.errors import UnknownOrganError
from echo_agent.graph import PARSE_ERROR_KEY, EchoRunContext, build_graph, diagnosis_from_state
from echo_agent.schemas import Diagnosis


def _input(tk, organ="breast", **kw):
    ref = tk.get_store().put(speckle_image())
    return {"image": ref, "organ": organ, **kw}


def _tool_messages(out):
    return [m for m in out["messages"] if isinstance(m, ToolMessage)]


def test_graph_shape():
    g = build_graph(toolkit=fake_toolkit()).compile()
    drawn = g.get_graph()
    nodes = set(drawn.nodes)
    assert {"perceive", "reasoner", "tools", "reason"} <= nodes
    edges = {(e.source, e.target) for e in drawn.edges}
    assert ("__start__", "perceive") in edges
    assert ("perceive", "reasoner") in edges
    assert ("reasoner", "tools") in edges and ("reasoner", "reason") in edges
    assert ("tools", "reasoner") in edges and ("tools", "reason") in edges
    assert ("reason", "__end__") in edges
    assert "review" not in nodes
    g2 = build_graph(toolkit=fake_toolkit(), review=True).compile(checkpointer=InMemorySaver()).get_graph()
    edges2 = {(e.source, e.target) for e in g2.edges}
    assert ("reason", "review") in edges2 and ("review", "__end__") in edges2


def test_default_policy_runs_detect_describe_retrieve():
    tk = fake_toolkit()
    out = build_graph(toolkit=tk).compile().invoke(_input(tk, clinical={"age": 52}))
    names = [c["name"] for m in out["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
    assert names == ["detect_breast_lesions", "describe_image", "retrieve_knowledge"]
    kinds = [e["kind"] for e in out["evidence"]]
    assert kinds == ["detections", "description", "knowledge"]
    dx = diagnosis_from_state(out)
    assert dx.label == "malignant" and dx.category == "4C"
    assert dx.box is not None and dx.box.to_list() == [10, 10, 50, 40]
    # the final assistant turn is the model-facing Diagnosis (boxes in 0..1000)
    final = json.loads(out["messages"][-1].content)
    assert final["findings"][0]["box"] == [62, 83, 312, 333]
    assert {r.kind for r in dx.evidence} >= {"detection", "knowledge", "clinical"}


def test_tools_see_organ_specific_detector_only():
    tk = fake_toolkit()
    model = ScriptedChatModel()
    build_graph(model, toolkit=tk).compile().invoke(_input(tk, organ="kidney"))
    assert "detect_kidney_lesions" in model.bound and "detect_breast_lesions" not in model.bound
    assert {"describe_image", "retrieve_knowledge"} <= set(model.bound)


def test_unknown_tool_and_invalid_arguments_become_error_tool_messages():
    tk = fake_toolkit()
    model = ScriptedChatModel(script=[
        AIMessage(content="", tool_calls=[call("segment_everything", {}, "c1")]),
        AIMessage(content="", tool_calls=[call("detect_breast_lesions", {"score_threshold": 7}, "c2")]),
        AIMessage(content="", tool_calls=[call("detect_breast_lesions", {"bogus": 1}, "c3")]),
        AIMessage(content="", tool_calls=[call("describe_image", {"regions": [[500, 500, 100, 100]]}, "c4")]),
        AIMessage(content="", tool_calls=[call("detect_breast_lesions", {}, "c5")]),
    ])
    out = build_graph(model, toolkit=tk).compile().invoke(_input(tk))
    tms = {m.tool_call_id: m for m in _tool_messages(out)}
    assert tms["c1"].status == "error" and "not a valid tool" in tms["c1"].content
    for cid in ("c2", "c3", "c4"):
        assert tms[cid].status == "error", cid
    assert tms["c5"].status != "error"
    # the reasoner saw each error before its next turn
    assert any(isinstance(m, ToolMessage) and m.tool_call_id == "c1" for m in model.seen[1])
    assert diagnosis_from_state(out).label == "malignant"  # the one good detector call counts


def test_tools_take_detection_ids_instead_of_boxes():
    """A model may name the detector's candidates by id; the tool uses their exact pixel boxes, and an
    id no detector returned is an error that lists the known ones."""
    tk = fake_toolkit()
    model = ScriptedChatModel(script=[
        AIMessage(content="", tool_calls=[call("describe_image", {"detection_ids": ["det1:0"]}, "c0")]),
        AIMessage(content="", tool_calls=[call("detect_breast_lesions", {}, "c1")]),
        AIMessage(content="", tool_calls=[call("describe_image", {"detection_ids": ["det1:0"]}, "c2")]),
        AIMessage(content="", tool_calls=[call("describe_image", {"detection_ids": ["det1:7"]}, "c3")]),
    ])
    out = build_graph(model, toolkit=tk).compile().invoke(_input(tk))
    tms = {m.tool_call_id: m for m in _tool_messages(out)}
    assert tms["c0"].status == "error" and "call the detector first" in tms["c0"].content
    assert tms["c2"].status != "error"
    assert tms["c3"].status == "error" and "det1:7" in tms["c3"].content and "det1:0" in tms["c3"].content
    desc = next(e for e in out["evidence"] if e["kind"] == "description")
    det = next(e for e in out["evidence"] if e["kind"] == "detections")
    assert desc["regions"][0]["detection_id"] == "det1:0"
    assert desc["regions"][0]["box"] == det["detections"][0]["box"]  # the candidate's own box, not a rounded copy


def test_unparseable_tool_call_is_answered():
    tk = fake_toolkit()
    bad = AIMessage(content="<tool_call>{oops", invalid_tool_calls=[
        {"name": "detect_breast_lesions", "args": "{oops", "id": "bad1", "error": "Expecting property name", "type": "invalid_tool_call"}
    ])
    model = ScriptedChatModel(script=[bad])
    out = build_graph(model, toolkit=tk).compile().invoke(_input(tk))
    tm = _tool_messages(out)
    assert len(tm) == 1 and tm[0].status == "error" and "could not be parsed" in tm[0].content
    ai = [m for m in out["messages"] if isinstance(m, AIMessage)][0]
    assert ai.tool_calls[0]["args"] == {PARSE_ERROR_KEY: "Expecting property name"}
    assert diagnosis_from_state(out).indeterminate  # no detector evidence


def test_tool_budget_is_enforced():
    tk = fake_toolkit()
    spam = lambda msgs: AIMessage(  # noqa: E731
        content="", tool_calls=[call("detect_breast_lesions", {}, f"x{len(msgs)}_{i}") for i in range(2)]
    )
    model = ScriptedChatModel(script=[spam] * 10)
    out = build_graph(model, toolkit=tk, max_tool_calls=3).compile().invoke(_input(tk))
    assert out["tool_calls_used"] == 3
    assert len(_tool_messages(out)) == 3
    assert any("tool budget" in w for w in out["warnings"])
    assert len(tk.detectors["breast"].calls) == 3
    # per-run override through the typed context
    tk2 = fake_toolkit()
    model2 = ScriptedChatModel(script=[spam] * 10)
    out2 = build_graph(model2, toolkit=tk2, max_tool_calls=3).compile().invoke(
        _input(tk2), context=EchoRunContext(max_tool_calls=1)
    )
    assert out2["tool_calls_used"] == 1


def test_zero_budget_goes_straight_to_reason():
    tk = fake_toolkit()
    out = build_graph(toolkit=tk, max_tool_calls=0).compile().invoke(_input(tk))
    assert out["tool_calls_used"] == 0 and not _tool_messages(out)
    assert diagnosis_from_state(out).indeterminate


def test_parallel_calls_get_distinct_evidence_ids():
    tk = fake_toolkit()
    model = ScriptedChatModel(script=[AIMessage(content="", tool_calls=[
        call("detect_breast_lesions", {}, "a"), call("detect_breast_lesions", {"tta": True}, "b"),
        call("retrieve_knowledge", {"query": "spiculated"}, "c"),
    ])])
    out = build_graph(model, toolkit=tk).compile().invoke(_input(tk))
    ids = sorted(e["id"] for e in out["evidence"])
    assert ids == ["det1", "det2", "kb1"]


def test_image_path_input_and_missing_organ(tmp_path):
    from PIL import Image

    tk = fake_toolkit()
    p = tmp_path / "img.png"
    Image.fromarray(speckle_image()).save(p)
    g = build_graph(toolkit=tk).compile()
    out = g.invoke({"image_path": str(p), "organ": "breast"})
    assert out["image"]["width"] == 160
    with pytest.raises(UnknownOrganError):
        g.invoke({"image_path": str(p)})
    routed = build_graph(toolkit=tk, router=lambda img: ("kidney", 0.9)).compile().invoke({"image_path": str(p)})
    assert routed["organ"] == "kidney"
    with pytest.raises(UnknownOrganError, match="could not be routed"):
        build_graph(toolkit=tk, router=lambda img: (None, 0.2)).compile().invoke({"image_path": str(p)})


def test_checkpointer_round_trip_memory():
    tk = fake_toolkit()
    g = build_graph(toolkit=tk).compile(checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "t1"}}
    out = g.invoke(_input(tk), cfg)
    snap = g.get_state(cfg)
    assert snap.values["diagnosis"] == out["diagnosis"]
    assert Diagnosis.model_validate(snap.values["diagnosis"]).label == "malignant"
    history = list(g.get_state_history(cfg))
    assert len(history) >= 6


def test_checkpointer_round_trip_sqlite(tmp_path):
    sqlite = pytest.importorskip("langgraph.checkpoint.sqlite")
    tk = fake_toolkit()
    db = tmp_path / "ckpt.sqlite"
    with sqlite.SqliteSaver.from_conn_string(str(db)) as saver:
        g = build_graph(toolkit=tk).compile(checkpointer=saver)
        out = g.invoke(_input(tk), {"configurable": {"thread_id": "s1"}})
    # a new saver on the same file sees the finished run
    with sqlite.SqliteSaver.from_conn_string(str(db)) as saver2:
        g2 = build_graph(toolkit=tk).compile(checkpointer=saver2)
        snap = g2.get_state({"configurable": {"thread_id": "s1"}})
        assert snap.values["diagnosis"] == out["diagnosis"]
        assert [m.content for m in snap.values["messages"]] == [m.content for m in out["messages"]]


async def test_async_invoke_stream_and_async_sqlite(tmp_path):
    aio = pytest.importorskip("langgraph.checkpoint.sqlite.aio")
    tk = fake_toolkit()
    async with aio.AsyncSqliteSaver.from_conn_string(str(tmp_path / "a.sqlite")) as saver:
        g = build_graph(toolkit=tk).compile(checkpointer=saver)
        out = await g.ainvoke(_input(tk), {"configurable": {"thread_id": "a1"}})
        assert out["diagnosis"]["label"] == "malignant"
        nodes = [list(c)[0] async for c in g.astream(_input(tk), {"configurable": {"thread_id": "a2"}}, stream_mode="updates")]
        assert nodes[0] == "perceive" and nodes[-1] == "reason"


def test_stream_and_batch_on_compiled_graph():
    tk = fake_toolkit()
    g = build_graph(toolkit=tk).compile()
    nodes = [list(c)[0] for c in g.stream(_input(tk), stream_mode="updates")]
    assert nodes == ["perceive", "reasoner", "tools", "reasoner", "tools", "reasoner", "tools", "reasoner", "reason"]
    outs = g.batch([_input(tk), _input(tk, organ="kidney")])
    assert [o["diagnosis"]["organ"] for o in outs] == ["breast", "kidney"]


def test_as_subgraph_of_a_parent_graph():
    tk = fake_toolkit()

    class Parent(TypedDict, total=False):
        image_path: str
        organ: str
        diagnosis: dict
        summary: str

    echo = build_graph(toolkit=tk).compile()

    def summarise(state: Parent) -> dict:
        dx = Diagnosis.model_validate(state["diagnosis"])
        return {"summary": f"{dx.organ}: {dx.label} ({dx.category})"}

    parent = StateGraph(Parent)
    parent.add_node("echo", echo)
    parent.add_node("summarise", summarise)
    parent.add_edge(START, "echo")
    parent.add_edge("echo", "summarise")
    parent.add_edge("summarise", END)
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        p = f"{d}/x.png"
        Image.fromarray(speckle_image()).save(p)
        out = parent.compile().invoke({"image_path": p, "organ": "breast"})
    assert out["summary"] == "breast: malignant (4C)"


def test_no_detection_reads_normal_and_weak_evidence_is_rechecked():
    tk = fake_toolkit(detections=[])
    out = build_graph(toolkit=tk).compile().invoke(_input(tk))
    det_calls = tk.detectors["breast"].calls
    assert len(det_calls) == 2 and det_calls[1]["tta"] is True  # re-checked once, not more
    dx = diagnosis_from_state(out)
    assert dx.label == "normal" and dx.findings == [] and dx.category == "1"


def test_tool_failure_is_reported_not_crashing():
    class Broken(FakeDetector):
        def detect(self, image, **kw):
            from echo_agent.errors import ModelLoadError

            raise ModelLoadError("weights missing at /nowhere.onnx")

    tk = fake_toolkit()
    tk.detectors["breast"] = Broken()
    out = build_graph(toolkit=tk).compile().invoke(_input(tk))
    errs = [m for m in _tool_messages(out) if m.status == "error"]
    assert errs and "weights missing" in errs[0].content
    dx = diagnosis_from_state(out)
    assert dx.indeterminate and "no detector result" in (dx.indeterminate_reason or "")


def test_review_interrupt_and_resume():
    from langgraph.types import Command

    tk = fake_toolkit()
    g = build_graph(toolkit=tk, review=True).compile(checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "r1"}}
    out = g.invoke(_input(tk), cfg)
    assert out["__interrupt__"][0].value["diagnosis"]["label"] == "malignant"
    done = g.invoke(Command(resume={"action": "edit", "reviewer": "dr-a", "label": "benign", "category": "3"}), cfg)
    dx = diagnosis_from_state(done)
    assert dx.label == "benign" and dx.category == "3"
    assert dx.review.reviewer == "dr-a" and dx.review.changes["label"] == {"from": "malignant", "to": "benign"}
    assert dx.review.original["label"] == "malignant"


def test_state_is_plain_json():
    tk = fake_toolkit()
    out = build_graph(toolkit=tk).compile().invoke(_input(tk))
    json.dumps({k: v for k, v in out.items() if k != "messages"})  # no custom objects in state
    assert isinstance(out["image"]["id"], str) and np.asarray(tk.get_store().get(out["image"])).shape == (120, 160, 3)


def test_tool_fast_path_matches_the_callback_path_and_callbacks_still_fire():
    from langchain_core.callbacks import BaseCallbackHandler

    class Recorder(BaseCallbackHandler):
        def __init__(self) -> None:
            self.started: list[str] = []

        def on_tool_start(self, serialized, input_str, **kwargs):  # noqa: ANN001, ANN201
            self.started.append((serialized or {}).get("name", ""))

    tk = fake_toolkit(render_overlays=False)
    graph = build_graph(toolkit=tk, organs=["breast"]).compile()
    inp = _input(tk)
    quiet = graph.invoke(inp)
    rec = Recorder()
    heard = graph.invoke(inp, {"callbacks": [rec]})
    assert rec.started == [c["name"] for m in heard["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
    assert rec.started  # the full LangChain path ran for every tool call
    assert quiet["diagnosis"] == heard["diagnosis"]
    assert [m.content for m in _tool_messages(quiet)] == [m.content for m in _tool_messages(heard)]
    # an invalid argument is refused the same way on both paths
    from echo_agent.tools import make_tools

    det = make_tools(tk, ["breast"])[0]
    bad = {"type": "tool_call", "id": "x", "name": det.name, "args": {"score_threshold": 5.0}}
    with pytest.raises(Exception) as quiet_err:
        det.invoke(bad)
    with pytest.raises(Exception) as heard_err:
        det.invoke(bad, {"callbacks": [Recorder()]})
    assert type(quiet_err.value) is type(heard_err.value)


class _CountingCaptioner:
    """Wraps the fake captioner and counts prefetch requests."""

    def __init__(self, inner):
        self.inner, self.name, self.prefetched = inner, inner.name, []

    def prefetch(self, image):
        self.prefetched.append(image)
        return True

    def describe(self, image, **kw):
        return self.inner.describe(image, **kw)


@pytest.mark.parametrize("enabled", [True, False])
def test_detector_tool_prefetches_the_captioner_context_once(enabled):
    tk = fake_toolkit(prefetch_context=enabled)
    tk.captioner = _CountingCaptioner(tk.captioner)
    # weak benign top candidate: a TTA re-check before describing; the fake captioner calls it
    # irregular and spiculated, so the policy then re-examines the region (after the description)
    tk.detectors["breast"] = FakeDetector([([10, 10, 50, 40], "benign", 0.3)])
    inp = _input(tk)
    out = build_graph(toolkit=tk).compile().invoke(inp)
    detects = [c for m in out["messages"] if isinstance(m, AIMessage) for c in m.tool_calls
               if c["name"] == "detect_breast_lesions"]
    assert len(detects) == 3 and detects[2]["args"].get("region")
    image = tk.get_store().get(inp["image"])
    if enabled:
        # asked at each detector call before the description (the captioner ignores repeats),
        # not for the re-examination after it: that analysis would never be used
        assert len(tk.captioner.prefetched) == 2 and all(p is image for p in tk.captioner.prefetched)
    else:
        assert tk.captioner.prefetched == []


class _SpeculatingDetector(FakeDetector):
    """A fake detector that records the views started in the background."""

    def __init__(self, detections):
        super().__init__(detections)
        self.started = []

    def prefetch_in_background(self, image):
        self.started.append(image)


@pytest.mark.parametrize("enabled", [True, False])
def test_first_look_starts_the_mirrored_view_only_while_rechecks_are_the_rule(enabled):
    import cv2

    from echo_agent.tools.toolkit import RecheckRate

    tk = fake_toolkit(speculative_recheck=enabled, preprocess=True)
    weak = _SpeculatingDetector([([10, 10, 50, 40], "benign", 0.3)])  # re-checked with TTA
    tk.detectors["breast"] = weak
    graph = build_graph(toolkit=tk).compile()
    inp = _input(tk)
    graph.invoke(inp)
    if enabled:  # the view a TTA call on the whole image mirrors: the prepared one
        prepared = tk.prepared(inp["image"]["id"], tk.get_store().get(inp["image"]["id"]))
        assert len(weak.started) == 1 and np.array_equal(weak.started[0], cv2.flip(prepared.array, 1))
    else:
        assert weak.started == []
    assert tk.recheck_rate("breast").share == 1.0  # counted either way
    # strong first looks are not re-checked: after a few the toolkit stops speculating
    strong = _SpeculatingDetector([([10, 10, 50, 40], "malignant", 0.9)])
    tk.detectors["breast"] = strong
    for seed in range(RecheckRate.open_limit + 8):
        graph.invoke({"image": tk.get_store().put(speckle_image(seed=seed + 1)), "organ": "breast"})
    assert tk.recheck_rate("breast").share < 0.5
    n = len(strong.started)
    assert n <= (RecheckRate.open_limit + 1 if enabled else 0)
    graph.invoke({"image": tk.get_store().put(speckle_image(seed=99)), "organ": "breast"})
    assert len(strong.started) == n


def test_recheck_rate_counts_rechecks_repeats_and_overlapping_runs():
    from echo_agent.tools.toolkit import RecheckRate

    r = RecheckRate()
    assert r.share is None and r.first_look("a")  # no outcome yet: speculate
    r.rechecked("a")
    r.rechecked("a")  # a second TTA call on the same image counts once
    assert r.share == 1.0
    assert r.first_look("b") and r.first_look("b")  # looked at again without a re-check
    assert r.share == 0.5
    for i in range(RecheckRate.open_limit + 3):  # overlapping runs: the oldest open looks close as not re-checked
        r.first_look(f"x{i}")
    assert r.share < 0.5 and not r.first_look("y")
    r.rechecked("unknown")  # a TTA call without a first look changes nothing
    assert r.share < 0.5


# -- usability check of an explicitly given organ (hardening: blank/noise images) --------------------
def _checked_agent(router, **kw):
    from echo_agent import EchoAgent

    return EchoAgent(toolkit=fake_toolkit(), router=router, **kw)


def test_given_organ_still_gets_an_image_check():
    from echo_agent.graph.build import UNUSABLE_IMAGE_RECOMMENDATION

    dx = _checked_agent(lambda img: (None, 0.99)).run(speckle_image(), organ="breast")
    assert dx.indeterminate and "image check" in (dx.indeterminate_reason or "")
    assert dx.recommendation == UNUSABLE_IMAGE_RECOMMENDATION.format(organ="breast")
    assert any("does not recognise" in w for w in dx.warnings)


def test_given_organ_that_the_router_reads_as_another_is_only_a_warning():
    dx = _checked_agent(lambda img: ("kidney", 0.97)).run(speckle_image(), organ="breast")
    assert "image check" not in (dx.indeterminate_reason or "")
    assert any("reads this image as kidney" in w for w in dx.warnings)


def test_image_check_can_be_switched_off():
    calls = []

    def router(img):
        calls.append(1)
        return None, 0.99

    dx = _checked_agent(router, check_given_organ=False).run(speckle_image(), organ="breast")
    assert not calls and "image check" not in (dx.indeterminate_reason or "")


def test_blank_and_noise_images_with_an_explicit_organ_are_not_read_as_confident_normals():
    import numpy as np

    from echo_agent import EchoAgent

    agent = EchoAgent()  # packaged router, detectors, classifiers
    rng = np.random.default_rng(0)
    for img in (np.zeros((300, 300, 3), np.uint8), np.full((300, 300, 3), 255, np.uint8),
                rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)):
        for organ in ("breast", "kidney"):
            dx = agent.run(img, organ=organ)
            assert dx.indeterminate and "image check" in dx.indeterminate_reason, (organ, dx.indeterminate_reason)


def test_graph_uses_the_specs_it_was_given_even_unregistered_ones():
    """An OrganSpec passed to build_graph needs no registry entry: perceive, reasoner, reason and
    the review node use the given spec (regression: they looked the name up in the registry)."""
    from langgraph.types import Command

    from echo_agent.organs import OrganSpec, get_organ

    spec = OrganSpec(name="liver_unreg", image_labels=("normal", "lesion"), detector_labels=("lesion",))
    with pytest.raises(UnknownOrganError):
        get_organ("liver_unreg")
    tk = fake_toolkit()
    tk.detectors["liver_unreg"] = FakeDetector([([10, 10, 60, 60], "lesion", 0.9)], labels=("lesion",))
    tk.classifiers["liver_unreg"] = None
    graph = build_graph(toolkit=tk, organs=[spec], review=True).compile(checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "unreg"}}
    graph.invoke(_input(tk, organ="liver_unreg"), cfg)
    out = graph.invoke(Command(resume={"action": "accept", "reviewer": "dr-x"}), cfg)
    dx = diagnosis_from_state(out)
    assert dx.organ == "liver_unreg" and dx.label == "lesion"
    assert any(isinstance(m, ToolMessage) and m.name == "detect_liver_unreg_lesions" for m in out["messages"])
    # an organ that is neither given nor registered is refused by name
    with pytest.raises(UnknownOrganError, match="breast"):
        build_graph(toolkit=tk, organs=[spec]).compile().invoke(_input(tk, organ="breast"))


def test_nodes_write_typed_events_to_langgraphs_custom_stream():
    """Any user of build_graph gets the agent's typed events from stream_mode='custom'; EchoAgent's
    stream is the same sequence, numbered."""
    from echo_agent.agent import EchoAgent
    from echo_agent.events import (
        DiagnosisEvent,
        EvidenceEvent,
        PerceivedEvent,
        ReasonerEvent,
        ToolCalledEvent,
    )

    tk = fake_toolkit(render_overlays=False)
    graph = build_graph(toolkit=tk, organs=["breast", "kidney"]).compile()
    events = list(graph.stream(_input(tk), stream_mode="custom"))
    kinds = [type(e) for e in events]
    assert kinds[0] is PerceivedEvent and kinds[1] is ReasonerEvent and kinds[-1] is DiagnosisEvent
    calls = [e for e in events if isinstance(e, ToolCalledEvent)]
    evidence = [e for e in events if isinstance(e, EvidenceEvent)]
    assert calls and [c.call_id for c in calls] == [e.call_id for e in evidence]
    assert evidence[0].evidence.kind == "detections"
    agent_events = list(EchoAgent(toolkit=tk, organ="breast", router=None).stream(speckle_image()))
    assert [type(e) for e in agent_events] == kinds
    assert [e.step for e in agent_events] == list(range(len(agent_events)))
