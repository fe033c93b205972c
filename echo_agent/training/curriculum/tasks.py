"""The nine tasks, their groups and the curriculum's config and sample types."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from langchain_core.messages import BaseMessage

#: The nine curriculum tasks, in curriculum order.
TASKS: tuple[str, ...] = (
    "rec",
    "reg",
    "informed_diagnosis",
    "attribute_reasoning",
    "grounded_diagnosis",
    "misdiagnosis_correction",
    "box_refinement",
    "tool_detection",
    "report_generation",
)

#: Task -> group of the recipe.
TASK_GROUPS: dict[str, str] = {
    "rec": "foundational grounding",
    "reg": "foundational grounding",
    "informed_diagnosis": "diagnostic reasoning",
    "attribute_reasoning": "diagnostic reasoning",
    "grounded_diagnosis": "diagnostic reasoning",
    "misdiagnosis_correction": "tool collaboration",
    "box_refinement": "tool collaboration",
    "tool_detection": "interaction loop",
    "report_generation": "interaction loop",
}

#: Tasks in the final-reasoning (LLMFinalizer) format instead of the agent's tool-calling format
#: (``agent_final`` is the final turn of an agent trace, see :mod:`.traces`).
FINALIZER_TASKS = frozenset({"informed_diagnosis", "agent_final"})

#: Tasks whose samples need an image with at least one ground-truth lesion box.
LESION_TASKS = frozenset({"rec", "reg", "attribute_reasoning", "box_refinement"})


@functools.cache
def task_questions() -> dict[str, str]:
    """Task-specific questions appended to the user turn (``echo_agent/training/prompts.yaml``)."""
    text = (resources.files("echo_agent") / "training" / "prompts.yaml").read_text("utf-8")
    return yaml.safe_load(text)


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------
@dataclass
class CurriculumConfig:
    """How the curriculum is built. Every field has a default; YAML configs set a subset."""

    tasks: tuple[str, ...] = field(default=TASKS, metadata={"help": "Which of the nine tasks to build."})
    split: str | None = field(
        default="train", metadata={"help": "Manifest split to use (None = every image whose split is not forbidden)."}
    )
    forbidden_splits: tuple[str, ...] = field(
        default=("test",), metadata={"help": "Splits that must never reach the output (checked, not just filtered)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of every random choice (perturbations, sampling)."})
    max_images: int | None = field(default=None, metadata={"help": "Use at most this many images (seeded sample)."})
    max_tool_calls: int = field(default=8, metadata={"help": "Tool budget written into the system prompt."})
    score_threshold: float = field(default=0.25, metadata={"help": "Detector score threshold of the first call."})
    recheck_below: float = field(
        default=0.5, metadata={"help": "tool_detection re-checks with TTA when the top candidate scores below this."}
    )
    target_confidence: float = field(
        default=0.9, metadata={"help": "Probability the target Diagnosis gives the true label (not calibrated)."}
    )
    knowledge_k: int = field(default=3, metadata={"help": "Passages asked from retrieve_knowledge."})
    match_iou: float = field(default=0.5, metadata={"help": "IoU at which a candidate counts as the true lesion."})
    overlays: bool = field(
        default=True,
        metadata={"help": "Show the detector's overlay image in its tool turn, as QwenVLChatModel does by default."},
    )
    use_radiologist_descriptors: bool = field(
        default=True, metadata={"help": "Prefer the dataset's radiologist descriptors (BrEaST) over the captioner's."}
    )

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown curriculum task(s) {unknown}; choose from {list(TASKS)}")
        if self.split is not None and self.split in self.forbidden_splits:
            raise ValueError(f"split {self.split!r} is forbidden for training; use train or val")
        if not 0.5 < self.target_confidence < 1.0:
            raise ValueError(f"target_confidence must be in (0.5, 1), got {self.target_confidence}")
        self.tasks = tuple(self.tasks)
        self.forbidden_splits = tuple(self.forbidden_splits)


@dataclass
class CurriculumSample:
    """One conversation of the curriculum (LangChain messages, images by id + path)."""

    task: str
    key: str
    organ: str
    split: str | None
    messages: list[BaseMessage]
    image_paths: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)
    truth: dict[str, Any] = field(default_factory=dict)
