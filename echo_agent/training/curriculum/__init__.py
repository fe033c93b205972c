"""The nine-task SFT curriculum: conversations in exactly the agent's inference message format.

Every sample is built with the same functions the graph uses at inference -- the system prompt
(:func:`echo_agent.prompts.system_prompt`), the user turn (:func:`echo_agent.messages.user_message`),
the tools' model-facing schemas (:func:`echo_agent.tools.make_tools`), tool results as model-facing
JSON (:func:`echo_agent.messages.evidence_to_model`), the final Diagnosis JSON
(:func:`echo_agent.messages.diagnosis_to_model`) and, for the informed-diagnosis task, the
final-reasoning prompt of :class:`echo_agent.reasoners.llm_finalizer.LLMFinalizer`. Boxes cross into
the conversations through :meth:`echo_agent.schemas.Box.to_model` only.

The nine tasks (``TASKS``), grouped as in the Echo-alpha recipe:

==========================  ==========================================================================
foundational grounding      ``rec`` (description -> box), ``reg`` (box -> description)
diagnostic reasoning        ``informed_diagnosis`` (evidence given -> Diagnosis),
                            ``attribute_reasoning`` (descriptors -> why), ``grounded_diagnosis``
                            (localize -> analyse -> conclude)
tool collaboration          ``misdiagnosis_correction`` (a wrong detector label, corrected with reasons),
                            ``box_refinement`` (noisy / duplicate candidates -> the right box)
interaction loop            ``tool_detection`` (call the detector, re-check weak results, interpret),
                            ``report_generation`` (all tools, a report in the organ's template)
==========================  ==========================================================================

Rationales are assembled from facts only: the ground-truth label and boxes, the radiologist's
descriptors where the dataset has them (BrEaST-Lesions_USG ``clinical_data.csv``), the pixel
captioner's descriptors otherwise, the retrieved knowledge passages (cited by id) and the clinical
context. Two tasks deliberately perturb the detector's output (a flipped label, jittered or duplicated
boxes) when the real detector made no such mistake on the image; such samples carry
``meta["perturbed"] = True``.

Images travel by path. In the LangChain messages an image block points at
``echo-image://<id>`` with ``<id> = pixel_hash(array)`` (what :class:`~echo_agent.imaging.store.ImageStore`
would give the same pixels); :func:`to_hf_record` replaces each image block by ``{"type": "image"}``
and lists the files in ``record["images"]`` in the same order (see ``docs/training.md``).
"""

from __future__ import annotations

from .builder import CurriculumBuilder, build_curriculum
from .common import tool_schemas
from .export import (
    check_no_leakage,
    config_dict,
    count_table,
    decode_batch,
    read_jsonl,
    resolve_images,
    strip_tool_images,
    to_hf_dataset,
    to_hf_messages,
    to_hf_record,
    write_jsonl,
)
from .facts import clinical_for, radiologist_descriptors
from .sources import DetectionSource, LiveDetector, PredictionsFile, SimulatedDetector
from .tasks import (
    FINALIZER_TASKS,
    LESION_TASKS,
    TASK_GROUPS,
    TASKS,
    CurriculumConfig,
    CurriculumSample,
    task_questions,
)

__all__ = [
    "FINALIZER_TASKS",
    "LESION_TASKS",
    "TASKS",
    "TASK_GROUPS",
    "CurriculumBuilder",
    "CurriculumConfig",
    "CurriculumSample",
    "DetectionSource",
    "LiveDetector",
    "PredictionsFile",
    "SimulatedDetector",
    "build_curriculum",
    "check_no_leakage",
    "clinical_for",
    "config_dict",
    "count_table",
    "decode_batch",
    "radiologist_descriptors",
    "read_jsonl",
    "resolve_images",
    "strip_tool_images",
    "to_hf_dataset",
    "to_hf_messages",
    "task_questions",
    "to_hf_record",
    "tool_schemas",
    "write_jsonl",
]

