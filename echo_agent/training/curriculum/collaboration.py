"""Tool collaboration: ``misdiagnosis_correction`` and ``box_refinement``.

A mixin of :class:`~echo_agent.training.curriculum.CurriculumBuilder`: the methods use the
builder's shared steps (``self._detect``, ``self.target``, ...)."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import BaseMessage

from ...schemas import Detection
from .common import _Ctx
from .facts import _phrase
from .sources import _detector_label_for, jitter_box, random_box


class CollaborationTasks:
    """Tool collaboration tasks."""

    def _task_misdiagnosis_correction(self, ctx: _Ctx) -> tuple[list[BaseMessage] | None, dict[str, Any]]:
        spec, im = ctx.spec, ctx.im
        report = self._detect(ctx, "det1", threshold=self.config.score_threshold, tta=False)
        dets = list(report.detections) if report is not None else []
        perturbed = False
        wrong: Detection | None = None
        if im.boxes:
            for d in dets:
                if d.box.iou(im.boxes[0]) >= self.config.match_iou and spec.image_label_for(d.label) != im.label:
                    wrong = d
                    break
            if wrong is None:
                others = [lbl for lbl in spec.detector_labels if spec.image_label_for(lbl) != im.label]
                if not others:
                    return None, {}  # one detector label (kidney): a label cannot be wrong, only a box
                perturbed = True
                base = next((d for d in dets if d.box.iou(im.boxes[0]) >= self.config.match_iou), None)
                box = base.box if base is not None else jitter_box(im.boxes[0], ctx.rng, 0.1, ctx.w, ctx.h)
                wrong = Detection(box=box, label=ctx.rng.choice(others), score=round(ctx.rng.uniform(0.4, 0.8), 3))
                dets = [d for d in dets if d is not base] + [wrong]
        else:
            wrong = next(iter(dets), None)
            if wrong is None:
                perturbed = True
                wrong = Detection(box=random_box(ctx.rng, ctx.w, ctx.h), label=ctx.rng.choice(spec.detector_labels),
                                  score=round(ctx.rng.uniform(0.3, 0.6), 3))
                dets = [wrong]
        dets = sorted(dets, key=lambda d: -d.score)
        report = self._detect(ctx, "det1", threshold=self.config.score_threshold, tta=False, override=dets) if perturbed \
            else report
        assert report is not None
        wrong_id = next(d.id for d in report.detections if d.box == wrong.box and d.label == wrong.label)
        msgs, parts = self._trajectory(ctx, report=report)
        det_ids = self._matches(ctx, report.detections)
        said = f"The detector labels {wrong_id} as {wrong.label} (score {wrong.score:.2f})"
        if im.boxes:
            why = f"but the lesion shows {_phrase(parts['descs']) or 'no decisive descriptor'}"
        else:
            why = "but no lesion is present in the image: the candidate is not a lesion"
        cites = "; ".join(f"{s.title} [{parts['kb'].id}:{s.id}]" for s in parts["kb"].snippets) if parts["kb"] else ""
        rationale = f"{said}, {why}.\n" + (f"Knowledge: {cites}.\n" if cites else "") + f"Corrected label: {im.label}" + ctx.reader_category() + "."
        dx = self.target(ctx, rationale=rationale, evidence=self._evidence_refs(parts, det_ids), detection_ids=det_ids)
        msgs.append(self._final(dx))
        return msgs, {"perturbed": perturbed, "wrong_label": wrong.label}

    def _task_box_refinement(self, ctx: _Ctx) -> tuple[list[BaseMessage] | None, dict[str, Any]]:
        im = ctx.im
        report = self._detect(ctx, "det1", threshold=self.config.score_threshold, tta=False)
        dets = list(report.detections) if report is not None else []
        matched = [d for d in dets if d.box.iou(im.boxes[0]) >= 0.3]
        perturbed = False
        if len(matched) < 2 or all(d.box.iou(im.boxes[0]) > 0.9 for d in matched):
            perturbed = True
            label = _detector_label_for(ctx.spec, im.label)
            noisy = [Detection(box=jitter_box(b, ctx.rng, 0.3, ctx.w, ctx.h), label=label,
                               score=round(ctx.rng.uniform(0.3, 0.9), 3)) for b in im.boxes for _ in range(2)]
            dets = dets + noisy
        dets = sorted(dets, key=lambda d: -d.score)[:8]
        report = self._detect(ctx, "det1", threshold=self.config.score_threshold, tta=False, override=dets) \
            if perturbed else report
        assert report is not None
        msgs, parts = self._trajectory(ctx, report=report, retrieve=False)
        det_ids = [[d.id for d in report.detections if d.box.iou(b) >= 0.3] for b in im.boxes]
        lines = []
        for b, ids in zip(im.boxes, det_ids, strict=True):
            ious = ", ".join(f"{i} IoU {next(d for d in report.detections if d.id == i).box.iou(b):.2f}" for i in ids)
            lines.append(f"Candidates {', '.join(ids) or 'none'} cover one lesion ({ious or 'no overlap'}); "
                         f"the refined box is {b.to_model(ctx.w, ctx.h)}.")
        rest = [d.id for d in report.detections if not any(d.id in ids for ids in det_ids)]
        if rest:
            lines.append(f"Candidate(s) {', '.join(rest)} do not overlap a lesion and are dropped.")
        lines.append(f"Final label: {im.label}.")
        dx = self.target(ctx, rationale="\n".join(lines), evidence=self._evidence_refs(parts, det_ids), detection_ids=det_ids)
        msgs.append(self._final(dx))
        return msgs, {"perturbed": perturbed, "n_candidates": len(report.detections)}
