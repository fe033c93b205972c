"""Foundational grounding: ``rec`` (description -> box) and ``reg`` (box -> description).

A mixin of :class:`~echo_agent.training.curriculum.CurriculumBuilder`: the methods use the
builder's shared steps (``self._detect``, ``self.target``, ...)."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, BaseMessage

from ...messages import dumps
from ...schemas import Box
from .common import _Ctx
from .facts import _descriptor_values, _phrase
from .tasks import task_questions


class GroundingTasks:
    """Foundational grounding tasks."""

    def _task_rec(self, ctx: _Ctx) -> tuple[list[BaseMessage] | None, dict[str, Any]]:
        i, box = self._largest(ctx)
        descs, source = self._lesion_descriptors(ctx, None, i) if ctx.radiologist else ({}, "none")
        if not descs:
            res = self.captioner.describe(ctx.image, organ=ctx.spec.name, regions=[box])
            descs, source = _descriptor_values(res.regions[0].descriptors, ctx.spec.descriptor_vocabulary), "captioner"
        phrase = _phrase(descs) or "the lesion"
        if len(ctx.im.boxes) > 1:
            phrase = f"the largest lesion ({phrase})"
        q = task_questions()["rec"].format(description=phrase)
        msgs = self._head(ctx, " ".join(q.split()))
        msgs.append(AIMessage(content=dumps({"box": box.to_model(ctx.w, ctx.h)})))
        return msgs, {"descriptor_source": source}

    def _task_reg(self, ctx: _Ctx) -> tuple[list[BaseMessage] | None, dict[str, Any]]:
        i, box = self._largest(ctx)
        mb = box.to_model(ctx.w, ctx.h)
        descs, source = (dict(ctx.radiologist), "radiologist") if ctx.radiologist and i == 0 else ({}, "none")
        res = self.captioner.describe(ctx.image, organ=ctx.spec.name, regions=[Box.from_model(mb, ctx.w, ctx.h)])
        measured = _descriptor_values(res.regions[0].descriptors, ctx.spec.descriptor_vocabulary)
        if not descs:
            descs, source = measured, "captioner"
        else:
            descs.update({k: v for k, v in measured.items() if k.startswith("size")})
        q = task_questions()["reg"].format(box=mb)
        msgs = self._head(ctx, " ".join(q.split()))
        caption = f"{_phrase(descs).capitalize()}." if descs else res.regions[0].caption
        msgs.append(AIMessage(content=dumps({"box": mb, "descriptors": descs, "caption": caption})))
        return msgs, {"descriptor_source": source}
