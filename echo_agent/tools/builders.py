"""LangChain tools over the toolkit, generated from the organ registry.

The image reaches every tool through the injected graph state (``runtime.state["image"]``), never
through model-written arguments. Each tool returns a ``Command`` that appends one ToolMessage
(model-facing JSON, 0..1000 boxes) and one typed evidence item (pixel boxes) to the state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, get_type_hints

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool, InjectedToolArg, StructuredTool
from langgraph.prebuilt import ToolRuntime
from langgraph.types import Command
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import EchoInputError
from ..messages import dumps, evidence_to_model
from ..organs import OrganSpec, get_organ, list_organs
from ..prompts import tool_text
from ..schemas import Box, DetectorReport, Evidence, detection_boxes
from ._upstream import tool_args_and_kwargs, tracing_enabled
from .toolkit import Toolkit, classify_regions, run_detector

DETECT_PREFIX = "det"
CLASSIFY_PREFIX = "cls"
DESCRIBE_PREFIX = "desc"
KNOWLEDGE_PREFIX = "kb"


def _model_box(v: list[int] | None) -> list[int] | None:
    if v is None:
        return None
    if len(v) != 4:
        raise ValueError("a box is 4 integers [x1, y1, x2, y2] in 0..1000")
    if any(not (0 <= c <= 1000) for c in v):
        raise ValueError(f"box coordinates must lie in 0..1000, got {v}")
    if v[2] <= v[0] or v[3] <= v[1]:
        raise ValueError(f"box needs x2 > x1 and y2 > y1, got {v}")
    return v


class _ToolArgs(BaseModel):
    # Unknown arguments are refused (they come back to the reasoner as an error); ``runtime`` is the
    # graph's injected ToolRuntime, hidden from the model-facing schema.
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    runtime: Annotated[Any, InjectedToolArg] = Field(None, exclude=True)


class DetectArgs(_ToolArgs):
    """Arguments of ``detect_<organ>_lesions``."""

    score_threshold: float = Field(
        0.25, ge=0.01, le=0.99, description="Keep candidates scoring at least this (lower it to re-check weak evidence)."
    )
    tta: bool = Field(False, description="Test-time augmentation: also detect on a flipped image and fuse the boxes.")
    region: list[int] | None = Field(
        None, description="Optional [x1, y1, x2, y2] in 0..1000: detect only inside this box."
    )

    _check_region = field_validator("region")(classmethod(lambda cls, v: _model_box(v)))


class DescribeArgs(_ToolArgs):
    """Arguments of ``describe_image``."""

    regions: list[list[int]] = Field(
        default_factory=list,
        max_length=8,
        description="Boxes [x1, y1, x2, y2] in 0..1000 to describe; empty = whole image only, unless "
        "detection_ids name detector candidates (then their boxes).",
    )
    detection_ids: list[str] | None = Field(
        None,
        description="Detector candidate ids (e.g. 'det1:0'), one per region, to link the results to detections; "
        "given without regions, the candidates' own boxes are used.",
    )

    @field_validator("regions")
    @classmethod
    def _check_regions(cls, v: list[list[int]]) -> list[list[int]]:
        return [_model_box(b) for b in v]  # type: ignore[misc]


class ClassifyArgs(DescribeArgs):
    """Arguments of ``classify_<organ>_regions`` (regions and detection ids as for ``describe_image``)."""

    regions: list[list[int]] = Field(
        default_factory=list,
        max_length=8,
        description="Boxes [x1, y1, x2, y2] in 0..1000 to judge (your own, or the detector's candidates: "
        "for those, detection_ids alone is enough).",
    )
    whole_image: bool = Field(True, description="Also judge the whole image (is there a lesion at all?).")


class RetrieveArgs(_ToolArgs):
    """Arguments of ``retrieve_knowledge``."""

    query: str = Field(min_length=1, max_length=500, description="What to look up, e.g. 'irregular spiculated hypoechoic mass'.")
    organ: str | None = Field(None, description="Restrict to one organ's knowledge (default: the current organ).")
    k: int = Field(3, ge=1, le=10, description="How many passages to return.")


# -- evidence ids ----------------------------------------------------------------------------------
def next_evidence_id(state: dict[str, Any], tool_call_id: str | None, prefix: str, tool_names: Iterable[str]) -> str:
    """Deterministic id for a new evidence item: ``<prefix><n>``.

    ``n`` counts earlier evidence of the same prefix plus the position of this call among the same
    tools' calls in the latest assistant turn, so parallel calls in one turn get distinct ids.
    """
    prior = sum(1 for e in state.get("evidence") or [] if str(e.get("id", "")).startswith(prefix))
    names = set(tool_names)
    position = 0
    for msg in reversed(state.get("messages") or []):
        if isinstance(msg, AIMessage):
            calls = [c for c in msg.tool_calls if c["name"] in names]
            for i, c in enumerate(calls):
                if c.get("id") == tool_call_id:
                    position = i
            break
    return f"{prefix}{prior + position + 1}"


def _image_of(runtime: ToolRuntime, toolkit: Toolkit) -> tuple[Any, dict[str, Any]]:
    ref = runtime.state.get("image") if isinstance(runtime.state, dict) else None
    if not ref:
        raise EchoInputError("no image in the graph state; the perceive step must run before any tool")
    return toolkit.get_store().get(ref), ref


def regions_to_boxes(
    regions: list[list[int]] | None, detection_ids: list[str] | None, width: int, height: int,
    known: Callable[[], Mapping[str, Box]],
) -> list[Box]:
    """A tool call's 0..1000 regions as pixel boxes of a ``width`` x ``height`` image, one detection id
    per region when ids are given. Ids without regions stand for the candidates' own pixel boxes
    (``known()``: candidate id -> box, e.g. :func:`echo_agent.schemas.detection_boxes` of the run's
    evidence), so a model never has to copy a box it was given. Raises ``EchoInputError``."""
    regions = regions or []
    if detection_ids and not regions:
        boxes = known()
        unknown = [i for i in detection_ids if i not in boxes]
        if unknown:
            have = ", ".join(sorted(boxes)) or "none yet (call the detector first)"
            raise EchoInputError(f"detection_ids {unknown} were not returned by any detector call; known candidates: {have}")
        return [boxes[i] for i in detection_ids]
    if detection_ids is not None and len(detection_ids) != len(regions):
        raise EchoInputError(
            f"detection_ids has {len(detection_ids)} entries but regions has {len(regions)}; give one id per region"
        )
    return [Box.from_model(r, width, height) for r in regions]


def _image_and_regions(
    runtime: ToolRuntime, toolkit: Toolkit, regions: list[list[int]] | None, detection_ids: list[str] | None
) -> tuple[Any, dict[str, Any], list[Box]]:
    """The state's image, its reference and the call's regions as pixel boxes (:func:`regions_to_boxes`)."""
    image, ref = _image_of(runtime, toolkit)
    h, w = image.shape[:2]
    boxes = regions_to_boxes(regions, detection_ids, w, h, lambda: detection_boxes(runtime.state.get("evidence") or []))
    return image, ref, boxes


class _ToolCommand(Command):  # type: ignore[type-arg]
    """The Command a tool returns. Each call builds a fresh one that nobody else holds, so the
    defensive ``deepcopy`` LangGraph's ToolNode makes of every tool Command (a walk over the whole
    evidence dict, a few hundred microseconds a call) can be a copy of the top-level update dict."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> _ToolCommand:
        update = dict(self.update) if isinstance(self.update, dict) else self.update
        return _ToolCommand(graph=self.graph, update=update, resume=self.resume, goto=self.goto)


def _result(runtime: ToolRuntime, item: Evidence, artifact: dict[str, Any] | None = None) -> Command:
    msg = ToolMessage(
        content=dumps(evidence_to_model(item)),
        tool_call_id=runtime.tool_call_id or "",
        artifact=artifact or {},
    )
    return _ToolCommand(update={"messages": [msg], "evidence": [item.model_dump(mode="json")]})


def _listened(config: Any) -> bool:
    """Whether anything observes LangChain callbacks of this call (handlers, or tracing switched on)."""
    cb = (config or {}).get("callbacks")
    if isinstance(cb, list):
        if cb:
            return True
    elif cb is not None and (getattr(cb, "handlers", None) or getattr(cb, "inheritable_handlers", None)):
        return True
    return tracing_enabled()


class _EchoTool(StructuredTool):
    """StructuredTool that skips the callback machinery when no one listens.

    ``BaseTool.run`` configures a callback manager, opens a tool run, sets a config context and
    reads the function's type hints on every call: about a millisecond per call on a small CPU, for
    nothing when no handler or tracer is attached. In that case the arguments are validated by the
    same schema and the function is called directly; errors propagate exactly as from
    ``BaseTool.run`` (ToolNode turns them into error ToolMessages). With any handler or tracing on,
    the full LangChain path runs.
    """

    def invoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:
        if (
            kwargs
            or self.func is None
            or not (isinstance(input, dict) and input.get("type") == "tool_call" and "args" in input)
            or _listened(config)
        ):
            return super().invoke(input, config, **kwargs)
        args, kw = tool_args_and_kwargs(self, input["args"], input.get("id"))
        return self.func(*args, **kw)


def _described(runtime: ToolRuntime) -> bool:
    """Whether the run already has a captioner description (then nothing is prefetched for one)."""
    return any(e.get("kind") == "description" for e in runtime.state.get("evidence") or ())


def _resolved(func: Any) -> Any:
    """Evaluate the function's (string) annotations once: LangChain reads them with
    ``get_type_hints`` on every tool call, which otherwise compiles each annotation again."""
    func.__annotations__ = get_type_hints(func, include_extras=True)
    return func


# -- builders ----------------------------------------------------------------------------------------
def make_detect_tool(organ: OrganSpec, toolkit: Toolkit) -> BaseTool:
    """``detect_<organ>_lesions``: the organ's detector as a tool."""
    name, description = tool_text("detect_lesions", organ)
    detector_tool_names = [tool_text("detect_lesions", o)[0] for o in list_organs()]

    def detect(
        runtime: ToolRuntime,
        score_threshold: float = 0.25,
        tta: bool = False,
        region: list[int] | None = None,
    ) -> Command:
        image, ref = _image_of(runtime, toolkit)
        h, w = image.shape[:2]
        region_box = Box.from_model(region, w, h) if region else None
        detector = toolkit.detector(organ.name)
        if not _described(runtime):
            toolkit.prefetch_image_context(image)  # overlaps the forward passes; no-op once started
        toolkit.note_detection(organ.name, ref["id"], image, tta=bool(tta), region=region_box is not None)
        t0 = time.perf_counter()
        dets = run_detector(
            organ, image, detector=detector, score_threshold=score_threshold, tta=tta,
            region=region_box, preprocess=toolkit.preprocess,
            prepare=lambda view, crop: toolkit.prepared(ref["id"], view, crop),
        )
        elapsed = (time.perf_counter() - t0) * 1000
        eid = next_evidence_id(runtime.state, runtime.tool_call_id, DETECT_PREFIX, detector_tool_names)
        dets = [d.model_copy(update={"id": f"{eid}:{i}"}) for i, d in enumerate(dets)]
        report = DetectorReport(
            id=eid, organ=organ.name, detector=str(getattr(detector, "name", type(detector).__name__)),
            detections=dets, score_threshold=score_threshold, tta=tta, region=region_box,
            image_width=w, image_height=h, elapsed_ms=round(elapsed, 2),
        )
        artifact: dict[str, Any] = {"evidence_id": eid}
        if toolkit.render_overlays:
            from ..imaging.overlay import render_overlay

            overlay = render_overlay(image, dets)
            artifact["overlay"] = toolkit.get_store().put(overlay, source_kind="overlay")
        return _result(runtime, report, artifact)

    return _EchoTool.from_function(
        func=_resolved(detect), name=name, description=description, args_schema=DetectArgs,
        metadata={"echo_kind": "detect", "organ": organ.name},
    )


def make_classify_tool(organ: OrganSpec, toolkit: Toolkit) -> BaseTool:
    """``classify_<organ>_regions``: the organ's second-look region classifier as a tool.

    Crops come from the same preprocessed image the detector sees (field of view, burned-in
    annotations masked), which is what the classifier was trained on."""
    name, description = tool_text("classify_regions", organ)

    def classify(
        runtime: ToolRuntime,
        regions: list[list[int]] | None = None,
        detection_ids: list[str] | None = None,
        whole_image: bool = True,
    ) -> Command:
        image, ref, boxes = _image_and_regions(runtime, toolkit, regions, detection_ids)
        if not _described(runtime):  # the regions to describe next: overlaps the forward pass
            spacing = ref.get("pixel_spacing_mm")
            toolkit.prefetch_region_context(image, runtime.state.get("evidence") or [], organ=runtime.state.get("organ"),
                                            pixel_spacing_mm=tuple(spacing) if spacing else None)
        eid = next_evidence_id(runtime.state, runtime.tool_call_id, CLASSIFY_PREFIX, [name])
        res = classify_regions(
            organ, image, boxes, detection_ids, whole_image=whole_image, classifier=toolkit.classifier(organ),
            evidence_id=eid, preprocess=toolkit.preprocess,
            prepare=lambda view, crop: toolkit.prepared(ref["id"], view, crop),
        )
        return _result(runtime, res, {"evidence_id": eid})

    return _EchoTool.from_function(
        func=_resolved(classify), name=name, description=description, args_schema=ClassifyArgs,
        metadata={"echo_kind": "classify", "organ": organ.name},
    )


def make_describe_tool(toolkit: Toolkit) -> BaseTool:
    """``describe_image``: the global-context captioner as a tool."""
    name, description = tool_text("describe_image")

    def describe(runtime: ToolRuntime, regions: list[list[int]] | None = None, detection_ids: list[str] | None = None) -> Command:
        image, ref, boxes = _image_and_regions(runtime, toolkit, regions, detection_ids)
        eid = next_evidence_id(runtime.state, runtime.tool_call_id, DESCRIBE_PREFIX, [name])
        spacing = ref.get("pixel_spacing_mm")
        t0 = time.perf_counter()
        ctx = toolkit.get_captioner().describe(
            image, organ=runtime.state.get("organ"), regions=boxes, detection_ids=detection_ids,
            pixel_spacing_mm=tuple(spacing) if spacing else None, evidence_id=eid,
        )
        if not ctx.elapsed_ms:
            ctx = ctx.model_copy(update={"elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)})
        return _result(runtime, ctx, {"evidence_id": eid})

    return _EchoTool.from_function(
        func=_resolved(describe), name=name, description=description, args_schema=DescribeArgs,
        metadata={"echo_kind": "describe"},
    )


def make_retrieve_tool(toolkit: Toolkit) -> BaseTool:
    """``retrieve_knowledge``: the cited knowledge retriever as a tool."""
    name, description = tool_text("retrieve_knowledge")

    def retrieve(runtime: ToolRuntime, query: str, organ: str | None = None, k: int = 3) -> Command:
        organ = organ or runtime.state.get("organ")
        if organ is not None:
            get_organ(organ)  # unknown organ -> clear error back to the reasoner
        eid = next_evidence_id(runtime.state, runtime.tool_call_id, KNOWLEDGE_PREFIX, [name])
        res = toolkit.get_retriever().retrieve(query, organ=organ, k=k, evidence_id=eid)
        return _result(runtime, res, {"evidence_id": eid})

    return _EchoTool.from_function(
        func=_resolved(retrieve), name=name, description=description, args_schema=RetrieveArgs,
        metadata={"echo_kind": "retrieve"},
    )


def make_tools(toolkit: Toolkit | None = None, organs: Iterable[str | OrganSpec] | None = None) -> list[BaseTool]:
    """All tools: one detector tool per registered organ (or per given organ), one second-look
    classify tool per organ that has a region classifier, the captioner and the retriever. Each is a plain LangChain ``BaseTool`` usable by any agent."""
    toolkit = toolkit or Toolkit()
    specs = [get_organ(o) if isinstance(o, str) else o for o in organs] if organs is not None else list_organs()
    tools = [make_detect_tool(s, toolkit) for s in specs]
    tools += [make_classify_tool(s, toolkit) for s in specs if toolkit.has_classifier(s)]
    tools.append(make_describe_tool(toolkit))
    tools.append(make_retrieve_tool(toolkit))
    return tools
