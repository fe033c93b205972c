"""GRPO's dataset rows: a curriculum record's prompt, images and the ground-truth columns the reward
functions read (shared by ``grpo_trainer`` and ``answer_rewards``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .curriculum import FINALIZER_TASKS, resolve_images
from .sft_trainer import open_rgb

#: The environment of final-answer prompts in a run that also trains tool prompts: no tools.
ANSWER_ENVIRONMENT = "final_answer"


def grpo_rows(records: list[dict[str, Any]], base: Path) -> list[dict[str, Any]]:
    """GRPO dataset rows from curriculum records: the system + user turns as the prompt, the image,
    the environment (the organ's tools; :data:`ANSWER_ENVIRONMENT` for a final-answer prompt) and
    the ground truth for the rewards."""
    rows = []
    for r in records:
        truth = json.loads(r["truth"]) if isinstance(r.get("truth"), str) else r.get("truth") or {}
        prompt = r["messages"][:2]
        n_images = sum(1 for m in prompt for b in m["content"] if b.get("type") == "image")
        images = resolve_images(r, base)[:n_images]
        rows.append({
            "prompt_json": json.dumps(prompt, ensure_ascii=False), "image_paths": images,
            "image_path": images[0] if images else "", "organ": r["organ"],
            "environment": ANSWER_ENVIRONMENT if r["task"] in FINALIZER_TASKS else r["organ"],
            "task": r["task"], "key": r["key"], "gt_label": truth.get("label", ""),
            "gt_boxes": json.dumps(truth.get("boxes", [])), "truth": json.dumps(truth),
            "width": int(truth.get("width", 0)), "height": int(truth.get("height", 0)),
            # the prompt's detector candidates (agent_final): findings may cite them instead of a box
            "detections": json.dumps(truth.get("detections") or {}),
        })
    return rows


def _decode_grpo(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    out = dict(batch)
    if "prompt_json" in out:
        out["prompt"] = [json.loads(s) for s in out.pop("prompt_json")]
    if "image_paths" in out:
        out["images"] = [[open_rgb(p) for p in ps] for ps in out.pop("image_paths")]
    if "gt_boxes" in out:
        out["gt_boxes"] = [json.loads(s) if isinstance(s, str) else s for s in out["gt_boxes"]]
    return out


__all__ = ["ANSWER_ENVIRONMENT", "grpo_rows"]
