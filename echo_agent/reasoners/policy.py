"""The embedded default reasoner: a deterministic policy that speaks tool calls.

It is a real LangChain chat model (``bind_tools``, ``invoke``, streaming through the graph), so the
graph it drives is exactly the one an MLLM drives; it reads only what an LLM would read — the bound
tool schemas and the model-facing JSON in the tool messages — and needs no weights.

Policy (one step per call):

1. no detector result yet -> call the organ's detector;
2. the detector found nothing, or only weak candidates, and has not been re-checked -> call it again
   with test-time augmentation and a lower threshold (self-refinement);
3. a second-look classifier is bound and has not judged yet -> ``classify_<organ>_regions`` on the
   top candidates and the whole image (lesion presence and class from a pretrained backbone);
4. candidates not described yet -> ``describe_image`` on the top candidates (and the whole image);
5. the top candidate's label disagrees with its descriptors (a "benign" box that looks irregular,
   not circumscribed, shadowing; a "malignant" box that looks oval, parallel, circumscribed) and it
   has not been re-examined -> call the detector again on that region with test-time augmentation;
6. no knowledge yet -> ``retrieve_knowledge`` for the leading hypothesis and its descriptors;
7. otherwise stop (a plain assistant message summarising the evidence).

A tool that answered with an error is not called again with the same arguments.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

# Descriptor values that argue for malignancy / for a benign lesion (ACR BI-RADS US lexicon).
SUSPICIOUS = {
    "shape": {"irregular"},
    "orientation": {"not parallel"},
    "margin": {"indistinct", "angular", "microlobulated", "spiculated"},
    "posterior_features": {"shadowing", "combined"},
}
REASSURING = {
    "shape": {"oval"},
    "orientation": {"parallel"},
    "margin": {"circumscribed"},
    "posterior_features": {"enhancement"},
    "echo_pattern": {"anechoic"},
}

# Descriptors worth putting into a knowledge query, in order of diagnostic weight.
_QUERY_DESCRIPTORS = (
    "margin", "shape", "orientation", "echo_pattern", "posterior_features",
    "collecting_system_fluid", "fluid_extent", "acoustic_shadowing",
)


def _tool_results(messages: Sequence[BaseMessage]) -> list[tuple[str, dict[str, Any] | None, dict[str, Any], bool]]:
    """(tool name, parsed content or None, call args, is_error) for every answered tool call."""
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    out = []
    for m in messages:
        if isinstance(m, AIMessage):
            for c in m.tool_calls:
                calls[c.get("id") or ""] = (c["name"], c.get("args") or {})
        elif isinstance(m, ToolMessage):
            name, args = calls.get(m.tool_call_id, (m.name or "", {}))
            is_error = getattr(m, "status", "success") == "error"
            data = None
            if not is_error and isinstance(m.content, str):
                data = _parsed(m.content)
                if data is _UNPARSEABLE:
                    data, is_error = None, True
            out.append((name, data, args, is_error))
    return out


_UNPARSEABLE = object()


@functools.lru_cache(maxsize=256)
def _parsed(content: str) -> Any:
    """A tool message's JSON, parsed once (``_UNPARSEABLE`` if it is not JSON).

    Every turn re-reads the whole conversation, so without the cache a run parses its first tool
    result again at every later turn. The policy only reads the parsed data: it must not modify it.
    """
    try:
        return json.loads(content)
    except json.JSONDecodeError:
        return _UNPARSEABLE


def _expand(box: list[int], frac: float) -> list[int]:
    """Grow a 0..1000 box by ``frac`` of its size on each side (clamped to the image)."""
    x1, y1, x2, y2 = box
    dw, dh = (x2 - x1) * frac, (y2 - y1) * frac
    return [max(0, int(x1 - dw)), max(0, int(y1 - dh)), min(1000, int(x2 + dw)), min(1000, int(y2 + dh))]


class EmbeddedPolicy(BaseChatModel):
    """Deterministic invoke-and-reason policy (no LLM needed).

    Args:
        weak_score: a top candidate below this counts as weak evidence and triggers a re-check.
        recheck_threshold: score threshold of the re-check call.
        max_regions: how many top candidates to describe.
        classify_regions: how many top candidates the second-look classifier judges (besides the
            whole image).
        knowledge_k: passages to retrieve.
    """

    weak_score: float = 0.5
    recheck_threshold: float = 0.1
    disagreement_votes: int = 2
    max_regions: int = 3
    classify_regions: int = 2
    knowledge_k: int = 3
    bound_tool_names: list[str] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "echo-embedded-policy"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"weak_score": self.weak_score, "recheck_threshold": self.recheck_threshold}

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> EmbeddedPolicy:  # type: ignore[override]
        names = [convert_to_openai_tool(t)["function"]["name"] for t in tools]
        return self.model_copy(update={"bound_tool_names": names})

    # -- decision ------------------------------------------------------------------------------------
    def decide(self, messages: Sequence[BaseMessage]) -> AIMessage:
        """The next assistant turn for a conversation."""
        turn = sum(1 for m in messages if isinstance(m, AIMessage))
        detect_tool = next((n for n in self.bound_tool_names if n.startswith("detect_")), None)
        results = _tool_results(messages)
        detections = [(d, a) for n, d, a, err in results if n == detect_tool and not err and d]
        detect_errors = [a for n, _, a, err in results if n == detect_tool and err]
        described = any(n == "describe_image" and not err for n, _, _, err in results)
        describe_failed = any(n == "describe_image" and err for n, _, _, err in results)
        knowledge = any(n == "retrieve_knowledge" and not err for n, _, _, err in results)
        knowledge_failed = any(n == "retrieve_knowledge" and err for n, _, _, err in results)

        def call(name: str, args: dict[str, Any], why: str) -> AIMessage:
            return AIMessage(
                content=why,
                tool_calls=[{"name": name, "args": args, "id": f"call_{turn}_0", "type": "tool_call"}],
            )

        if detect_tool and not detections and not detect_errors:
            return call(detect_tool, {"score_threshold": 0.25}, "Running the lesion detector first.")

        candidates = [c for d, _ in detections for c in d.get("candidates", [])]
        top = max(candidates, key=lambda c: c["score"], default=None)
        rechecked = any(a.get("tta") for _, a in detections) or any(a.get("tta") for a in detect_errors)
        if detect_tool and detections and not rechecked and (top is None or top["score"] < self.weak_score):
            why = (
                "No candidate above threshold; re-checking with test-time augmentation and a lower threshold."
                if top is None
                else f"Top candidate is weak (score {top['score']:.2f}); re-checking with test-time augmentation."
            )
            return call(detect_tool, {"score_threshold": self.recheck_threshold, "tta": True}, why)

        latest = detections[-1][0] if detections else {"candidates": []}
        ranked = sorted(latest.get("candidates", []), key=lambda c: -c["score"])[: self.max_regions]
        classify_tool = next((n for n in self.bound_tool_names if n.startswith("classify_")), None)
        if classify_tool and not any(n == classify_tool for n, _, _, _ in results):
            # candidates by id: the tools use their exact pixel boxes (no 0..1000 round trip)
            chosen = ranked[: self.classify_regions]
            cargs: dict[str, Any] = {"whole_image": True}
            if chosen:
                cargs["detection_ids"] = [c["id"] for c in chosen]
            return call(classify_tool, cargs, "Taking a second look: classifying the candidates and the whole image.")
        if "describe_image" in self.bound_tool_names and not described and not describe_failed:
            args: dict[str, Any] = {"detection_ids": [c["id"] for c in ranked]} if ranked else {"regions": []}
            return call("describe_image", args, "Describing the image and the top candidates.")

        region_checked = any(a.get("region") for _, a in detections) or any(a.get("region") for a in detect_errors)
        if detect_tool and described and ranked and not region_checked and not knowledge:
            why = self._disagreement(messages, ranked[0])
            if why:
                return call(detect_tool, {"score_threshold": self.recheck_threshold, "tta": True,
                                          "region": _expand(ranked[0]["box"], 0.25)}, why)

        if "retrieve_knowledge" in self.bound_tool_names and not knowledge and not knowledge_failed:
            return call("retrieve_knowledge", {"query": self._query(messages, ranked), "k": self.knowledge_k},
                        "Retrieving knowledge for the leading hypothesis.")

        summary = (
            f"Evidence gathered: {len(detections)} detector call(s), "
            f"{len(candidates)} candidate(s), top {top['label']} {top['score']:.2f}." if top
            else f"Evidence gathered: {len(detections)} detector call(s), no candidate lesion."
        )
        return AIMessage(content=summary)

    def _disagreement(self, messages: Sequence[BaseMessage], top: dict[str, Any]) -> str | None:
        """A reason to re-examine the top candidate when its label and its descriptors disagree."""
        descs = self._descriptors_of(messages, top.get("id"))
        if not descs:
            return None
        values = {k: (v or {}).get("value") for k, v in descs.items()}
        bad = [f"{k} {v}" for k, v in values.items() if v in SUSPICIOUS.get(k, ())]
        good = [f"{k} {v}" for k, v in values.items() if v in REASSURING.get(k, ())]
        label = str(top.get("label", ""))
        if label == "benign" and len(bad) >= self.disagreement_votes:
            return f"Candidate {top.get('id')} is labelled benign but looks suspicious ({', '.join(bad)}); re-examining it."
        if label == "malignant" and len(good) >= self.disagreement_votes + 1 and not bad:
            return f"Candidate {top.get('id')} is labelled malignant but looks benign ({', '.join(good)}); re-examining it."
        return None

    @staticmethod
    def _descriptors_of(messages: Sequence[BaseMessage], detection_id: Any) -> dict[str, Any]:
        for name, data, _, err in reversed(_tool_results(messages)):
            if name == "describe_image" and data and not err:
                for r in data.get("regions") or []:
                    if r.get("detection_id") == detection_id or detection_id is None:
                        return r.get("descriptors") or {}
        return {}

    def _query(self, messages: Sequence[BaseMessage], ranked: list[dict[str, Any]]) -> str:
        terms: list[str] = []
        if ranked:
            terms.append(str(ranked[0]["label"]))
        for name, data, _, err in _tool_results(messages):
            if name == "describe_image" and data and not err:
                regions = data.get("regions") or []
                if regions:
                    descs = regions[0].get("descriptors", {})
                    for key in _QUERY_DESCRIPTORS:
                        v = descs.get(key, {}).get("value")
                        if isinstance(v, str) and v not in ("none", "absent"):
                            terms.append(f"{v} {key.replace('_', ' ')}" if key != "echo_pattern" else v)
        if not ranked:
            terms.append("normal findings no lesion")
        return " ".join(terms)[:500]

    # -- BaseChatModel -----------------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self.decide(messages))])
