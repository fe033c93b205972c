"""Agent traces: conversations recorded from the agent's own runs, for a small policy that learns to
drive the tools and to read them.

The nine curriculum tasks teach a model that can look at the image: their targets are the ground
truth. A model too small to see (the micro policy of ``tools/train_micro_policy.py``) cannot learn
a ground-truth label from pixels; what it can learn is to call the tools the way the embedded policy
does and to write the Diagnosis that the tools' evidence supports. Two tasks do that:

``agent_trace``
    The reasoner's side of one run of an agent (by default the embedded policy): the system prompt
    and user turn the reasoner node builds, every tool call the policy made (with its arguments) and
    every tool result as the graph returned it, then the policy's closing turn. Narration before a
    call is dropped (the graph ignores it); the closing turn is ``closing_text``.
``agent_final``
    The final-reasoning turn of the same run: :meth:`LLMFinalizer.build_messages` on the run's state
    and fusion result, answered with a compact Diagnosis of that result (probabilities to two
    decimals, the category the organ's bands give for them, the findings citing their detection ids
    instead of copying boxes, a one-line rationale), checked with :func:`validate_diagnosis` and :func:`check_grounding` -- every
    target is an answer ``LLMFinalizer`` accepts.

``agent_final`` variants (``final_variants=k``)
    ``k`` more final turns per run in which the fusion result is replaced by a counterfactual one
    (probabilities drawn from a flat Dirichlet, the label their argmax, the category of the organ's
    bands): the baseline in the prompt and the target change together, so a model can no longer
    lower its loss by writing the commonest numbers and must take them from the baseline. Such a
    target is not what the evidence supports (the tool results are left as they were); the variants
    teach reading, and are recorded with ``meta["counterfactual"] = True``.

The tool results are the agent's real tools (packaged detectors, second-look classifiers, captioner,
retriever), so the conversations are in the inference format by construction. Records carry the
same ``truth`` as the nine tasks, so the GRPO rewards can score rollouts from them against the
ground truth.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, ToolMessage

from ...errors import EchoInputError
from ...eval.manifest import ManifestImage
from ...organs import OrganSpec, get_organ
from ...prompts import system_prompt
from ...schemas import Diagnosis, detection_candidates
from .tasks import CurriculumSample

#: The two trace tasks.
TRACE_TASKS: tuple[str, ...] = ("agent_trace", "agent_final")
#: The closing turn of the reasoner in ``agent_trace`` samples.
CLOSING_TEXT = "Evidence gathered."


def compact_diagnosis(dx: Diagnosis, organ: OrganSpec, *, digits: int = 2, box_by_id: bool = False) -> dict[str, Any]:
    """The model-facing Diagnosis of ``dx`` in as few tokens as ``LLMFinalizer`` accepts.

    Probabilities are rounded to ``digits`` decimals (the largest absorbs the rounding so they sum to
    1), the category is re-derived from the rounded probability of the positive label with the organ's
    bands (a category head's category is kept), findings keep box, label, score and detection ids,
    and the rationale is one line naming the label and the strongest finding. With ``box_by_id`` a
    finding that cites detector candidates leaves its box out (the finalizer takes the first cited
    candidate's), and the rationale names the candidate instead of its box."""
    from ...reasoners.llm_finalizer import rounded_model_diagnosis

    full = rounded_model_diagnosis(dx, organ, digits=digits)
    probs = full["probabilities"]
    findings = [
        {**({} if box_by_id and f.get("detection_ids") else {"box": f["box"]}),
         "label": f["label"], "score": f["score"],
         **({"detection_ids": list(f["detection_ids"])} if f.get("detection_ids") else {})}
        for f in full.get("findings") or []
    ]
    category = full.get("category")
    lead = findings[0] if findings else None
    where = (lead.get("box") or lead["detection_ids"][0]) if lead else None
    rationale = (f"{full['label']}; strongest finding {lead['label']} at {where}." if lead
                 else f"{full['label']}; no finding.")
    out: dict[str, Any] = {"organ": organ.name, "label": full["label"], "probabilities": probs, "category": category}
    if category is not None:
        out["category_system"] = organ.category_system
    out.update(findings=findings, rationale=rationale, indeterminate=bool(full.get("indeterminate")))
    return out


def _reasoner_turns(messages: Sequence[BaseMessage], closing_text: str) -> list[BaseMessage]:
    """The run's messages as the reasoner saw and wrote them, without the reason node's Diagnosis."""
    out: list[BaseMessage] = []
    for m in messages:
        if isinstance(m, AIMessage) and m.name == "diagnosis":
            continue
        if isinstance(m, AIMessage):
            out.append(AIMessage(content="" if m.tool_calls else closing_text, tool_calls=list(m.tool_calls)))
        elif isinstance(m, ToolMessage):
            out.append(ToolMessage(content=m.content, tool_call_id=m.tool_call_id, name=m.name))
        else:
            out.append(m)
    return out


def agent_traces(
    agent: Any,
    images: Sequence[ManifestImage],
    *,
    tasks: Sequence[str] = TRACE_TASKS,
    closing_text: str = CLOSING_TEXT,
    forbidden_splits: Sequence[str] = ("test",),
    on_error: Callable[[ManifestImage, Exception], None] | None = None,
    box_by_id: bool = True,
    final_variants: int = 0,
    seed: int = 0,
    answer: str = "diagnosis",
) -> list[CurriculumSample]:
    """Run ``agent`` (an :class:`~echo_agent.EchoAgent`) on each image, with the image's organ, and
    record its ``tasks`` (see the module doc). ``box_by_id``: the ``agent_final`` targets cite
    detector candidates instead of copying their boxes (:func:`compact_diagnosis`); every sample's
    ``truth["detections"]`` maps the run's candidate ids to their 0..1000 boxes, for the rewards.
    ``final_variants``: counterfactual ``agent_final`` samples per run (module doc), drawn with
    ``seed``; a variant the finalizer's validator would refuse is left out. ``answer``: the final
    turns in ``LLMFinalizer``'s answer format (``"decision"``: the prompt asks for the decision and
    the target is :func:`~echo_agent.reasoners.decision.decision_from_diagnosis` of the fusion result).

    Raises :class:`~echo_agent.errors.EchoInputError` for an image of a forbidden split or an unknown
    task. An image whose run fails is skipped and reported to ``on_error`` (raised without one); so is
    a run whose compact Diagnosis the finalizer's validator would refuse (never seen on the packaged
    organs, but a plug-in organ's bands could make it happen)."""
    from ...reasoners.decision import complete_decision, decision_from_diagnosis
    from ...reasoners.llm_finalizer import ANSWER_FORMATS, LLMFinalizer, check_grounding, validate_diagnosis

    unknown = [t for t in tasks if t not in TRACE_TASKS]
    if unknown:
        raise EchoInputError(f"unknown trace task(s) {unknown}; choose from {list(TRACE_TASKS)}")
    if final_variants < 0:
        raise EchoInputError(f"final_variants must be >= 0, got {final_variants}")
    if answer not in ANSWER_FORMATS:
        raise EchoInputError(f"answer must be one of {list(ANSWER_FORMATS)}, got {answer!r}")
    finalizer = LLMFinalizer(model=None, answer=answer)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    out: list[CurriculumSample] = []
    for im in images:
        if im.split in forbidden_splits:
            raise EchoInputError(f"{im.key} is in the {im.split!r} split, which traces must never use")
        try:
            spec = get_organ(im.organ)
            # the image's clinical context too, as the eval harness and fusion fitting pass it: a policy
            # trained only on prompts without it fails on every prompt that has one
            state = agent.run_state(str(im.image), organ=spec.name, context=im.clinical_context)
            dx = Diagnosis.model_validate(state["diagnosis"])
            ref = state["image"]
            w, h = int(ref["width"]), int(ref["height"])
            detections = detection_candidates(state.get("evidence") or [])
            candidates = {k: d.box for k, d in detections.items()}
            truth = {"label": im.label, "boxes": [b.to_model(w, h) for b in im.boxes],
                     "boxes_px": [b.to_list() for b in im.boxes], "width": w, "height": h,
                     "detections": {k: b.to_model(w, h) for k, b in candidates.items()}}
            paths = {str(ref["id"]): str(im.image)}
            meta = {"group": "agent traces", "reasoner": dx.reasoner or "", "tools": [
                c["name"] for m in state["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]}
            samples: list[CurriculumSample] = []
            if "agent_trace" in tasks:
                msgs = [SystemMessage(system_prompt(spec, agent.max_tool_calls)),
                        *_reasoner_turns(state["messages"], closing_text)]
                samples.append(CurriculumSample("agent_trace", im.key, spec.name, im.split, msgs, paths, meta, truth))
            if "agent_final" in tasks:
                finals = [(dx, meta)] + [(_counterfactual(dx, spec, rng), {**meta, "counterfactual": True})
                                         for _ in range(final_variants)]
                for k, (fdx, fmeta) in enumerate(finals):
                    try:
                        if answer == "decision":
                            target = decision_from_diagnosis(fdx)
                            complete_decision(json.loads(json.dumps(target)), spec, fdx, detections)
                        else:
                            target = compact_diagnosis(fdx, spec, box_by_id=box_by_id)
                            checked = validate_diagnosis(json.loads(json.dumps(target)), spec, w, h, detections=candidates)
                            check_grounding(checked, state)
                    except ValueError:
                        if k == 0:
                            raise
                        continue  # a counterfactual the validator refuses teaches nothing
                    prompt = finalizer.build_messages(state, spec, fdx)
                    msgs = [*prompt, AIMessage(content=json.dumps(target, separators=(",", ":"), ensure_ascii=False))]
                    samples.append(CurriculumSample("agent_final", im.key, spec.name, im.split, msgs, paths, fmeta, truth))
        except Exception as exc:  # noqa: BLE001 - one image's failure must not lose the others
            if on_error is None:
                raise
            on_error(im, exc)
            continue
        out.extend(samples)
    return out


def _counterfactual(dx: Diagnosis, organ: OrganSpec, rng: np.random.Generator) -> Diagnosis:
    """``dx`` with probabilities drawn from a flat Dirichlet over the organ's labels, the label their
    argmax and the category the organ's bands give (a category head's category is kept)."""
    labels = list(organ.image_labels)
    p = rng.dirichlet(np.ones(len(labels)))
    probs = {lbl: float(v) for lbl, v in zip(labels, p, strict=True)}
    label = labels[int(np.argmax(p))]
    category = dx.category
    if organ.category_from_probability:
        category = organ.category_for(probs[organ.positive_label], lesion_found=bool(dx.findings) or label != organ.normal_label)
    return dx.model_copy(update={"probabilities": probs, "label": label, "category": category})


def run_validity(state: dict[str, Any]) -> dict[str, Any]:
    """How well the reasoner of a finished run (the graph's final state) used its tools and wrote its
    answer: ``tool_calls`` (calls it made), ``valid_tool_calls`` (calls that parsed, named a tool of
    the organ and ran without an error result), ``closed`` (it stopped calling tools by itself rather
    than at the budget), ``diagnosis`` (``"first"``: an ``LLMFinalizer`` answer accepted as written,
    ``"repaired"``: accepted after the repair turn, ``"fallback"``: refused, the fusion result stands,
    ``"fusion"``: no LLM finalizer)."""
    msgs = state.get("messages") or []
    errors = {m.tool_call_id for m in msgs if isinstance(m, ToolMessage) and getattr(m, "status", "success") == "error"}
    calls = [c for m in msgs if isinstance(m, AIMessage) and m.name != "diagnosis" for c in m.tool_calls]
    last_reasoner = next((m for m in reversed(msgs) if isinstance(m, AIMessage) and m.name != "diagnosis"), None)
    from ...reasoners.llm_finalizer import FALLBACK_WARNING, REPAIRED_WARNING

    warnings = [str(w) for w in (state.get("diagnosis") or {}).get("warnings") or []]
    reasoner = str((state.get("diagnosis") or {}).get("reasoner") or "")
    if any(w.startswith(FALLBACK_WARNING) for w in warnings):
        dx = "fallback"
    elif any(w.startswith(REPAIRED_WARNING) for w in warnings):
        dx = "repaired"
    else:
        dx = "first" if reasoner.startswith("llm:") else "fusion"
    return {
        "tool_calls": len(calls),
        "valid_tool_calls": sum(1 for c in calls if c.get("id") not in errors),
        "closed": last_reasoner is not None and not last_reasoner.tool_calls,
        "diagnosis": dx,
    }


__all__ = ["CLOSING_TEXT", "TRACE_TASKS", "agent_traces", "compact_diagnosis", "run_validity"]
