"""QwenVLChatModel with tiny random Qwen2.5-VL / Qwen3-VL checkpoints built offline (CPU, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")  # the chat templates of the tiny checkpoints come from TRL

from _fakes import fake_toolkit, speckle_image  # noqa: E402
from _tiny_vlm import build_tiny_qwen_vl  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402

from echo_agent.errors import ModelLoadError  # noqa: E402
from echo_agent.messages import image_block  # noqa: E402
from echo_agent.reasoners.qwen_vl import BoxConvention, QwenVLChatModel, map_boxes  # noqa: E402
from echo_agent.schemas import Diagnosis  # noqa: E402
from echo_agent.tools import make_tools  # noqa: E402

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlm")
    return {fam: build_tiny_qwen_vl(fam, root / fam) for fam in ("qwen2_5_vl", "qwen3_vl")}


def _llm(path, tk, **kw):
    kw.setdefault("max_new_tokens", 24)
    return QwenVLChatModel(model_path=str(path), device="cpu", image_store=tk.get_store(), **kw)


def _conversation(tk):
    """A realistic mid-run conversation: user turn with the image, a detector call and its result
    (with an overlay image), as the graph builds it."""
    store = tk.get_store()
    img = speckle_image(120, 160)
    ref = store.put(img)
    overlay = store.put(np.ascontiguousarray(img[:, ::-1]), source_kind="overlay")
    result = {"evidence_id": "det1", "candidates": [{"id": "det1:0", "box": [250, 500, 750, 1000],
                                                      "label": "malignant", "score": 0.8}]}
    return [
        SystemMessage("You are Echo.\nBoxes are [x1, y1, x2, y2] integers from 0 to 1000, relative to the image width and height."),
        HumanMessage(content=[{"type": "text", "text": "Read this breast image."}, image_block(ref)]),
        AIMessage(content="", tool_calls=[{"name": "describe_image", "args": {"regions": [[250, 500, 750, 1000]]},
                                           "id": "c0", "type": "tool_call"}]),
        ToolMessage(content=json.dumps(result), tool_call_id="c0", artifact={"evidence_id": "det1", "overlay": overlay}),
    ]


def test_box_convention_is_one_place():
    qwen3 = BoxConvention(absolute=False)
    assert qwen3.to_family([1, 2, 3, 4]) == [1, 2, 3, 4]
    assert qwen3.from_family([-5, 2, 3, 1200]) == [0, 2, 3, 1000]  # clamped into 0..1000
    q25 = BoxConvention(absolute=True, resized_size=(112, 84))
    assert q25.to_family([250, 500, 750, 1000]) == [28, 42, 84, 84]
    assert q25.from_family([28, 42, 84, 84]) == [250, 500, 750, 1000]
    data = {"candidates": [{"box": [0, 0, 1000, 1000], "score": 0.5}], "regions": [[0, 0, 500, 500]], "k": [1, 2, 3, 4]}
    conv = map_boxes(data, q25.to_family)
    assert conv == {"candidates": [{"box": [0, 0, 112, 84], "score": 0.5}], "regions": [[0, 0, 56, 42]], "k": [1, 2, 3, 4]}
    with pytest.raises(ValueError):
        BoxConvention(absolute=True)


def test_qwen3_renders_tools_through_its_template(tiny_ckpts):
    tk = fake_toolkit()
    llm = _llm(tiny_ckpts["qwen3_vl"], tk)
    tools = [t for t in make_tools(tk, ["breast"])]
    from langchain_core.utils.function_calling import convert_to_openai_tool

    text, images, conv = llm.render(_conversation(tk), [convert_to_openai_tool(t) for t in tools])
    assert llm.resolved_family == "qwen3_vl" and not conv.absolute
    assert "<tools>" in text and '"detect_breast_lesions"' in text
    assert text.count("<|image_pad|>") == len(images) == 2  # the image and the overlay in the tool turn
    assert "<tool_response>" in text and "[250,500,750,1000]" in text.replace(" ", "")
    assert text.rstrip().endswith("<|im_start|>assistant")
    no_overlay = _llm(tiny_ckpts["qwen3_vl"], tk, images_in_tool_messages=False)
    assert len(no_overlay.render(_conversation(tk), None)[1]) == 1


def test_qwen2_5_falls_back_to_hermes_and_absolute_boxes(tiny_ckpts):
    tk = fake_toolkit()
    llm = _llm(tiny_ckpts["qwen2_5_vl"], tk)
    from langchain_core.utils.function_calling import convert_to_openai_tool

    tools = [convert_to_openai_tool(t) for t in make_tools(tk, ["breast"])]
    text, images, conv = llm.render(_conversation(tk), tools)
    assert conv.absolute and conv.resized_size is not None
    w, h = conv.resized_size
    assert (w, h) == (112, 84)  # 160x120 image, 14-px patches, bounded to <= 112*112 pixels
    assert '"name": "detect_breast_lesions"' in text  # tool list written into the system turn
    assert "integers from 0 to 1000" not in text and f"({w} x {h} pixels)" in text
    assert "<tool_call>" in text and '"regions": [[28, 42, 84, 84]]' in text  # history call in model pixels
    assert "<tool_response>" in text and '"box":[28,42,84,84]' in text  # tool result in model pixels
    assert text.count("<|image_pad|>") == len(images) == 2


def test_parsed_call_boxes_come_back_in_0_1000(tiny_ckpts, monkeypatch):
    tk = fake_toolkit()
    llm = _llm(tiny_ckpts["qwen2_5_vl"], tk).load()
    reply = ('Describing it.\n<tool_call>\n{"name": "describe_image", "arguments": {"regions": [[28, 42, 84, 84]]}}\n'
             '</tool_call>\n<tool_call>\n{"name": "detect_breast_lesions", "arguments": {"tta": tr')
    monkeypatch.setattr(llm._processor.tokenizer, "decode", lambda *a, **k: reply)
    msg = llm.bind_tools(make_tools(tk, ["breast"])).invoke(_conversation(tk)[:2])
    assert msg.content == "Describing it."
    assert msg.tool_calls[0]["args"] == {"regions": [[250, 500, 750, 1000]]}
    assert msg.invalid_tool_calls and "truncated" in msg.invalid_tool_calls[0]["error"]
    assert msg.usage_metadata["output_tokens"] <= 24
    assert msg.response_metadata["image_tokens"] == (112 // 28) * (84 // 28)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_whole_graph_with_junk_model_ends_in_valid_diagnosis(tiny_ckpts, family):
    from echo_agent import EchoAgent
    from echo_agent.reasoners.llm_finalizer import LLMFinalizer

    tk = fake_toolkit()
    llm = _llm(tiny_ckpts[family], tk, max_new_tokens=16)
    agent = EchoAgent(reasoner=llm, finalizer=LLMFinalizer(llm), organ="breast", toolkit=tk, router=None,
                      max_tool_calls=2)
    out = agent.graph.invoke(agent.prepare_input(speckle_image(), context={"age": 50}))
    dx = Diagnosis.model_validate(out["diagnosis"])
    assert any("LLM finalizer fell back" in w for w in dx.warnings)  # junk final answer -> fusion result
    assert dx.organ == "breast" and dx.label in dx.probabilities
    ai = [m for m in out["messages"] if isinstance(m, AIMessage) and m.name != "diagnosis"]
    assert ai and all("raw_text" in m.response_metadata for m in ai)  # the model really ran
    # junk text is not a tool call: no detector evidence, so the failure is recorded, not hidden
    assert not out.get("evidence")
    assert dx.indeterminate and "no detector result" in (dx.indeterminate_reason or "")


def test_graph_round_trip_of_qwen2_5_pixel_boxes(tiny_ckpts, monkeypatch):
    """The model reads the detector's box in its own pixels and writes it back in its own pixels;
    the tool receives the same lesion in 0..1000 (converted in one place, both ways)."""
    from echo_agent import EchoAgent
    from echo_agent.schemas import Box

    tk = fake_toolkit()
    llm = _llm(tiny_ckpts["qwen2_5_vl"], tk).load()
    seen: list[str] = []

    def scripted_decode(*a, **k):
        prompt = seen[-1] if seen else ""
        if "<|im_start|>user\n<tool_response>" not in prompt:
            return '<tool_call>\n{"name": "detect_breast_lesions", "arguments": {}}\n</tool_call>'
        if "desc1" not in prompt:
            start = prompt.rindex('"box":[') + len('"box":')
            box = json.loads(prompt[start: prompt.index("]", start) + 1])
            return json.dumps({"name": "describe_image", "arguments": {"regions": [box], "detection_ids": ["det1:0"]}})
        return "Enough evidence."

    real_render = llm.render

    def recording_render(*a, **k):
        text, images, conv = real_render(*a, **k)
        seen.append(text)
        return text, images, conv

    monkeypatch.setattr(llm._processor.tokenizer, "decode", scripted_decode)
    monkeypatch.setattr(QwenVLChatModel, "render", lambda self, *a, **k: recording_render(*a, **k))
    agent = EchoAgent(reasoner=llm, organ="breast", toolkit=tk, router=None, max_tool_calls=4)
    out = agent.graph.invoke(agent.prepare_input(speckle_image(120, 160)))
    assert '"box":[7,7,35,28]' in seen[1]  # det box [10,10,50,40] px of 160x120 -> 112x84 model pixels
    desc = [e for e in out["evidence"] if e["kind"] == "description"][0]
    got = Box.model_validate(desc["regions"][0]["box"])
    assert got.iou(Box.from_xyxy([10, 10, 50, 40])) > 0.9
    assert not Diagnosis.model_validate(out["diagnosis"]).indeterminate


def test_lora_adapter_on_top(tiny_ckpts, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_ckpts["qwen3_vl"])
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(base, cfg).save_pretrained(tmp_path / "adapter")
    tk = fake_toolkit()
    plain = _llm(tiny_ckpts["qwen3_vl"], tk)
    lora = QwenVLChatModel(adapter_path=str(tmp_path / "adapter"), model_path=str(tiny_ckpts["qwen3_vl"]),
                           device="cpu", image_store=tk.get_store(), max_new_tokens=8).load()
    assert type(lora._model).__name__.startswith("Peft")
    conv = _conversation(tk)[:2]
    assert lora.invoke(conv).response_metadata["raw_text"] != plain.invoke(conv).response_metadata["raw_text"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint"):
        QwenVLChatModel(model_path=str(tmp_path / "nope"), device="cpu").load()
    with pytest.raises(ModelLoadError, match="model_path"):
        QwenVLChatModel(device="cpu").load()


def test_generation_settings_are_configuration(tiny_ckpts):
    tk = fake_toolkit()
    conv = _conversation(tk)[:2]

    def sample(seed):
        llm = _llm(tiny_ckpts["qwen3_vl"], tk, do_sample=True, temperature=1.5, seed=seed, max_new_tokens=12)
        return llm.invoke(conv).response_metadata["raw_text"]

    assert sample(3) == sample(3)
    assert len({sample(s) for s in (1, 2, 3)}) > 1
    short = _llm(tiny_ckpts["qwen3_vl"], tk, max_new_tokens=3).invoke(conv)
    assert short.usage_metadata["output_tokens"] <= 3


def test_structured_output_decodes_under_the_json_schema(tiny_ckpts):
    pytest.importorskip("lmformatenforcer")
    tk = fake_toolkit()
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"label": {"type": "string", "enum": ["benign", "malignant"]}, "sure": {"type": "boolean"}},
              "required": ["label", "sure"]}
    msgs = [HumanMessage(content="Read it.")]
    for fam in ("qwen2_5_vl", "qwen3_vl"):
        llm = _llm(tiny_ckpts[fam], tk, max_new_tokens=48)
        free = llm.invoke(msgs).content
        with pytest.raises(ValueError):  # random weights do not write JSON on their own
            json.loads(free)
        out = llm.with_structured_output(schema, include_raw=True).invoke(msgs)
        assert out["parsing_error"] is None, out["raw"].content
        assert set(out["parsed"]) == {"label", "sure"} and out["parsed"]["label"] in ("benign", "malignant")
        assert isinstance(out["parsed"]["sure"], bool)
        assert llm.with_structured_output(schema).invoke(msgs) == out["parsed"]  # greedy: the same document
    with pytest.raises(ValueError, match="json_schema"):
        llm.with_structured_output(schema, method="function_calling")


def test_llm_finalizer_uses_constrained_decoding_for_local_models(tiny_ckpts):
    from echo_agent.reasoners.llm_finalizer import LLMFinalizer

    llm = _llm(tiny_ckpts["qwen3_vl"], fake_toolkit())
    has_enforcer = __import__("importlib").util.find_spec("lmformatenforcer") is not None
    assert LLMFinalizer(llm)._uses_json_schema() is has_enforcer
    assert LLMFinalizer(llm, structured="text")._uses_json_schema() is False
