"""``build_graph``: the invoke-and-reason StateGraph.

::

    START -> perceive -> reasoner <-> tools -> reason -> [review] -> END

The graph is returned uncompiled, so it can be compiled with any checkpointer or added as a node of
a larger graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, ToolMessage
from langchain_core.tools import BaseTool
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime

from ..errors import EchoError, EchoInputError, UnknownOrganError
from ..events import (
    DiagnosisEvent,
    EvidenceEvent,
    PerceivedEvent,
    ReasonerEvent,
    ToolCalledEvent,
    ToolErrorEvent,
)
from ..fusion import Fusion
from ..messages import diagnosis_to_model, dumps, user_message
from ..organs import OrganSpec, get_organ, list_organs
from ..prompts import system_prompt
from ..schemas import ClinicalContext, Diagnosis, parse_evidence
from ..tools import Toolkit, make_tools
from ..tools._upstream import InlineToolNode
from .state import EchoInput, EchoOutput, EchoRunContext, EchoState, clinical_of, typed_evidence

#: Args key that marks a tool call the reasoner's output parser could not read.
PARSE_ERROR_KEY = "__parse_error__"

#: Signature of a custom final-reasoning step (e.g. an LLM asked for structured output). It gets the
#: state, the organ and the fusion's Diagnosis, and returns the Diagnosis to keep.
Finalizer = Callable[[dict[str, Any], OrganSpec, Diagnosis], Diagnosis]


def tool_error_text(exc: Exception) -> str:
    """The text a failed tool call returns to the reasoner (also used by the GRPO environment)."""
    return f"Error: {type(exc).__name__}: {exc}. Fix the arguments or call another tool."


def _handle_tool_error(exc: Exception) -> str:
    # Input problems and tool failures go back to the reasoner as error ToolMessages; programming
    # errors (TypeError, AttributeError, ...) still surface so they get fixed, not hidden.
    if isinstance(exc, (EchoError, ValueError, KeyError)):
        return tool_error_text(exc)
    from langchain_core.tools import ToolException

    if isinstance(exc, ToolException):
        return tool_error_text(exc)
    raise exc


def _answer_unparseable(request: ToolCallRequest) -> ToolMessage | None:
    """The error answer to a tool call the reasoner's reply could not be parsed into (else None)."""
    call = request.tool_call
    err = (call.get("args") or {}).get(PARSE_ERROR_KEY)
    if err is None:
        return None
    return ToolMessage(
        content=f"Error: your tool call could not be parsed ({err}). Emit one JSON object with 'name' and 'arguments'.",
        tool_call_id=call.get("id") or "",
        name=call.get("name"),
        status="error",
    )


def _tool_events(request: ToolCallRequest, result: Any) -> Any:
    """Write the typed event of a finished tool call (evidence or error) to the run's stream."""
    write = getattr(request.runtime, "stream_writer", None)
    if write is None:
        return result
    call = request.tool_call
    name, call_id = call.get("name") or "", call.get("id") or ""
    update = getattr(result, "update", None)
    messages = (update or {}).get("messages", []) if isinstance(update, dict) else [result]
    evidence = {e.get("id"): e for e in (update or {}).get("evidence") or []} if isinstance(update, dict) else {}
    for m in messages:
        if not isinstance(m, ToolMessage):
            continue
        if getattr(m, "status", "success") == "error":
            write(ToolErrorEvent(name=name, call_id=call_id, error=str(m.content)))
            continue
        eid = m.artifact.get("evidence_id") if isinstance(m.artifact, dict) else None
        if eid in evidence:
            write(EvidenceEvent(name=name, call_id=call_id, evidence=parse_evidence(evidence[eid])))
    return result


def _run_tool(request: ToolCallRequest, execute: Callable[[ToolCallRequest], Any]) -> Any:
    return _tool_events(request, _answer_unparseable(request) or execute(request))


async def _arun_tool(request: ToolCallRequest, execute: Callable[[ToolCallRequest], Any]) -> Any:
    return _tool_events(request, _answer_unparseable(request) or await execute(request))


def _tools_for(organ: OrganSpec, tools: Sequence[BaseTool]) -> list[BaseTool]:
    """The tools the reasoner sees for one organ: that organ's detector plus the shared tools."""
    out = []
    for t in tools:
        meta = t.metadata or {}
        if meta.get("echo_kind") in ("detect", "classify") and meta.get("organ") != organ.name:
            continue
        out.append(t)
    return out


UNUSABLE_IMAGE_RECOMMENDATION = (
    "The image does not look like a usable {organ} ultrasound image: check the image and the organ, "
    "or have it read by a sonographer. The reading above is not reliable."
)


def _check_given_organ(organ: str, routed: tuple[str | None, float | None]) -> dict[str, Any]:
    """State updates of the usability check of an explicitly given organ: an image the organ router
    rejects (a blank frame, noise, a photograph) gets ``image_check`` (the Diagnosis is then marked
    indeterminate); an image it routes to another organ gets a warning only (the caller chose)."""
    name, conf = routed
    p = f", p={conf:.2f}" if conf is not None else ""
    if name is None:
        return {"image_check": f"image check: it does not look like {organ} ultrasound (organ router: "
                               f"no organ{p})",
                "warnings": [f"the organ router does not recognise this image as {organ} ultrasound{p}"]}
    if name != organ:
        return {"warnings": [f"the organ router reads this image as {name}{p}, not {organ} as given"]}
    return {}


def _budget(runtime: Runtime[EchoRunContext] | None, default: int) -> int:
    ctx = getattr(runtime, "context", None) if runtime is not None else None
    value = getattr(ctx, "max_tool_calls", None) if ctx is not None else None
    return default if value is None else int(value)


def _spec_resolver(specs: Sequence[OrganSpec], *, fixed: bool) -> Callable[[str], OrganSpec]:
    """Organ name -> the spec this graph was built with. With ``fixed`` (the caller passed
    ``organs=``) only those organs exist for the graph, registered or not; otherwise an organ
    registered after the graph was built is still found in the registry."""
    by_name = {s.name: s for s in specs}

    def spec_of(name: str) -> OrganSpec:
        spec = by_name.get(name)
        if spec is not None:
            return spec
        if fixed:
            raise UnknownOrganError(
                f"organ {name!r} is not one of this graph's organs ({', '.join(sorted(by_name)) or 'none'}); "
                "build the graph with organs=[...] including it"
            )
        return get_organ(name)

    return spec_of


def build_graph(
    reasoner: BaseChatModel | None = None,
    *,
    toolkit: Toolkit | None = None,
    organs: Sequence[str | OrganSpec] | None = None,
    extra_tools: Sequence[BaseTool] = (),
    fusion: Fusion | None = None,
    finalizer: Finalizer | None = None,
    router: Callable[[Any], tuple[str | None, float | None]] | None = None,
    max_tool_calls: int = 8,
    max_reasoner_turns: int | None = None,
    review: bool = False,
    check_given_organ: bool = True,
) -> StateGraph:
    """Build the uncompiled invoke-and-reason graph.

    Args:
        reasoner: any LangChain chat model that supports ``bind_tools`` (default: the embedded
            policy, no LLM needed).
        toolkit: detectors, captioner, retriever and image store shared by the tools.
        organs: organs to build detector tools for (default: every registered organ).
        extra_tools: more tools for the reasoner (plain LangChain tools).
        fusion: turns evidence into the Diagnosis in the reason node (default: the learned, calibrated
            fusion where parameters ship for the organ, else the transparent heuristic fusion).
        finalizer: optional final-reasoning step run after fusion (e.g. an LLM with structured output).
        router: ``f(image_array) -> (organ | None, confidence)`` used when the input has no organ.
        check_given_organ: when the input names the organ, still run the router as a usability
            check: an image it recognises as no organ at all (a blank frame, noise, a photograph)
            gets an indeterminate Diagnosis with the reason; one it reads as another organ gets a
            warning. Needs a router.
        max_tool_calls: tool-call budget per run (overridable per run via ``EchoRunContext``).
        max_reasoner_turns: stop asking the reasoner after this many turns (default: budget + 2).
        review: pause before END for a human reviewer (LangGraph ``interrupt``).

    Example::

        from langgraph.checkpoint.memory import InMemorySaver
        graph = build_graph(max_tool_calls=6).compile(checkpointer=InMemorySaver())
    """
    if max_tool_calls < 0:
        raise ValueError(f"max_tool_calls must be >= 0, got {max_tool_calls}")
    from ..reasoners.policy import EmbeddedPolicy

    toolkit = toolkit or Toolkit()
    model = reasoner if reasoner is not None else EmbeddedPolicy()
    if fusion is None:
        from ..fusion import LearnedFusion

        fusion = LearnedFusion()
    specs = [get_organ(o) if isinstance(o, str) else o for o in organs] if organs is not None else list_organs()
    spec_of = _spec_resolver(specs, fixed=organs is not None)
    tools = make_tools(toolkit, specs) + list(extra_tools)
    bound: dict[str, Any] = {}
    turn_limit = max_reasoner_turns if max_reasoner_turns is not None else max_tool_calls + 2

    def bound_model(organ: OrganSpec) -> Any:
        if organ.name not in bound:
            bound[organ.name] = model.bind_tools(_tools_for(organ, tools))
        return bound[organ.name]

    # -- nodes ---------------------------------------------------------------------------------------
    def perceive(state: EchoState, runtime: Runtime[EchoRunContext]) -> dict[str, Any]:
        update: dict[str, Any] = {}
        ref = state.get("image")
        store = toolkit.get_store()
        if not ref:
            path = state.get("image_path")
            if not path:
                raise EchoInputError("the graph input needs 'image' (a stored ImageRef) or 'image_path'")
            from ..imaging import load_image

            ref = load_image(path).to_ref(store)
            update["image"] = ref
        organ_name = state.get("organ")
        if organ_name is None:
            if router is None:
                raise UnknownOrganError(
                    "no organ was given and no organ router is configured; pass organ='breast' or 'kidney'"
                )
            organ_name, confidence = router(store.get(ref))
            if organ_name is None:
                raise UnknownOrganError(
                    "the image could not be routed to a registered organ (it does not look like "
                    f"{', '.join(s.name for s in specs)} ultrasound); pass organ= explicitly if it is one"
                )
            update["organ"] = organ_name
            update["organ_confidence"] = confidence
        elif router is not None and check_given_organ:
            update.update(_check_given_organ(organ_name, router(store.get(ref))))
        spec = spec_of(organ_name)
        clinical = state.get("clinical")
        if clinical is not None and not isinstance(clinical, dict):
            raise EchoInputError("'clinical' must be a dict of ClinicalContext fields")
        ctx = ClinicalContext.model_validate(clinical) if clinical else None
        if not state.get("messages"):
            update["messages"] = [user_message(ref, spec, ctx)]
        update.setdefault("tool_calls_used", state.get("tool_calls_used", 0))
        runtime.stream_writer(PerceivedEvent(
            organ=spec.name, organ_confidence=update.get("organ_confidence", state.get("organ_confidence")),
            image_width=int(ref["width"]), image_height=int(ref["height"]),
        ))
        return update

    def reasoner_node(state: EchoState, runtime: Runtime[EchoRunContext]) -> dict[str, Any]:
        spec = spec_of(state["organ"]) if state.get("organ") else None
        if spec is None:
            raise UnknownOrganError("reasoner reached without an organ; perceive must run first")
        limit = _budget(runtime, max_tool_calls)
        used = state.get("tool_calls_used", 0)
        msgs: list[BaseMessage] = [SystemMessage(system_prompt(spec, limit)), *state.get("messages", [])]
        bound_for_organ = bound_model(spec)
        if isinstance(bound_for_organ, EmbeddedPolicy):
            # The embedded policy is deterministic and local: skip the chat-model callback and
            # tracing machinery (several ms per turn); its turns still appear in state and stream.
            ai = bound_for_organ.decide(msgs)
        else:
            ai = bound_for_organ.invoke(msgs)
        if not isinstance(ai, AIMessage):
            ai = AIMessage(content=str(getattr(ai, "content", ai)))
        calls = list(ai.tool_calls)
        for i, bad in enumerate(ai.invalid_tool_calls or []):
            calls.append({
                "name": bad.get("name") or "unparseable_tool_call",
                "args": {PARSE_ERROR_KEY: bad.get("error") or "invalid JSON arguments"},
                "id": bad.get("id") or f"invalid_{used}_{i}",
                "type": "tool_call",
            })
        warnings: list[str] = []
        remaining = max(limit - used, 0)
        if len(calls) > remaining:
            dropped = calls[remaining:]
            calls = calls[:remaining]
            warnings.append(
                f"tool budget of {limit} call(s) reached; dropped: {', '.join(c['name'] for c in dropped)}"
            )
        if calls != list(ai.tool_calls) or ai.invalid_tool_calls:
            ai = ai.model_copy(update={"tool_calls": calls, "invalid_tool_calls": []})
        runtime.stream_writer(ReasonerEvent(
            text=ai.content if isinstance(ai.content, str) else str(ai.content),
            tool_calls=[{"name": c["name"], "args": c["args"], "id": c.get("id")} for c in calls],
        ))
        for c in calls:
            runtime.stream_writer(ToolCalledEvent(name=c["name"], args=c["args"], call_id=c.get("id") or ""))
        return {"messages": [ai], "tool_calls_used": used + len(calls), "warnings": warnings}

    def after_reasoner(state: EchoState) -> Literal["tools", "reason"]:
        last = state["messages"][-1]
        turns = sum(1 for m in state["messages"] if isinstance(m, AIMessage))
        if isinstance(last, AIMessage) and last.tool_calls and turns <= turn_limit:
            return "tools"
        return "reason"

    def after_tools(state: EchoState, runtime: Runtime[EchoRunContext]) -> Literal["reasoner", "reason"]:
        return "reasoner" if state.get("tool_calls_used", 0) < _budget(runtime, max_tool_calls) else "reason"

    def reason(state: EchoState, runtime: Runtime[EchoRunContext]) -> dict[str, Any]:
        spec = spec_of(state["organ"])  # type: ignore[arg-type]
        ref = state["image"]
        evidence = typed_evidence(state)
        clinical = clinical_of(state)
        dx = fusion.fuse(spec, evidence, clinical=clinical, image_size=(int(ref["width"]), int(ref["height"])))
        if state.get("warnings"):
            dx = dx.model_copy(update={"warnings": [*dx.warnings, *state["warnings"]]})
        if state.get("image_check"):
            reasons = [r for r in (dx.indeterminate_reason, state["image_check"]) if r]
            dx = dx.model_copy(update={
                "indeterminate": True, "indeterminate_reason": "; ".join(reasons),
                "recommendation": UNUSABLE_IMAGE_RECOMMENDATION.format(organ=spec.name),
            })
        if finalizer is not None:
            dx = finalizer(dict(state), spec, dx)
            Diagnosis.model_validate(dx.model_dump())  # the finaliser must hand back a valid Diagnosis
        dx = dx.model_copy(update={"image_id": ref["id"]})
        final = AIMessage(content=dumps(diagnosis_to_model(dx)), name="diagnosis")
        runtime.stream_writer(DiagnosisEvent(diagnosis=dx))
        return {"diagnosis": dx.model_dump(mode="json"), "messages": [final]}

    g: StateGraph = StateGraph(
        EchoState, context_schema=EchoRunContext, input_schema=EchoInput, output_schema=EchoOutput
    )
    g.add_node("perceive", perceive)
    g.add_node("reasoner", reasoner_node)
    g.add_node(
        "tools",
        InlineToolNode(tools, handle_tool_errors=_handle_tool_error, wrap_tool_call=_run_tool,
                       awrap_tool_call=_arun_tool),
    )
    g.add_node("reason", reason)
    g.add_edge(START, "perceive")
    g.add_edge("perceive", "reasoner")
    g.add_conditional_edges("reasoner", after_reasoner, ["tools", "reason"])
    g.add_conditional_edges("tools", after_tools, ["reasoner", "reason"])
    if review:
        from .review import make_review_node

        g.add_node("review", make_review_node(spec_of))
        g.add_edge("reason", "review")
        g.add_edge("review", END)
    else:
        g.add_edge("reason", END)
    return g


def diagnosis_from_state(state: dict[str, Any]) -> Diagnosis:
    """The Diagnosis of a finished run (raises if the run has not reached the reason node)."""
    d = state.get("diagnosis")
    if d is None:
        raise EchoError("the run has no diagnosis yet (it is paused for review or did not finish)")
    return Diagnosis.model_validate(d)


__all__ = ["Finalizer", "PARSE_ERROR_KEY", "build_graph", "diagnosis_from_state"]
