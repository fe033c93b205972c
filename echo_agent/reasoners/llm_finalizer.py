"""``LLMFinalizer``: the reason node asks a chat model for the final Diagnosis.

It plugs into :func:`echo_agent.build_graph` / :class:`echo_agent.EchoAgent` as ``finalizer=``. The
fusion result is computed first (it is the baseline and the fallback); then the model gets the
image, the delimited clinical context, the evidence and the baseline, and must answer with one JSON
object that follows the organ's Diagnosis schema (structured output where the model supports it,
otherwise JSON in text). The answer is validated:

* JSON that parses, fits the schema and :func:`echo_agent.messages.diagnosis_from_model`;
* ``organ`` is the run's organ; the probabilities cover exactly the organ's labels;
* the category (BI-RADS for breast) is the one the organ's likelihood bands give for the stated
  probability of the positive label (a category the probabilities do not support is refused);
* the findings and evidence cite only ids that the tools returned (no invented detections).

An invalid answer gets ONE repair attempt with the validation error; if that fails too, the fusion
result is returned with ``indeterminate=True`` and the reason in ``indeterminate_reason`` and
``warnings``. The run never fails because the LLM wrote something unusable.

The clinical context reaches the model only inside the ``<clinical_context>`` block of the user turn,
as escaped JSON (see :func:`echo_agent.prompts.user_prompt`); the baseline's clinical evidence item
points at that block instead of repeating the text.

Example::

    from echo_agent import EchoAgent
    from echo_agent.reasoners.llm_finalizer import LLMFinalizer
    agent = EchoAgent(reasoner=llm, finalizer=LLMFinalizer(llm), organ="breast")
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from pydantic import ValidationError

from ..messages import diagnosis_from_model, diagnosis_to_model, dumps, evidence_to_model, user_message
from ..organs import OrganSpec
from ..prompts import read_prompt
from ..schemas import Box, ClinicalContext, Diagnosis, detection_candidates, parse_evidence
from ._multimodal import is_image_block, text_of
from .decision import complete_decision, decision_from_diagnosis, decision_schema

_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_THINK_RE = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
_UNCALIBRATED = "probabilities come from the LLM reasoner and are not calibrated"
#: ``LLMFinalizer(answer=...)``: the whole Diagnosis, or the decision (:mod:`echo_agent.reasoners.decision`).
ANSWER_FORMATS = ("diagnosis", "decision")
#: How a Diagnosis's warnings say the LLM's answer was refused (the fusion result stands) ...
FALLBACK_WARNING = "LLM finalizer fell back to fusion"
#: ... or was accepted only after the repair turn.
REPAIRED_WARNING = "the LLM's first diagnosis was invalid and was repaired"


def _escape(text: str) -> str:
    # Tags cannot be closed or opened from inside data: '<' and '>' become JSON unicode escapes.
    return text.replace("<", "\\u003c").replace(">", "\\u003e")


def diagnosis_schema(organ: OrganSpec) -> dict[str, Any]:
    """JSON schema of the model-facing Diagnosis for one organ (labels and categories as enums,
    boxes as four integers in 0..1000). Suitable for constrained decoding (vLLM ``json_schema``)."""
    labels = list(organ.image_labels)
    cats = [b.name for b in organ.categories] + ([organ.no_lesion_category] if organ.no_lesion_category else [])
    nullable_str = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    category = {"anyOf": [{"type": "string", "enum": cats}, {"type": "null"}]} if cats else {"type": "null"}
    return {
        "title": f"{organ.name}_diagnosis",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "organ": {"type": "string", "enum": [organ.name]},
            "label": {"type": "string", "enum": labels},
            "probabilities": {
                "type": "object",
                "properties": {lbl: {"type": "number", "minimum": 0, "maximum": 1} for lbl in labels},
                "required": labels,
                "additionalProperties": False,
            },
            "category": category,
            "category_system": nullable_str,
            "findings": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                                "minItems": 4, "maxItems": 4},
                        "label": {"type": "string", "enum": labels},
                        "score": {"type": "number", "minimum": 0, "maximum": 1},
                        "category": category,
                        "detection_ids": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["label", "score"],
                },
            },
            "evidence": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "kind": {"type": "string", "enum": ["detection", "description", "knowledge", "clinical", "image", "classification"]},
                        "ref": {"type": "string"},
                        "summary": {"type": "string"},
                    },
                    "required": ["kind", "ref"],
                },
            },
            "rationale": {"type": "string"},
            "recommendation": {"type": "string"},
            "indeterminate": {"type": "boolean"},
            "indeterminate_reason": nullable_str,
        },
        "required": ["organ", "label", "probabilities", "rationale", "indeterminate"],
    }


def report_template(organ: OrganSpec) -> str:
    """The organ's report instructions (``report_<organ>.md``, else built from ``report_sections``)."""
    try:
        return read_prompt(f"report_{organ.name}.md").strip()
    except FileNotFoundError:
        sections = organ.report_sections or ("Findings", "Assessment")
        return read_prompt("report_default.md").format(
            sections="\n".join(f"{s}: ..." for s in sections)
        ).strip()


def extract_json(text: str) -> dict[str, Any]:
    """The JSON object of a reply (fences, ``<think>`` sections and text around it are dropped).

    Raises ``ValueError`` saying what was wrong.
    """
    text = _THINK_RE.sub("", text or "").strip()
    m = _FENCE_RE.search(text)
    if m:
        text = m.group(1).strip()
    start, end = text.find("{"), text.rfind("}")
    if start < 0:
        raise ValueError("the answer contains no JSON object")
    if end <= start:
        raise ValueError("the answer's JSON object is never closed (truncated output?)")
    try:
        data = json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"the answer is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(data, dict):
        raise ValueError("the answer must be one JSON object")
    return data


def _pydantic_error(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        where = ".".join(str(x) for x in e.get("loc", ())) or "diagnosis"
        parts.append(f"{where}: {e.get('msg')}")
    return "; ".join(parts)


def fill_boxes_from_ids(data: dict[str, Any], detections: Mapping[str, Box]) -> dict[str, Any]:
    """The model-written Diagnosis with a box filled in for each finding that gives none but cites
    detector candidates: the first cited candidate's pixel box, exactly (a model need not copy
    numbers; ``diagnosis_from_model`` converts only list boxes)."""
    findings = data.get("findings")
    if not isinstance(findings, list) or all(not isinstance(f, dict) or "box" in f for f in findings):
        return data
    filled = []
    for i, f in enumerate(findings):
        if isinstance(f, dict) and "box" not in f:
            ids = f.get("detection_ids") or []
            if not isinstance(ids, list) or not ids:
                raise ValueError(f"findings[{i}] has no box; give its box, or cite a detector candidate in detection_ids")
            if ids[0] not in detections:
                raise ValueError(f"findings[{i}] takes its box from {ids[0]!r}, which no detector call returned; "
                                 "cite only candidate ids from the evidence")
            f = {**f, "box": detections[ids[0]]}
        filled.append(f)
    return {**data, "findings": filled}


#: A model-written probability vector whose sum is this close to 1 is rescaled to sum to 1 (two-decimal
#: rounding alone leaves sums such as 0.99 or 1.01, and a model's arithmetic is rough); one farther off
#: is refused with the sum named.
PROBABILITY_SUM_TOLERANCE = 0.05
RESCALED_WARNING = "the model's probabilities were rescaled to sum to 1"


def validate_diagnosis(data: dict[str, Any], organ: OrganSpec, width: int, height: int,
                       *, check_category: bool = True, detections: Mapping[str, Box] | None = None) -> Diagnosis:
    """Check a model-written Diagnosis against the organ; raise ``ValueError`` naming the problem.

    ``detections`` (candidate id -> pixel box, :func:`echo_agent.schemas.detection_boxes`) lets a
    finding give detection ids instead of a box. Probabilities that sum to within
    :data:`PROBABILITY_SUM_TOLERANCE` of 1 are rescaled (the Diagnosis then carries
    :data:`RESCALED_WARNING`); the category check reads the rescaled values.
    """
    if detections is not None:
        data = fill_boxes_from_ids(data, detections)
    if data.get("organ", organ.name) != organ.name:
        raise ValueError(f"organ must be {organ.name!r}, got {data.get('organ')!r}")
    data = {**data, "organ": organ.name}
    probs = data.get("probabilities")
    if not isinstance(probs, dict) or set(probs) != set(organ.image_labels):
        got = sorted(probs) if isinstance(probs, dict) else probs
        raise ValueError(f"probabilities must give exactly the labels {list(organ.image_labels)}, got {got}")
    rescaled_from = None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in probs.values()):
        total = float(sum(probs.values()))
        if 1e-3 < abs(total - 1.0) <= PROBABILITY_SUM_TOLERANCE:
            data = {**data, "probabilities": {k: float(v) / total for k, v in probs.items()}}
            rescaled_from = total
    try:
        dx = diagnosis_from_model(data, width, height)
    except ValidationError as exc:
        raise ValueError(_pydantic_error(exc)) from None
    except (TypeError, KeyError) as exc:
        raise ValueError(f"the diagnosis does not fit the schema ({exc})") from None
    allowed = [b.name for b in organ.categories] + ([organ.no_lesion_category] if organ.no_lesion_category else [])
    if dx.category is not None and dx.category not in allowed:
        raise ValueError(f"category {dx.category!r} is not one of {allowed}")
    # a category head's category is read by the model from the classify tool's distribution: no band check
    if check_category and organ.category_from_probability and dx.category is not None:
        p = dx.probabilities[organ.positive_label]
        lesion = bool(dx.findings) or dx.label != organ.normal_label
        expected = organ.category_for(p, lesion_found=lesion)
        if expected != dx.category:
            raise ValueError(
                f"category {dx.category!r} is inconsistent with P({organ.positive_label}) = {p:.3f}, which maps "
                f"to {organ.category_system or 'category'} {expected!r}; make the category and the probabilities agree"
            )
    if dx.category is not None and not dx.category_system:
        dx = dx.model_copy(update={"category_system": organ.category_system})
    if rescaled_from is not None:
        dx = dx.model_copy(update={"warnings": [*dx.warnings, f"{RESCALED_WARNING} (they summed to {rescaled_from:.3f})"]})
    return dx


def rounded_model_diagnosis(dx: Diagnosis, organ: OrganSpec, *, digits: int = 2) -> dict[str, Any]:
    """``dx`` in the model-facing format with the numbers a model would write: probabilities rounded
    to ``digits`` decimals (the largest absorbs the rounding, so they sum to 1), the category of the
    rounded probability of the positive label (so the result passes :func:`validate_diagnosis`'s
    category check; a category head's category is kept), finding scores rounded to ``digits``.

    The finalizer's baseline and the SFT targets (``compact_diagnosis``) are written with it, so a
    model can take the baseline's numbers by copying them.
    """
    data = diagnosis_to_model(dx)
    labels = list(organ.image_labels)
    probs = {lbl: round(float(data["probabilities"].get(lbl, 0.0)), digits) for lbl in labels}
    top = max(labels, key=lambda k: probs[k])
    probs[top] = round(probs[top] + 1.0 - sum(probs.values()), digits)
    data["probabilities"] = probs
    data["findings"] = [{**f, "score": round(float(f["score"]), digits)} for f in data.get("findings") or []]
    if organ.category_from_probability and data.get("category") is not None:
        lesion = bool(data["findings"]) or data["label"] != organ.normal_label
        data["category"] = organ.category_for(probs[organ.positive_label], lesion_found=lesion)
    return data


def known_refs(state: dict[str, Any]) -> set[str]:
    """Ids the Diagnosis may cite: evidence ids, detection ids, ``<kb id>:<snippet id>``, ``clinical``."""
    refs = {"clinical", "image"}
    for e in state.get("evidence") or []:
        eid = str(e.get("id", ""))
        refs.add(eid)
        refs.update(str(d.get("id")) for d in e.get("detections") or [])
        refs.update(f"{eid}:{sn.get('id')}" for sn in e.get("snippets") or [])
    return refs


def check_grounding(dx: Diagnosis, state: dict[str, Any]) -> None:
    """Raise ``ValueError`` when the Diagnosis cites a detection or evidence no tool returned."""
    known = known_refs(state)
    for f in dx.findings:
        missing = [i for i in f.detection_ids if i not in known]
        if missing:
            raise ValueError(f"a finding cites detection(s) {missing} that no tool returned; cite only ids from the evidence")
    for r in dx.evidence:
        if r.ref not in known:
            raise ValueError(f"evidence ref {r.ref!r} was not returned by any tool; cite only ids from the evidence")


class LLMFinalizer:
    """A :data:`echo_agent.graph.Finalizer` that asks a chat model for the Diagnosis.

    Args:
        model: any LangChain chat model (an endpoint model, :class:`QwenVLChatModel`, ...). Not bound
            to tools.
        structured: ``'auto'`` (the provider's JSON-schema structured output for OpenAI-compatible
            models; constrained decoding for :class:`QwenVLChatModel` where ``lm-format-enforcer`` is
            installed; JSON in text otherwise), ``'json_schema'`` or ``'text'``.
        include_image: send the image with the request (turn off for text-only models).
        check_category: refuse a category the probabilities do not support.
        check_grounding: refuse findings and evidence refs that cite ids no tool returned.
        max_repairs: how many repair attempts an invalid answer gets (the issue asks for one).
        name: recorded as the Diagnosis's ``reasoner`` (default: ``llm:<model name>``).
        answer: ``'diagnosis'`` (default): the model writes the whole Diagnosis; ``'decision'``: it
            writes the label, the candidates its findings cite, a rationale and whether to refer,
            and the probabilities, category, boxes and scores come from the tools and the calibrated
            fusion (:mod:`echo_agent.reasoners.decision`).
    """

    def __init__(
        self,
        model: Any,
        *,
        structured: Literal["auto", "json_schema", "text"] = "auto",
        include_image: bool = True,
        check_category: bool = True,
        check_grounding: bool = True,
        max_repairs: int = 1,
        name: str | None = None,
        answer: Literal["diagnosis", "decision"] = "diagnosis",
    ) -> None:
        if structured not in ("auto", "json_schema", "text"):
            raise ValueError(f"structured must be 'auto', 'json_schema' or 'text', got {structured!r}")
        if answer not in ANSWER_FORMATS:
            raise ValueError(f"answer must be one of {', '.join(map(repr, ANSWER_FORMATS))}, got {answer!r}")
        self.answer = answer
        self.model = model
        self.structured = structured
        self.include_image = include_image
        self.check_category = check_category
        self.check_grounding = check_grounding
        self.max_repairs = max(0, int(max_repairs))
        model_name = getattr(model, "model_name", None) or getattr(model, "model_path", None) or type(model).__name__
        self.name = name or f"llm:{model_name}"

    # -- prompt -----------------------------------------------------------------------------------------
    def build_messages(self, state: dict[str, Any], organ: OrganSpec, baseline: Diagnosis) -> list[BaseMessage]:
        """System instructions, then one user turn: the image, the delimited clinical context, the
        evidence and the baseline. Public so the SFT curriculum can build the same final turn."""
        labels = list(organ.image_labels)
        none_seen = f"; {organ.no_lesion_category!r} when no lesion is seen" if organ.no_lesion_category else ""
        if organ.category_from_probability:
            bands = ", ".join(f"{b.name}: {b.low:g}-{b.high:g}" for b in organ.categories)
            category_rule = (
                f"- `category` is the {organ.category_system} category that the probability of "
                f"{organ.positive_label!r} falls in ({bands}){none_seen}."
            )
        elif organ.categories:
            how = ("the number of suspicious features its descriptors show" if organ.category_by_suspicious_count
                   else "the category distribution the classify tool gave its region")
            names = ", ".join(b.name for b in organ.categories)
            category_rule = (
                f"- `category` is the {organ.category_system} category of the leading finding ({names}), read from "
                f"{how}; the baseline's category is that reading{none_seen}."
            )
        else:
            category_rule = "- `category` is null for this organ."
        system = read_prompt("finalize_decision.md" if self.answer == "decision" else "finalize.md").format(
            organ_name=organ.name, labels=", ".join(labels), category_rule=category_rule,
            schema=json.dumps(self.answer_schema(organ), separators=(",", ":")), report_template=report_template(organ),
        ).strip()
        first = next((m for m in state.get("messages") or [] if isinstance(m, HumanMessage)), None)
        if first is None:
            clinical = state.get("clinical")
            ctx = ClinicalContext.model_validate(clinical) if clinical else None
            first = user_message(state["image"], organ, ctx)
        blocks = first.content if isinstance(first.content, list) else [{"type": "text", "text": first.content}]
        if not self.include_image:
            blocks = [b for b in blocks if not is_image_block(b)]
        evidence = [evidence_to_model(parse_evidence(e)) for e in state.get("evidence") or []]
        shown = self._decision_baseline(baseline, organ) if self.answer == "decision" else self._baseline(baseline, organ)
        request = read_prompt("finalize_request.md").format(
            evidence_json=_escape(dumps(evidence)), baseline_json=_escape(dumps(shown)),
        ).strip()
        return [SystemMessage(system), HumanMessage(content=[*blocks, {"type": "text", "text": "\n\n" + request}])]

    @staticmethod
    def _baseline(dx: Diagnosis, organ: OrganSpec) -> dict[str, Any]:
        # in the answer's own number format: a model can keep the baseline by copying its numbers
        data = rounded_model_diagnosis(dx, organ)
        # The clinical text lives in <clinical_context> only; repeating it here would put patient
        # free text outside the delimited block.
        data["evidence"] = [
            {**e, "summary": "see <clinical_context>"} if e.get("kind") == "clinical" else e
            for e in data.get("evidence", [])
        ]
        return data

    @staticmethod
    def _decision_baseline(dx: Diagnosis, organ: OrganSpec) -> dict[str, Any]:
        # the decision the fusion makes, key for key as the answer writes it (keeping it is a copy),
        # then its calibrated numbers for the model to weigh
        numbers = rounded_model_diagnosis(dx, organ)
        return {**decision_from_diagnosis(dx), "probabilities": numbers["probabilities"], "category": numbers.get("category")}

    def answer_schema(self, organ: OrganSpec) -> dict[str, Any]:
        """The JSON schema the model's answer follows (the Diagnosis's, or the decision's)."""
        return decision_schema(organ) if self.answer == "decision" else diagnosis_schema(organ)

    # -- asking ---------------------------------------------------------------------------------------
    def _uses_json_schema(self) -> bool:
        if self.structured != "auto":
            return self.structured == "json_schema"
        from .qwen_vl import QwenVLChatModel

        if isinstance(self.model, QwenVLChatModel):  # constrained decoding where lm-format-enforcer is installed
            return importlib.util.find_spec("lmformatenforcer") is not None
        try:
            from langchain_openai.chat_models.base import BaseChatOpenAI
        except ImportError:
            return False
        return isinstance(self.model, BaseChatOpenAI)

    def _ask(self, messages: list[BaseMessage], organ: OrganSpec) -> str:
        if self._uses_json_schema():
            runnable = self.model.with_structured_output(
                self.answer_schema(organ), method="json_schema", include_raw=True
            )
            out = runnable.invoke(messages)
            raw = out.get("raw") if isinstance(out, dict) else out
            return text_of(getattr(raw, "content", raw))
        reply = self.model.invoke(messages)
        return text_of(getattr(reply, "content", reply))

    def __call__(self, state: dict[str, Any], organ: OrganSpec, fusion_dx: Diagnosis) -> Diagnosis:
        ref = state.get("image") or {}
        width = int(fusion_dx.image_width or ref.get("width") or 0)
        height = int(fusion_dx.image_height or ref.get("height") or 0)
        messages = self.build_messages(state, organ, fusion_dx)
        detections = detection_candidates(state.get("evidence") or [])  # ids a finding may cite
        candidates = {k: d.box for k, d in detections.items()}
        error = ""
        for attempt in range(self.max_repairs + 1):
            try:
                text = self._ask(messages, organ)
            except (TypeError, AttributeError, NameError):
                raise  # programming errors surface
            except Exception as exc:  # network, server, rate limit: fall back, do not fail the run
                error = f"the model call failed ({type(exc).__name__}: {exc})"
                break
            try:
                if self.answer == "decision":
                    dx = complete_decision(extract_json(text), organ, fusion_dx, detections)
                else:
                    dx = validate_diagnosis(extract_json(text), organ, width, height, check_category=self.check_category,
                                            detections=candidates)
                    if self.check_grounding:
                        check_grounding(dx, state)
            except ValueError as exc:
                error = str(exc)
                messages = [*messages, AIMessage(content=text[:4000]),
                            HumanMessage(content=read_prompt("finalize_repair.md").format(error=_escape(error)).strip())]
                continue
            repaired = [f"{REPAIRED_WARNING} ({error})"] if attempt else []
            if self.answer == "decision":  # its warnings are the fusion's and the decision note
                return dx.model_copy(update={"reasoner": self.name, "warnings": [*dx.warnings, *repaired]})
            warnings = [w for w in fusion_dx.warnings if not w.startswith("probabilities come from")] + repaired
            return dx.model_copy(update={
                "reasoner": self.name,
                "evidence": dx.evidence or fusion_dx.evidence,
                "warnings": [*warnings, *dx.warnings, _UNCALIBRATED],
            })
        reason = f"the LLM's final diagnosis was not usable ({error}); this is the evidence-fusion result"
        if fusion_dx.indeterminate_reason:
            reason += f", which is itself indeterminate: {fusion_dx.indeterminate_reason}"
        return fusion_dx.model_copy(update={
            "indeterminate": True,
            "indeterminate_reason": reason,
            "recommendation": "The reasoner could not produce a valid diagnosis: refer for a sonographer's or radiologist's review.",
            "warnings": [*fusion_dx.warnings, f"{FALLBACK_WARNING}: {error}"],
        })


__all__ = ["ANSWER_FORMATS", "FALLBACK_WARNING", "PROBABILITY_SUM_TOLERANCE", "REPAIRED_WARNING", "RESCALED_WARNING", "LLMFinalizer", "check_grounding", "diagnosis_schema", "known_refs", "extract_json",
           "fill_boxes_from_ids", "report_template", "rounded_model_diagnosis", "validate_diagnosis"]
