"""Test doubles shared by the graph/agent tests: a scripted chat model and fake tool backends."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field

from echo_agent.imaging.store import ImageStore
from echo_agent.schemas import (
    Box,
    Descriptor,
    Detection,
    ImageContext,
    KnowledgeResult,
    KnowledgeSnippet,
    RegionDescription,
)
from echo_agent.tools import Toolkit


class ScriptedChatModel(BaseChatModel):
    """Replays scripted assistant turns (langchain-core's fakes lack ``bind_tools``).

    Each script item is an AIMessage or a callable ``f(messages) -> AIMessage``; after the script
    runs out it answers with a plain message (no tool calls). Every prompt it saw is recorded.
    """

    script: list[Any] = Field(default_factory=list)
    seen: list[list[BaseMessage]] = Field(default_factory=list)
    bound: list[str] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:  # type: ignore[override]
        from langchain_core.utils.function_calling import convert_to_openai_tool

        self.bound[:] = [convert_to_openai_tool(t)["function"]["name"] for t in tools]
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        self.seen.append(list(messages))
        turn = sum(1 for m in messages if isinstance(m, AIMessage))
        if turn < len(self.script):
            item = self.script[turn]
            msg = item(messages) if callable(item) else item
        else:
            msg = AIMessage(content="done")
        return ChatResult(generations=[ChatGeneration(message=msg)])


def call(name: str, args: dict[str, Any], cid: str) -> dict[str, Any]:
    return {"name": name, "args": args, "id": cid, "type": "tool_call"}


class FakeDetector:
    """Returns fixed detections (pixel boxes of the image it gets) and counts calls."""

    name = "fake-detector"

    def __init__(self, detections: list[tuple[list[float], str, float]] | None = None, labels=("benign", "malignant")):
        self.labels = tuple(labels)
        self.detections = detections if detections is not None else [([10, 10, 50, 40], "malignant", 0.8)]
        self.calls: list[dict[str, Any]] = []

    def detect(self, image: np.ndarray, *, score_threshold: float = 0.25, tta: bool = False, **kw: Any) -> list[Detection]:
        self.calls.append({"shape": image.shape, "score_threshold": score_threshold, "tta": tta})
        return [
            Detection(box=Box.from_xyxy(b), label=lbl, score=s)
            for b, lbl, s in self.detections
            if s >= score_threshold
        ]

    def detect_batch(self, images, **kw):
        return [self.detect(i, **kw) for i in images]


class FakeCaptioner:
    name = "fake-captioner"

    def describe(self, image, *, organ, regions=(), detection_ids=None, pixel_spacing_mm=None, evidence_id="desc"):
        ids = list(detection_ids) if detection_ids else [None] * len(regions)
        regs = [
            RegionDescription(
                box=b, detection_id=i,
                descriptors={"shape": Descriptor(value="irregular", confidence=0.7),
                             "margin": Descriptor(value="spiculated", confidence=0.6)},
                caption="irregular spiculated mass",
            )
            for b, i in zip(regions, ids)
        ]
        return ImageContext(
            id=evidence_id, organ=organ, image_width=int(image.shape[1]), image_height=int(image.shape[0]),
            global_descriptors={"mean_intensity": Descriptor(value=float(image.mean()))},
            regions=regs, caption=f"{len(regs)} region(s) described",
        )


class FakeRetriever:
    name = "fake-retriever"

    def __init__(self) -> None:
        self.queries: list[str] = []

    def retrieve(self, query, *, organ=None, k=3, evidence_id="kb"):
        self.queries.append(query)
        snip = KnowledgeSnippet(id=f"{organ or 'any'}/test", organ=organ or "breast", title="Test entry",
                                passage="A test passage.", source="Test source 2020", score=1.0)
        return KnowledgeResult(id=evidence_id, query=query, organ=organ, snippets=[snip][:k])


def fake_toolkit(detections=None, **kw: Any) -> Toolkit:
    store = kw.pop("store", None)
    if store is None:  # an empty ImageStore is falsy (it has __len__), so no `or` here
        store = ImageStore()
    # No second-look classifier unless a test gives one: the plumbing tests script exact tool sequences.
    classifiers = {"breast": None, "kidney": None, **kw.pop("classifiers", {})}
    return Toolkit(
        detectors={"breast": FakeDetector(detections), "kidney": FakeDetector([([5, 5, 30, 30], "hydronephrosis", 0.9)], labels=("hydronephrosis",))},
        classifiers=classifiers,
        captioner=FakeCaptioner(), retriever=FakeRetriever(), store=store,
        preprocess=kw.pop("preprocess", False), **kw,
    )


def speckle_image(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.integers(40, 140, size=(h, w), dtype=np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def batch_folder(d):
    """Fill folder ``d`` with ten batch inputs: the two bundled examples, seven synthetic frames
    and one corrupt file (``zz_corrupt.png``). Returns ``d``."""
    import shutil

    from echo_agent.imaging import example_image, save_png

    d.mkdir(parents=True, exist_ok=True)
    for name in ("breast_benign", "breast_malignant"):
        shutil.copy(example_image(name), d / f"{name}.png")
    rng = np.random.default_rng(7)
    for i in range(7):
        g = rng.integers(20 + 10 * i, 120 + 10 * i, size=(96 + 8 * i, 128), dtype=np.uint8)
        save_png(np.repeat(g[:, :, None], 3, axis=2), d / f"synthetic_{i}.png")
    (d / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return d


def journal_lines(path):
    """The records of a JSONL batch journal."""
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def stable_record(rec, volatile=("ms", "overlay", "fhir")):
    """A journal record without what differs between engines for the same input: timing, output
    folders, and the decoder's exception class quoted in an error message (for the same corrupt
    bytes Pillow raises different classes in different processes, depending on which plugins a
    process has already imported); the typed error itself must match."""
    out = {k: v for k, v in rec.items() if k not in volatile}
    if out.get("status") == "error":
        out["error"] = out["error"].split(" (", 1)[0]
    return out


def tiny_classifier(path: Path, labels=("normal", "benign", "malignant"), *, temperature: float = 1.0,
                    meta: dict | None = None, n_out: int | None = None, size: int = 32) -> Path:
    """An ONNX 'classifier': mean of each input channel -> linear layer. Brighter crops score the
    last label higher, so tests can steer it with pixel values."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from echo_agent.detectors import CLASSIFIER_META_KEY

    k = n_out or len(labels)
    w = np.zeros((3, k), np.float32)
    w[:, -1] = 2.0
    w[:, 0] = -2.0
    b = np.zeros(k, np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["images", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Gemm", ["pooled", "W", "B"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"),
                     numpy_helper.from_array(np.array([2, 3], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    info = {"labels": list(labels), "input_size": size, "margin": 0.25, "offset": 127.0, "scale": 128.0,
            "temperature": temperature}
    if meta is not None:
        info = meta
    if info:
        entry = model.metadata_props.add()
        entry.key, entry.value = CLASSIFIER_META_KEY, json.dumps(info)
    onnx.save(model, str(path))
    return path
