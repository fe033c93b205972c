"""Diagnostic reasoning: ``informed_diagnosis``, ``attribute_reasoning``, ``grounded_diagnosis``.

A mixin of :class:`~echo_agent.training.curriculum.CurriculumBuilder`: the methods use the
builder's shared steps (``self._detect``, ``self.target``, ...)."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import BaseMessage

from .common import _Ctx
from .facts import _phrase
from .tasks import task_questions


class ReasoningTasks:
    """Diagnostic reasoning tasks."""

    def _task_informed_diagnosis(self, ctx: _Ctx) -> tuple[list[BaseMessage] | None, dict[str, Any]]:
        from ...fusion import HeuristicFusion
        from ...reasoners.llm_finalizer import LLMFinalizer

        report = self._detect(ctx, "det1", threshold=self.config.score_threshold, tta=False)
        if report is None:
            return None, {}
        head, parts = self._trajectory(ctx, report=report)
        evidence = [e for e in (*parts["reports"], parts["desc"], parts["kb"]) if e is not None]
        state = {"messages": [head[1]], "image": ctx.ref(), "evidence": [e.model_dump(mode="json") for e in evidence]}
        baseline = HeuristicFusion().fuse(ctx.spec, evidence, clinical=ctx.clinical, image_size=(ctx.w, ctx.h))
        msgs = LLMFinalizer(model=None).build_messages(state, ctx.spec, baseline)
        det_ids = self._matches(ctx, report.detections)
        rationale = self._report_text(ctx, parts["descs"], parts["source"], parts["kb"])
        dx = self.target(ctx, rationale=rationale, evidence=self._evidence_refs(parts, det_ids), detection_ids=det_ids)
        msgs.append(self._final(dx))
        return msgs, {"baseline_label": baseline.label, "detector": report.detector}

    def _task_attribute_reasoning(self, ctx: _Ctx) -> tuple[list[BaseMessage] | None, dict[str, Any]]:
        q = " ".join(task_questions()["attribute_reasoning"].split())
        msgs, parts = self._trajectory(ctx, report=None, describe_regions="truth", question=q)
        descs, kb = parts["descs"], parts["kb"]
        raises, lowers = [], []
        entries = getattr(getattr(self.retriever, "knowledge_base", None), "get", None)
        for s in kb.snippets if kb is not None else []:
            value_hit = [k for k, v in descs.items() if str(v).split(",")[0].strip().lower() in s.title.lower()]
            if not value_hit:
                continue
            suspicion = None
            if entries is not None:
                try:
                    suspicion = getattr(entries(s.id), "suspicion", None)
                except Exception:
                    suspicion = None
            text = f"{value_hit[0].replace('_', ' ')} {descs[value_hit[0]]} ({s.title} [{kb.id}:{s.id}])"
            if suspicion == "raises":
                raises.append(text)
            elif suspicion == "lowers":
                lowers.append(text)
        who = {"radiologist": "radiologist", "captioner": "captioner", "none": "no"}[parts["source"]]
        lines = [f"Descriptors ({who} source): {_phrase(descs) or 'none available'}."]
        lines.append("Raise the suspicion: " + ("; ".join(raises) if raises else "none among the cited passages") + ".")
        lines.append("Lower the suspicion: " + ("; ".join(lowers) if lowers else "none among the cited passages") + ".")
        lines.append(f"Final label: {ctx.im.label}" + ctx.reader_category() + ".")
        dx = self.target(ctx, rationale="\n".join(lines), evidence=self._evidence_refs(parts, []))
        msgs.append(self._final(dx))
        return msgs, {"descriptor_source": parts["source"], "n_raises": len(raises), "n_lowers": len(lowers)}

    def _task_grounded_diagnosis(self, ctx: _Ctx) -> tuple[list[BaseMessage] | None, dict[str, Any]]:
        report = self._detect(ctx, "det1", threshold=self.config.score_threshold, tta=False)
        if report is None:
            return None, {}
        msgs, parts = self._trajectory(ctx, report=report)
        det_ids = self._matches(ctx, report.detections)
        unmatched = [d.id for d in report.detections if not any(d.id in ids for ids in det_ids)]
        loc = (f"Localize: {len(ctx.im.boxes)} lesion(s) at "
               + ", ".join(str(b.to_model(ctx.w, ctx.h)) for b in ctx.im.boxes)
               + (f", supported by candidate(s) {', '.join(i for ids in det_ids for i in ids)}" if any(det_ids) else ", not found by the detector")
               + (f"; candidate(s) {', '.join(unmatched)} are not lesions" if unmatched else "") + ".") if ctx.im.boxes else (
            "Localize: no lesion" + (f"; candidate(s) {', '.join(unmatched)} are not lesions" if unmatched else "") + ".")
        analyse = f"Analyse: {_phrase(parts['descs']) or 'no lesion descriptors'}" + (
            f" ({parts['source']})" if parts["source"] != "none" else "") + "."
        cites = "; ".join(f"{s.title} [{parts['kb'].id}:{s.id}]" for s in parts["kb"].snippets) if parts["kb"] else ""
        conclude = f"Conclude: {ctx.im.label}" + (f", consistent with {cites}" if cites else "") + "."
        dx = self.target(ctx, rationale="\n".join([loc, analyse, conclude]),
                         evidence=self._evidence_refs(parts, det_ids), detection_ids=det_ids)
        msgs.append(self._final(dx))
        return msgs, {"detector": report.detector, "n_candidates": len(report.detections)}
