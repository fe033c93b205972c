"""The interaction loop: ``tool_detection`` and ``report_generation``.

A mixin of :class:`~echo_agent.training.curriculum.CurriculumBuilder`: the methods use the
builder's shared steps (``self._detect``, ``self.target``, ...)."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import BaseMessage

from ...schemas import DetectorReport
from .common import _Ctx
from .facts import _phrase


class InteractionTasks:
    """The interaction loop tasks."""

    def _task_tool_detection(self, ctx: _Ctx) -> tuple[list[BaseMessage] | None, dict[str, Any]]:
        cfg = self.config
        report = self._detect(ctx, "det1", threshold=cfg.score_threshold, tta=False)
        if report is None:
            return None, {}
        top = report.top()
        extra: list[tuple[dict[str, Any], DetectorReport]] = []
        recheck = (top is None or top.score < cfg.recheck_below) and getattr(self.detections, "supports_tta", False)
        if recheck:
            low = round(max(cfg.score_threshold / 2, 0.05), 2)
            rep2 = self._detect(ctx, "det2", threshold=low, tta=True)
            if rep2 is not None:
                extra.append(({"score_threshold": low, "tta": True}, rep2))
        msgs, parts = self._trajectory(ctx, report=report, extra_reports=extra)
        last = parts["reports"][-1]
        det_ids = self._matches(ctx, last.detections)
        lines = [f"{r.id}: {len(r.detections)} candidate(s) at threshold {r.score_threshold:g}"
                 + (" with TTA" if r.tta else "")
                 + (f", strongest {r.top().id} {r.top().label} {r.top().score:.2f}" if r.top() else "") + "."
                 for r in parts["reports"]]
        if recheck and extra:
            lines.append("The first result was weak, so the detector was re-run with test-time augmentation and a lower threshold.")
        if ctx.im.boxes:
            hit = [i for ids in det_ids for i in ids]
            lines.append((f"Candidate(s) {', '.join(hit)} match the lesion" if hit else "No candidate matches the lesion seen in the image")
                         + f"; it reads as {_phrase(parts['descs']) or 'a lesion without decisive descriptors'}.")
        else:
            lines.append("No lesion is present" + (": the candidates are not lesions." if last.detections else "."))
        lines.append(f"Final label: {ctx.im.label}.")
        dx = self.target(ctx, rationale="\n".join(lines), evidence=self._evidence_refs(parts, det_ids), detection_ids=det_ids)
        msgs.append(self._final(dx))
        return msgs, {"recheck": bool(recheck and extra), "detector": report.detector}

    def _task_report_generation(self, ctx: _Ctx) -> tuple[list[BaseMessage] | None, dict[str, Any]]:
        report = self._detect(ctx, "det1", threshold=self.config.score_threshold, tta=False)
        if report is None:
            return None, {}
        msgs, parts = self._trajectory(ctx, report=report)
        det_ids = self._matches(ctx, report.detections)
        rationale = self._report_text(ctx, parts["descs"], parts["source"], parts["kb"])
        dx = self.target(ctx, rationale=rationale, evidence=self._evidence_refs(parts, det_ids), detection_ids=det_ids)
        msgs.append(self._final(dx))
        return msgs, {"detector": report.detector, "sections": list(ctx.spec.report_sections)}
