"""OpenAI-compatible endpoints: a real HTTP round trip against a local replay server process."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("langchain_openai")

from _fakes import fake_toolkit, speckle_image  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402

from echo_agent import EchoAgent  # noqa: E402
from echo_agent.messages import image_block  # noqa: E402
from echo_agent.reasoners.openai_compat import (  # noqa: E402
    agent_from_endpoint,
    chat_model_from_endpoint,
    prepare_messages,
    qwen_resized_size,
)
from echo_agent.reasoners.qwen_vl import BoxConvention  # noqa: E402

HERE = Path(__file__).parent
RECORDING = HERE / "data" / "openai_replay" / "breast_run.json"


@pytest.fixture
def replay_server(tmp_path, monkeypatch):
    """Start tests/_openai_replay.py in its own process; yield (base_url, request log reader)."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    log = tmp_path / "requests"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_openai_replay.py"), str(RECORDING), str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), f"replay server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        port = int(line.split()[1])

        def requests() -> list[dict]:
            files = sorted(log.glob("request_*.json"), key=lambda p: int(p.stem.split("_")[1]))
            return [json.loads(p.read_text()) for p in files]

        yield f"http://127.0.0.1:{port}/v1", requests
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _png_shape(url: str) -> tuple[int, ...]:
    from PIL import Image

    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))).shape


def _images(content) -> list[str]:
    if not isinstance(content, list):
        return []
    return [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]


@pytest.mark.parametrize("images_in_tool_messages", [True, False])
def test_round_trip_tool_calls_images_and_structured_output(replay_server, images_in_tool_messages):
    base_url, requests = replay_server
    tk = fake_toolkit()
    agent = agent_from_endpoint(base_url, "replay-model", api_key="sk-test",
                                images_in_tool_messages=images_in_tool_messages,
                                organ="breast", toolkit=tk, router=None)
    dx = agent.run(speckle_image(120, 160), context={"age": 52, "symptoms": "palpable lump"})
    reqs = requests()
    assert len(reqs) == 5  # four reasoner turns and the final structured diagnosis
    assert {k.lower(): v for k, v in reqs[0]["headers"].items()}["authorization"] == "Bearer sk-test"
    bodies = [r["body"] for r in reqs]
    assert all(b["model"] == "replay-model" for b in bodies)

    # turn 1: system + user turn with the image as a data URL and the delimited clinical context
    first = bodies[0]
    assert [t["function"]["name"] for t in first["tools"]] == ["detect_breast_lesions", "describe_image", "retrieve_knowledge"]
    sys_msg, user = first["messages"][0], first["messages"][1]
    assert sys_msg["role"] == "system" and user["role"] == "user"
    assert _png_shape(_images(user["content"])[0]) == (120, 160, 3)
    assert '<clinical_context>\n{"age": 52, "symptoms": "palpable lump"}' in user["content"][0]["text"]
    assert "echo-image://" not in json.dumps(bodies)  # every reference was resolved before sending

    # turn 2: the detector result, with its overlay in the tool message or in a following user turn
    msgs = bodies[1]["messages"]
    roles = [m["role"] for m in msgs]
    tool = msgs[roles.index("tool")]
    if images_in_tool_messages:
        assert roles == ["system", "user", "assistant", "tool"]
        assert _png_shape(_images(tool["content"])[0]) == (120, 160, 3)
    else:
        assert roles == ["system", "user", "assistant", "tool", "user"]
        assert isinstance(tool["content"], str)
        assert msgs[-1]["content"][0]["text"].startswith("Detector overlay for tool call call_rec_0")
        assert _png_shape(_images(msgs[-1]["content"])[0]) == (120, 160, 3)
    result = json.loads(tool["content"] if isinstance(tool["content"], str) else tool["content"][0]["text"])
    assert result["candidates"][0]["box"] == [62, 83, 312, 333]  # 0..1000 on the wire

    # turn 3: two parallel calls answered; the overlay (if moved) never splits the tool messages
    roles3 = [m["role"] for m in bodies[2]["messages"]]
    i = roles3.index("assistant", 3)
    assert roles3[i:] == ["assistant", "tool", "tool"]

    # turn 4: the tool call the server left as <tool_call> text was parsed on the client and run
    last_ai = [m for m in bodies[3]["messages"] if m["role"] == "assistant"][-1]
    assert last_ai["tool_calls"][0]["function"]["name"] == "detect_breast_lesions"
    assert json.loads(last_ai["tool_calls"][0]["function"]["arguments"]) == {"tta": True, "score_threshold": 0.1}
    assert "<tool_call>" not in (last_ai.get("content") or "")
    assert tk.detectors["breast"].calls[-1]["tta"] is True

    # turn 5: structured output with the organ's Diagnosis schema, no tools
    final = bodies[4]
    assert "tools" not in final
    schema = final["response_format"]["json_schema"]["schema"]
    assert final["response_format"]["type"] == "json_schema"
    assert schema["properties"]["label"]["enum"] == ["normal", "benign", "malignant"]
    text = json.dumps(final["messages"])
    assert "<baseline_assessment>" in text and "<clinical_context>" in text

    assert dx.label == "malignant" and dx.category == "4C" and dx.reasoner == "llm:replay-model"
    assert dx.box is not None and dx.box.iou(dx.box.from_xyxy([10, 10, 50, 40])) > 0.95
    assert not dx.indeterminate


def test_prepare_messages_drops_unanswered_calls_and_converts_boxes():
    tk = fake_toolkit()
    store = tk.get_store()
    ref = store.put(speckle_image(120, 160))
    msgs = [
        SystemMessage("Boxes are [x1, y1, x2, y2] integers from 0 to 1000, relative to the image width and height."),
        HumanMessage(content=[{"type": "text", "text": "read"}, image_block(ref)]),
        AIMessage(content="", tool_calls=[{"name": "describe_image", "args": {"regions": [[0, 0, 500, 500]]}, "id": "a", "type": "tool_call"}]),
        ToolMessage(content='{"regions":[{"box":[0,0,500,500]}]}', tool_call_id="a"),
        AIMessage(content="", tool_calls=[{"name": "detect_breast_lesions", "args": {}, "id": "b", "type": "tool_call"}]),
    ]
    conv = BoxConvention(True, qwen_resized_size(160, 120))
    out = prepare_messages(msgs, store=store, convention=conv)
    assert len(out) == 4  # the unanswered call "b" is gone
    w, h = conv.resized_size
    assert out[2].tool_calls[0]["args"] == {"regions": [[0, 0, round(w / 2), round(h / 2)]]}
    assert json.loads(out[3].content) == {"regions": [{"box": [0, 0, round(w / 2), round(h / 2)]}]}
    assert f"({w} x {h} pixels)" in out[0].content and "0 to 1000" not in out[0].content
    assert out[1].content[1]["type"] == "image_url"


@pytest.mark.heavy
def test_qwen_resized_size_matches_transformers():
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    for w, h in [(160, 120), (1024, 768), (33, 900), (3000, 2000), (20, 20)]:
        th, tw = mod.smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        assert qwen_resized_size(w, h, min_pixels=56 * 56, max_pixels=28 * 28 * 1280) == (tw, th)


def test_chat_model_settings():
    llm = chat_model_from_endpoint("http://127.0.0.1:9/v1", "m", images_in_tool_messages=False, box_convention="absolute")
    assert llm.images_in_tool_messages is False and llm.disable_streaming is True and llm.temperature == 0.0


async def test_async_run_goes_through_the_same_wrapper(replay_server):
    base_url, requests = replay_server
    agent = EchoAgent.from_endpoint(base_url, "replay-model", organ="breast", toolkit=fake_toolkit(), router=None)
    dx = await agent.arun(speckle_image(120, 160), context={"age": 52})
    bodies = [r["body"] for r in requests()]
    assert len(bodies) == 5 and "echo-image://" not in json.dumps(bodies)
    assert bodies[3]["messages"][-2]["tool_calls"][0]["function"]["name"] == "detect_breast_lesions"  # parsed text call
    assert dx.category == "4C" and dx.reasoner == "llm:replay-model"


def test_reply_fixes_parse_text_calls_and_convert_qwen2_5_boxes():
    from langchain_core.outputs import ChatGeneration, ChatResult

    from echo_agent.reasoners._openai_chat import _fix_result

    conv = BoxConvention(True, (112, 84))
    native = AIMessage(content="", tool_calls=[{"name": "describe_image", "args": {"regions": [[28, 42, 84, 84]]},
                                                "id": "x", "type": "tool_call"}])
    text = AIMessage(content='<tool_call>{"name": "detect_breast_lesions", "arguments": {"region": [0, 0, 56, 42]}}</tool_call>')
    res = _fix_result(ChatResult(generations=[ChatGeneration(message=native), ChatGeneration(message=text)]), conv)
    assert res.generations[0].message.tool_calls[0]["args"] == {"regions": [[250, 500, 750, 1000]]}
    fixed = res.generations[1].message
    assert fixed.content == "" and fixed.tool_calls[0]["args"] == {"region": [0, 0, 500, 500]}
    plain = _fix_result(ChatResult(generations=[ChatGeneration(message=AIMessage(content='{"label": "x"}'))]), None)
    assert plain.generations[0].message.content == '{"label": "x"}' and not plain.generations[0].message.tool_calls


def test_wrong_store_error_says_what_to_do():
    from echo_agent.errors import EchoInputError
    from echo_agent.imaging.store import ImageStore

    ref = ImageStore().put(speckle_image())
    with pytest.raises(EchoInputError, match="image_store=toolkit.get_store"):
        prepare_messages([HumanMessage(content=[image_block(ref)])], store=ImageStore())


def test_finalizer_mode_follows_the_endpoint_option(monkeypatch):
    import echo_agent.reasoners.llm_finalizer as lf

    made: list[tuple[object, str]] = []

    class Recording(lf.LLMFinalizer):
        def __init__(self, model, **kw):
            super().__init__(model, **kw)
            made.append((model, self.structured))

    monkeypatch.setattr(lf, "LLMFinalizer", Recording)
    tk = fake_toolkit()
    for option in ("text", True, False):
        agent_from_endpoint("http://127.0.0.1:9/v1", "m", llm_finalizer=option, organ="breast", toolkit=tk, router=None)
    assert [mode for _, mode in made] == ["text", "json_schema"]
    assert made[0][0].image_store is tk.get_store()  # the model resolves images in the agent's store
    assert lf.LLMFinalizer(object())._uses_json_schema() is False
    assert lf.LLMFinalizer(chat_model_from_endpoint("http://127.0.0.1:9/v1", "m"))._uses_json_schema() is True


def test_agent_from_endpoint_is_the_classmethod_under_every_old_name():
    import echo_agent
    import echo_agent.reasoners as reasoners
    from echo_agent.agent import agent_from_endpoint as alias

    assert echo_agent.agent_from_endpoint is alias and reasoners.agent_from_endpoint is alias
    assert agent_from_endpoint is alias  # echo_agent.reasoners.openai_compat, resolved lazily
    tk = fake_toolkit()
    agent = alias("http://127.0.0.1:9/v1", "m", organ="breast", toolkit=tk, router=None, llm_finalizer=False)
    assert type(agent) is EchoAgent and agent.toolkit is tk
