"""The curriculum builder: the shared steps of every task and the task dispatch."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from ...errors import EchoInputError
from ...eval.manifest import ManifestImage
from ...imaging.store import pixel_hash
from ...messages import diagnosis_to_model, dumps, evidence_to_model, image_id_from_block, user_message
from ...organs import get_organ
from ...prompts import system_prompt, tool_text
from ...schemas import (
    Box,
    Detection,
    DetectorReport,
    Diagnosis,
    EvidenceRef,
    Finding,
    ImageContext,
    KnowledgeResult,
    normalise_probabilities,
)
from .collaboration import CollaborationTasks
from .common import _call, _Ctx
from .facts import _descriptor_values, _phrase, clinical_for, radiologist_descriptors
from .grounding import GroundingTasks
from .interaction import InteractionTasks
from .reasoning import ReasoningTasks
from .sources import DetectionSource, _stable_seed
from .tasks import LESION_TASKS, TASK_GROUPS, CurriculumConfig, CurriculumSample


class CurriculumBuilder(GroundingTasks, ReasoningTasks, CollaborationTasks, InteractionTasks):
    """Builds the curriculum samples of manifest images.

    Args:
        config: what to build.
        detections: where detector candidates come from (:class:`PredictionsFile`,
            :class:`LiveDetector`, :class:`SimulatedDetector` or any :class:`DetectionSource`).
        captioner: the global-context captioner (default: the pixel captioner).
        retriever: the knowledge retriever (default: BM25 over the packaged knowledge base).
        overlay_dir: folder for the detector overlay images of tool turns (needed when
            ``config.overlays``; without it the tool turns carry no overlay).
    """

    def __init__(
        self,
        config: CurriculumConfig | None = None,
        *,
        detections: DetectionSource | None = None,
        captioner: Any = None,
        retriever: Any = None,
        overlay_dir: str | Path | None = None,
    ) -> None:
        self.config = config or CurriculumConfig()
        self.detections = detections
        self._captioner = captioner
        self._retriever = retriever
        self.overlay_dir = Path(overlay_dir) if overlay_dir is not None and self.config.overlays else None

    # -- resources -------------------------------------------------------------------------------------
    @property
    def captioner(self) -> Any:
        if self._captioner is None:
            from ...evidence.captioner import PixelCaptioner

            self._captioner = PixelCaptioner()
        return self._captioner

    @property
    def retriever(self) -> Any:
        if self._retriever is None:
            from ...evidence.knowledge import get_retriever

            self._retriever = get_retriever()
        return self._retriever

    # -- selection -------------------------------------------------------------------------------------
    def select(self, images: Sequence[ManifestImage]) -> list[ManifestImage]:
        """The images of the requested split, refusing any image of a forbidden split."""
        cfg = self.config
        chosen = []
        for im in images:
            if im.split in cfg.forbidden_splits:
                continue
            if cfg.split is not None and im.split != cfg.split:
                continue
            chosen.append(im)
        if cfg.max_images is not None and len(chosen) > cfg.max_images:
            rng = random.Random(cfg.seed)
            chosen = sorted(rng.sample(chosen, cfg.max_images), key=lambda im: im.key)
        return chosen

    # -- main ------------------------------------------------------------------------------------------
    def build(self, images: Sequence[ManifestImage]) -> list[CurriculumSample]:
        """All samples of the configured tasks for the selected images (deterministic for a seed)."""
        from ...imaging import load_image

        cfg = self.config
        samples: list[CurriculumSample] = []
        for im in self.select(images):
            spec = get_organ(im.organ)
            image = load_image(im.image).array
            ctx = _Ctx(
                im=im, spec=spec, image=image, image_id=pixel_hash(image), clinical=clinical_for(im),
                radiologist=radiologist_descriptors(im) if cfg.use_radiologist_descriptors else {},
                rng=random.Random(_stable_seed(cfg.seed, im.key)), overlay_dir=self.overlay_dir,
            )
            ctx.image_paths[ctx.image_id] = str(im.image)
            for b in im.boxes:
                if not (0 <= b.x1 < b.x2 <= ctx.w and 0 <= b.y1 < b.y2 <= ctx.h):
                    raise EchoInputError(
                        f"{im.key}: box {b.to_list()} lies outside the {ctx.w}x{ctx.h} image; fix the manifest"
                    )
            for task in cfg.tasks:
                if task in LESION_TASKS and not im.boxes:
                    continue
                msgs, meta = getattr(self, f"_task_{task}")(ctx)
                if msgs is None:
                    continue
                samples.append(CurriculumSample(
                    task=task, key=im.key, organ=spec.name, split=im.split, messages=msgs,
                    image_paths={k: v for k, v in ctx.image_paths.items() if _uses(msgs, k)},
                    meta={"group": TASK_GROUPS[task], **meta},
                    truth={"label": im.label, "boxes": [b.to_model(ctx.w, ctx.h) for b in im.boxes],
                           "boxes_px": [b.to_list() for b in im.boxes], "width": ctx.w, "height": ctx.h},
                ))
        for s in samples:
            if s.split in cfg.forbidden_splits:  # defence in depth: selection already filtered
                raise AssertionError(f"sample {s.key} comes from forbidden split {s.split!r}")
        return samples

    # -- shared steps ----------------------------------------------------------------------------------
    def _head(self, ctx: _Ctx, question: str | None = None) -> list[BaseMessage]:
        user = user_message(ctx.ref(), ctx.spec, ctx.clinical)  # type: ignore[arg-type]
        if question:
            user = HumanMessage(content=[*user.content, {"type": "text", "text": question}])  # type: ignore[misc]
        return [SystemMessage(system_prompt(ctx.spec, self.config.max_tool_calls)), user]

    def _detect(
        self, ctx: _Ctx, eid: str, *, threshold: float, tta: bool, override: list[Detection] | None = None
    ) -> DetectorReport | None:
        if override is not None:
            dets: list[Detection] | None = override
            name = f"{getattr(self.detections, 'name', 'detector')}+perturbed"
        else:
            if self.detections is None:
                return None
            dets = self.detections(ctx.im, ctx.image, score_threshold=threshold, tta=tta)
            name = self.detections.name
            if dets is None:
                return None
        dets = [d.model_copy(update={"id": f"{eid}:{i}"}) for i, d in enumerate(dets)]
        return DetectorReport(id=eid, organ=ctx.spec.name, detector=name, detections=dets,
                              score_threshold=threshold, tta=tta, image_width=ctx.w, image_height=ctx.h)

    def _tool_message(self, ctx: _Ctx, item: Any, call_id: str) -> ToolMessage:
        artifact: dict[str, Any] = {"evidence_id": item.id}
        if isinstance(item, DetectorReport) and ctx.overlay_dir is not None:
            from PIL import Image

            from ...imaging.overlay import render_overlay

            overlay = render_overlay(ctx.image, item.detections)
            oid = pixel_hash(overlay)
            path = ctx.overlay_dir / f"{oid}.png"
            if not path.exists():
                ctx.overlay_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(overlay).save(path)
            ctx.image_paths[oid] = str(path)
            artifact["overlay"] = {"id": oid, "width": int(overlay.shape[1]), "height": int(overlay.shape[0])}
        return ToolMessage(content=dumps(evidence_to_model(item)), tool_call_id=call_id, artifact=artifact)

    def _describe(self, ctx: _Ctx, eid: str, regions: Sequence[Box], ids: Sequence[str | None] | None) -> tuple[dict[str, Any], ImageContext]:
        model_boxes = [b.to_model(ctx.w, ctx.h) for b in regions]
        args: dict[str, Any] = {"regions": model_boxes}
        if ids is not None and any(i is not None for i in ids) and all(i is not None for i in ids):
            args["detection_ids"] = list(ids)
        else:
            ids = None
        # The tool converts the model's boxes back to pixels: describe exactly those pixels.
        boxes = [Box.from_model(b, ctx.w, ctx.h) for b in model_boxes]
        res = self.captioner.describe(ctx.image, organ=ctx.spec.name, regions=boxes, detection_ids=ids,
                                      evidence_id=eid)
        return args, res

    def _retrieve(self, ctx: _Ctx, eid: str, query: str) -> tuple[dict[str, Any], KnowledgeResult]:
        args = {"query": query, "k": self.config.knowledge_k}
        return args, self.retriever.retrieve(query, organ=ctx.spec.name, k=self.config.knowledge_k, evidence_id=eid)

    def _lesion_descriptors(self, ctx: _Ctx, desc: ImageContext | None, index: int) -> tuple[dict[str, Any], str]:
        """Descriptors of one true lesion: the radiologist's where available, else the captioner's."""
        if ctx.radiologist and index == 0:
            return dict(ctx.radiologist), "radiologist"
        if desc is not None and index < len(desc.regions):
            return _descriptor_values(desc.regions[index].descriptors, ctx.spec.descriptor_vocabulary), "captioner"
        return {}, "none"

    def _query(self, ctx: _Ctx, descs: Mapping[str, Any]) -> str:
        words = [str(v) for k, v in descs.items() if k in ctx.spec.descriptor_vocabulary or k in ("margin",)]
        label = ctx.im.label if ctx.im.label != ctx.spec.normal_label else "normal"
        q = " ".join(dict.fromkeys(" ".join(words).replace(",", " ").split()))
        return (q + f" {label} {ctx.spec.name}").strip()[:300] or f"{ctx.spec.name} {label}"

    # -- the target Diagnosis --------------------------------------------------------------------------
    def target(
        self,
        ctx: _Ctx,
        *,
        rationale: str,
        evidence: Sequence[EvidenceRef] = (),
        detection_ids: Sequence[Sequence[str]] | None = None,
    ) -> Diagnosis:
        """The ground-truth Diagnosis a sample teaches (label, boxes, category; rationale as given).

        The true label gets ``target_confidence``; for a non-positive label of an organ with
        categories the positive label keeps 1 % (BI-RADS 3, probably benign) -- a training target,
        not a calibrated probability. The category is the radiologist's (BrEaST) when given, else the
        organ's band of that probability.
        """
        spec, im = ctx.spec, ctx.im
        c = self.config.target_confidence
        labels = list(spec.image_labels)
        raw = dict.fromkeys(labels, 0.0)
        raw[im.label] = c
        pos = spec.positive_label
        rest = [lbl for lbl in labels if lbl != im.label]
        if pos and im.label != pos and pos in raw and spec.categories and im.boxes:
            raw[pos] = 0.01
            rest = [lbl for lbl in rest if lbl != pos]
        left = 1.0 - sum(raw.values())
        for lbl in rest:
            raw[lbl] = left / len(rest)
        probs = normalise_probabilities(raw)
        probs = {k: round(v, 4) for k, v in probs.items()}
        probs[im.label] = round(1.0 - sum(v for k, v in probs.items() if k != im.label), 4)
        lesion = bool(im.boxes)
        # The category follows the stated probability (as LLMFinalizer's validator demands); the
        # radiologist's own BI-RADS, made before pathology, is quoted in the rationale instead.
        category = spec.category_for(probs.get(pos) if pos else None, lesion_found=lesion)
        band = spec.band(category) if category else None
        if category == spec.no_lesion_category and spec.categories:
            recommendation = "Routine screening; no lesion to follow."
        elif band is not None and band.management:
            recommendation = band.management
        else:
            recommendation = "Correlate clinically; follow up as the referring clinician decides."
        findings = [
            Finding(box=b, label=im.label, score=round(c, 3), category=category if spec.categories else None,
                    detection_ids=list(detection_ids[i]) if detection_ids and i < len(detection_ids) else [])
            for i, b in enumerate(im.boxes)
        ]
        refs = list(evidence)
        if ctx.clinical is not None and not ctx.clinical.is_empty():
            refs.append(EvidenceRef(kind="clinical", ref="clinical", summary="see <clinical_context>"))
        return Diagnosis(
            organ=spec.name, label=im.label, probabilities=probs, category=category,
            category_system=spec.category_system if category else None, findings=findings, evidence=refs,
            rationale=rationale, recommendation=recommendation, image_width=ctx.w, image_height=ctx.h,
        )

    def _final(self, dx: Diagnosis) -> AIMessage:
        # The same message the graph's reason node appends.
        return AIMessage(content=dumps(diagnosis_to_model(dx)), name="diagnosis")

    def _report_text(self, ctx: _Ctx, descs: Mapping[str, Any], source: str, kb: KnowledgeResult | None,
                     sections: Sequence[str] | None = None) -> str:
        """A rationale in the organ's report sections, every sentence from a fact."""
        spec, im = ctx.spec, ctx.im
        sections = list(sections or spec.report_sections or ["Findings", "Assessment"])
        who = {"radiologist": "The radiologist describes", "captioner": "The captioner measures",
               "none": "No descriptor is available for"}[source]
        size = descs.get("size_mm") or descs.get("size_px")
        unit = "mm" if "size_mm" in descs else "px"
        morph = {k: descs[k] for k in ("shape", "orientation", "margin", "collecting_system_fluid", "fluid_extent") if k in descs}
        echo = {k: descs[k] for k in ("echo_pattern", "posterior_features", "halo", "calcifications",
                                       "echogenicity_vs_cortex", "acoustic_shadowing") if k in descs}
        cites = ""
        if kb is not None and kb.snippets:
            cites = "; ".join(f"{s.title} [{kb.id}:{s.id}]" for s in kb.snippets)
        lesion = "the lesion" if im.boxes else "the image"
        lines = []
        texts = [
            (f"{who} {lesion}: {_phrase(morph)}" + (f"; long axis {size} {unit}" if size else "") + ".")
            if morph or size else f"No focal lesion is outlined in {lesion}." if not im.boxes else f"{who} {lesion} without shape descriptors.",
            (f"{who} {_phrase(echo)}." if echo else "No echo-pattern descriptor is available."),
            (f"Clinical context: {ctx.clinical.as_text()}. " if ctx.clinical else "No clinical context was given. ")
            + (f"Knowledge: {cites}. " if cites else "")
            + f"Final label: {im.label}"
            + ctx.reader_category() + ".",
        ]
        for i, name in enumerate(sections):
            lines.append(f"{name}: {texts[min(i, len(texts) - 1)] if i < len(texts) else ''}".rstrip())
        return "\n".join(lines)

    def _kb_refs(self, kb: KnowledgeResult | None) -> list[EvidenceRef]:
        if kb is None:
            return []
        return [EvidenceRef(kind="knowledge", ref=f"{kb.id}:{s.id}", summary=s.title) for s in kb.snippets]

    def _matches(self, ctx: _Ctx, dets: Sequence[Detection]) -> list[list[str]]:
        """For each true box, the ids of candidates overlapping it at ``match_iou``."""
        return [[d.id for d in dets if d.box.iou(b) >= self.config.match_iou] for b in ctx.im.boxes]

    # -- trajectory helper -----------------------------------------------------------------------------
    def _trajectory(
        self,
        ctx: _Ctx,
        *,
        report: DetectorReport | None,
        extra_reports: Sequence[tuple[dict[str, Any], DetectorReport]] = (),
        describe_regions: str = "candidates+truth",
        retrieve: bool = True,
        question: str | None = None,
        first_args: dict[str, Any] | None = None,
    ) -> tuple[list[BaseMessage], dict[str, Any]]:
        """system, user, [detect], [re-detect], describe, [retrieve] -> parts for the final turn."""
        msgs = self._head(ctx, question)
        det_name = tool_text("detect_lesions", ctx.spec)[0]
        desc_name = tool_text("describe_image")[0]
        kb_name = tool_text("retrieve_knowledge")[0]
        turn = 0
        reports = []
        if report is not None:
            args = first_args if first_args is not None else {}
            msgs.append(AIMessage(content="", tool_calls=[_call(det_name, args, turn)]))
            msgs.append(self._tool_message(ctx, report, f"call_{turn}_0"))
            reports.append(report)
            turn += 1
        for args, rep in extra_reports:
            msgs.append(AIMessage(content="", tool_calls=[_call(det_name, args, turn)]))
            msgs.append(self._tool_message(ctx, rep, f"call_{turn}_0"))
            reports.append(rep)
            turn += 1
        last = reports[-1] if reports else None
        regions: list[Box] = []
        ids: list[str | None] = []
        if last is not None and "candidates" in describe_regions:
            for d in last.detections[:8]:
                regions.append(d.box)
                ids.append(d.id)
        truth_index: list[int] = []
        if "truth" in describe_regions:
            matched = self._matches(ctx, last.detections) if last is not None else [[] for _ in ctx.im.boxes]
            for i, b in enumerate(ctx.im.boxes):
                if matched[i] and "candidates" in describe_regions:
                    truth_index.append(ids.index(matched[i][0]))
                elif len(regions) < 8:
                    truth_index.append(len(regions))
                    regions.append(b)
                    ids.append(None)
        desc_args, desc = self._describe(ctx, f"desc{1}", regions, ids)
        msgs.append(AIMessage(content="", tool_calls=[_call(desc_name, desc_args, turn)]))
        msgs.append(self._tool_message(ctx, desc, f"call_{turn}_0"))
        turn += 1
        lesion_descs, source = ({}, "none")
        if ctx.im.boxes:
            if ctx.radiologist:
                lesion_descs, source = dict(ctx.radiologist), "radiologist"
            elif truth_index and truth_index[0] < len(desc.regions):
                lesion_descs = _descriptor_values(desc.regions[truth_index[0]].descriptors, ctx.spec.descriptor_vocabulary)
                source = "captioner"
        kb = None
        if retrieve:
            kb_args, kb = self._retrieve(ctx, "kb1", self._query(ctx, lesion_descs))
            msgs.append(AIMessage(content="", tool_calls=[_call(kb_name, kb_args, turn)]))
            msgs.append(self._tool_message(ctx, kb, f"call_{turn}_0"))
        return msgs, {"reports": reports, "desc": desc, "kb": kb, "descs": lesion_descs, "source": source,
                      "truth_index": truth_index}

    def _evidence_refs(self, parts: Mapping[str, Any], det_ids: Sequence[Sequence[str]]) -> list[EvidenceRef]:
        refs: list[EvidenceRef] = []
        for ids in det_ids:
            refs.extend(EvidenceRef(kind="detection", ref=i) for i in ids)
        if parts.get("desc") is not None:
            refs.append(EvidenceRef(kind="description", ref=parts["desc"].id))
        refs.extend(self._kb_refs(parts.get("kb")))
        return refs

    # -- the nine tasks --------------------------------------------------------------------------------
    def _largest(self, ctx: _Ctx) -> tuple[int, Box]:
        i = max(range(len(ctx.im.boxes)), key=lambda j: ctx.im.boxes[j].area)
        return i, ctx.im.boxes[i]


def _uses(messages: Sequence[BaseMessage], image_id: str) -> bool:
    for m in messages:
        if isinstance(m.content, list):
            for b in m.content:
                if isinstance(b, dict) and image_id_from_block(b) == image_id:
                    return True
        art = getattr(m, "artifact", None)
        if isinstance(art, dict) and isinstance(art.get("overlay"), dict) and art["overlay"].get("id") == image_id:
            return True
    return False


def build_curriculum(
    images: Sequence[ManifestImage],
    config: CurriculumConfig | None = None,
    **kwargs: Any,
) -> list[CurriculumSample]:
    """Build the curriculum of ``images`` (see :class:`CurriculumBuilder` for ``kwargs``)."""
    return CurriculumBuilder(config, **kwargs).build(images)
