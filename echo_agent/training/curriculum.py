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

import csv
import functools
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from ..errors import EchoInputError
from ..eval.manifest import ManifestImage
from ..imaging.store import pixel_hash
from ..messages import (
    IMAGE_URI_PREFIX,
    diagnosis_to_model,
    dumps,
    evidence_to_model,
    image_id_from_block,
    user_message,
)
from ..organs import OrganSpec, get_organ
from ..prompts import system_prompt, tool_text
from ..schemas import (
    Box,
    ClinicalContext,
    Descriptor,
    Detection,
    DetectorReport,
    Diagnosis,
    EvidenceRef,
    Finding,
    ImageContext,
    KnowledgeResult,
    normalise_probabilities,
)

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

#: Tasks in the final-reasoning (LLMFinalizer) format instead of the agent's tool-calling format.
FINALIZER_TASKS = frozenset({"informed_diagnosis"})

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


# ---------------------------------------------------------------------------------------------------
# detection sources
# ---------------------------------------------------------------------------------------------------
class DetectionSource(Protocol):
    """Where the detector's candidates of an image come from (pixel boxes of the original image).

    Returns ``None`` when it has nothing for that image (then detector-based tasks skip it).
    """

    name: str
    supports_tta: bool

    def __call__(
        self, im: ManifestImage, image: np.ndarray, *, score_threshold: float, tta: bool
    ) -> list[Detection] | None: ...


class PredictionsFile:
    """Detector candidates read from a JSONL file, e.g. the eval harness's ``predictions.jsonl``.

    Each line has ``key`` (manifest key) or ``image`` (path) and either ``detector.detections`` (the
    harness format) or ``detections``; every detection has a pixel ``box``, a ``score`` and
    ``detector_label`` or ``label``. The file holds one detector call per image, so TTA re-checks
    are not available (``supports_tta = False``).
    """

    supports_tta = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"predictions:{self.path.name}"
        self._by_key: dict[str, list[dict[str, Any]]] = {}
        self._by_image: dict[str, list[dict[str, Any]]] = {}
        with self.path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EchoInputError(f"{self.path}, line {n}: not JSON ({exc}); give a JSONL file") from None
                det = rec.get("detector")
                dets = det.get("detections") if isinstance(det, dict) else rec.get("detections")
                if dets is None:
                    continue  # the detector failed on this image in the harness run
                if rec.get("key"):
                    self._by_key[str(rec["key"])] = dets
                if rec.get("image"):
                    self._by_image[str(Path(rec["image"]).resolve())] = dets

    def __call__(
        self, im: ManifestImage, image: np.ndarray, *, score_threshold: float, tta: bool
    ) -> list[Detection] | None:
        dets = self._by_key.get(im.key)
        if dets is None:
            dets = self._by_image.get(str(im.image.resolve()))
        if dets is None:
            return None
        h, w = image.shape[:2]
        out = []
        for d in dets:
            if float(d["score"]) < score_threshold:
                continue
            try:
                box = Box.from_xyxy(d["box"]).clip(w, h)
            except ValueError:
                continue
            out.append(Detection(box=box, label=str(d.get("detector_label") or d["label"]), score=float(d["score"])))
        return sorted(out, key=lambda d: -d.score)


class LiveDetector:
    """Runs a real detector through the agent's single detection path (:func:`run_detector`).

    ``detectors`` maps organ -> detector; organs without one use the packaged weights
    (:func:`echo_agent.detectors.get_detector`).
    """

    supports_tta = True

    def __init__(self, detectors: Mapping[str, Any] | None = None, *, preprocess: bool = True) -> None:
        self.detectors = dict(detectors or {})
        self.preprocess = preprocess
        self.name = "detector"

    def __call__(
        self, im: ManifestImage, image: np.ndarray, *, score_threshold: float, tta: bool
    ) -> list[Detection] | None:
        from ..tools.toolkit import run_detector

        det = self.detectors.get(im.organ)
        if det is None:
            from ..detectors import get_detector

            det = self.detectors[im.organ] = get_detector(im.organ)
        self.name = str(getattr(det, "name", type(det).__name__))
        return run_detector(im.organ, image, detector=det, score_threshold=score_threshold, tta=tta,
                            preprocess=self.preprocess)


class SimulatedDetector:
    """A documented stand-in for a detector: ground-truth boxes with seeded noise.

    For each true lesion: misses it with ``p_miss``; otherwise returns a box whose corners move by up
    to ``jitter`` of the box size, the organ's detector label of the true class (flipped to another
    detector label with ``p_flip``) and a score in ``score_range``. Adds a false positive with
    ``p_false_positive``. With ``tta=True`` jitter and miss rate halve. Use it only where no detector
    or predictions exist (tests, the micro-scale demonstration); samples record its name.
    """

    supports_tta = True
    name = "simulated-detector"

    def __init__(
        self,
        seed: int = 0,
        *,
        p_miss: float = 0.1,
        p_flip: float = 0.15,
        p_false_positive: float = 0.15,
        jitter: float = 0.15,
        score_range: tuple[float, float] = (0.3, 0.95),
    ) -> None:
        self.seed = seed
        self.p_miss, self.p_flip, self.p_fp, self.jitter = p_miss, p_flip, p_false_positive, jitter
        self.score_range = score_range

    def __call__(
        self, im: ManifestImage, image: np.ndarray, *, score_threshold: float, tta: bool
    ) -> list[Detection] | None:
        spec = get_organ(im.organ)
        h, w = image.shape[:2]
        rng = random.Random(_stable_seed(self.seed, im.key, "tta" if tta else "plain"))
        jitter = self.jitter / (2 if tta else 1)
        p_miss = self.p_miss / (2 if tta else 1)
        true_det = _detector_label_for(spec, im.label)
        out: list[Detection] = []
        for b in im.boxes:
            if rng.random() < p_miss:
                continue
            label = true_det
            others = [lbl for lbl in spec.detector_labels if lbl != label]
            if others and rng.random() < self.p_flip:
                label = rng.choice(others)
            out.append(Detection(box=jitter_box(b, rng, jitter, w, h), label=label,
                                 score=round(rng.uniform(*self.score_range), 3)))
        if rng.random() < self.p_fp:
            out.append(Detection(box=random_box(rng, w, h), label=rng.choice(spec.detector_labels),
                                 score=round(rng.uniform(self.score_range[0], 0.5), 3)))
        return sorted((d for d in out if d.score >= score_threshold), key=lambda d: -d.score)


def _stable_seed(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def _detector_label_for(spec: OrganSpec, image_label: str) -> str:
    for lbl in spec.detector_labels:
        if spec.image_label_for(lbl) == image_label:
            return lbl
    return spec.detector_labels[0]


def jitter_box(box: Box, rng: random.Random, amount: float, width: int, height: int) -> Box:
    """``box`` with each corner moved by up to ``amount`` of the box size, clipped to the image."""
    dx, dy = box.width * amount, box.height * amount
    for _ in range(10):
        x1 = box.x1 + rng.uniform(-dx, dx)
        y1 = box.y1 + rng.uniform(-dy, dy)
        x2 = box.x2 + rng.uniform(-dx, dx)
        y2 = box.y2 + rng.uniform(-dy, dy)
        if x2 - x1 > 2 and y2 - y1 > 2:
            try:
                return Box(x1=x1, y1=y1, x2=x2, y2=y2).clip(width, height)
            except ValueError:
                continue
    return box


def random_box(rng: random.Random, width: int, height: int) -> Box:
    """A random box covering 5-25 % of each image side."""
    bw, bh = rng.uniform(0.05, 0.25) * width, rng.uniform(0.05, 0.25) * height
    x1, y1 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
    return Box(x1=x1, y1=y1, x2=x1 + bw, y2=y1 + bh)


# ---------------------------------------------------------------------------------------------------
# facts: clinical context, radiologist descriptors
# ---------------------------------------------------------------------------------------------------
def clinical_for(im: ManifestImage) -> ClinicalContext | None:
    """The clinical context the agent gets for a manifest image (age, symptoms), as the eval harness does."""
    data = {k: v for k, v in (("age", im.age), ("symptoms", im.symptoms)) if v is not None}
    return ClinicalContext.model_validate(data) if data else None


_BREAST_COLUMNS = {"Shape": "shape", "Margin": "margin", "Echogenicity": "echo_pattern",
                   "Posterior_features": "posterior_features", "Halo": "halo", "Calcifications": "calcifications"}


@functools.cache
def _clinical_table(path: str) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return {r["Image_filename"].strip(): r for r in csv.DictReader(fh)}


def radiologist_descriptors(im: ManifestImage) -> dict[str, str]:
    """The radiologist's BI-RADS lexicon descriptors of a BrEaST-Lesions_USG image, by file name.

    Read from ``clinical_data.csv`` next to the image's folder (the manifest has no descriptor
    columns). Returns ``{}`` for images of other datasets or without descriptors. Values are mapped
    to the organ's vocabulary: ``margin`` becomes ``circumscribed`` or the listed non-circumscribed
    kinds (``"indistinct, angular"``), posterior ``no`` becomes ``none``.
    """
    for folder in (im.image.parent, im.image.parent.parent):
        table = folder / "clinical_data.csv"
        if table.is_file():
            break
    else:
        return {}
    row = _clinical_table(str(table)).get(im.image.name)
    if row is None:
        return {}
    out: dict[str, str] = {}
    for col, key in _BREAST_COLUMNS.items():
        v = (row.get(col) or "").strip()
        if not v or v == "not applicable":
            continue
        if key == "margin" and v.startswith("not circumscribed"):
            kinds = v.split("-", 1)[1].strip().split("&") if "-" in v else []
            v = ", ".join(k.strip() for k in kinds) or "not circumscribed"
        if key == "posterior_features" and v == "no":
            v = "none"
        out[key] = v
    return out


def _descriptor_values(ctx_region: Mapping[str, Descriptor], vocabulary: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in vocabulary:
        d = ctx_region.get(k)
        if d is not None and d.value is not None:
            out[k] = d.value
    for k in ("size_mm", "size_px"):
        d = ctx_region.get(k)
        if d is not None and d.value is not None:
            out[k] = d.value
    return out


def _phrase(descs: Mapping[str, Any]) -> str:
    order = ["shape", "orientation", "margin", "echo_pattern", "posterior_features", "halo", "calcifications",
             "collecting_system_fluid", "fluid_extent", "echogenicity_vs_cortex", "acoustic_shadowing"]
    parts = []
    for k in order:
        if k in descs:
            name = k.replace("_", " ")
            parts.append(f"{name} {descs[k]}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------
# building blocks shared with inference
# ---------------------------------------------------------------------------------------------------
def tool_schemas(spec: OrganSpec) -> list[dict[str, Any]]:
    """The OpenAI-style tool schemas the reasoner is bound with for ``spec`` at inference.

    Built from the real tools (:func:`echo_agent.tools.make_tools`) exactly as
    :meth:`QwenVLChatModel.bind_tools` converts them; nothing is loaded.
    """
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from ..tools import Toolkit, make_tools

    return [convert_to_openai_tool(t) for t in make_tools(Toolkit(), [spec])]


@functools.lru_cache(maxsize=32)
def _tool_schemas_json(organ: str) -> str:
    return json.dumps(tool_schemas(get_organ(organ)), ensure_ascii=False)


def _call(name: str, args: dict[str, Any], turn: int, i: int = 0) -> dict[str, Any]:
    return {"name": name, "args": args, "id": f"call_{turn}_{i}", "type": "tool_call"}


@dataclass
class _Ctx:
    """Everything known about one image while its samples are built."""

    im: ManifestImage
    spec: OrganSpec
    image: np.ndarray
    image_id: str
    clinical: ClinicalContext | None
    radiologist: dict[str, str]
    rng: random.Random
    overlay_dir: Path | None
    image_paths: dict[str, str] = field(default_factory=dict)

    @property
    def w(self) -> int:
        return int(self.image.shape[1])

    @property
    def h(self) -> int:
        return int(self.image.shape[0])

    def ref(self) -> dict[str, Any]:
        return {"id": self.image_id, "width": self.w, "height": self.h, "path": str(self.im.image)}


class CurriculumBuilder:
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
            from ..evidence.captioner import PixelCaptioner

            self._captioner = PixelCaptioner()
        return self._captioner

    @property
    def retriever(self) -> Any:
        if self._retriever is None:
            from ..evidence.knowledge import get_retriever

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
        from ..imaging import load_image

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

            from ..imaging.overlay import render_overlay

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
            + (f" (radiologist BI-RADS {im.birads.upper()})" if im.birads else "") + ".",
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

    def _task_informed_diagnosis(self, ctx: _Ctx) -> tuple[list[BaseMessage] | None, dict[str, Any]]:
        from ..fusion import HeuristicFusion
        from ..reasoners.llm_finalizer import LLMFinalizer

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
        lines.append(f"Final label: {ctx.im.label}" + (f" (radiologist BI-RADS {ctx.im.birads.upper()})" if ctx.im.birads else "") + ".")
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
        rationale = f"{said}, {why}.\n" + (f"Knowledge: {cites}.\n" if cites else "") + f"Corrected label: {im.label}" + (
            f" (radiologist BI-RADS {im.birads.upper()})" if im.birads else "") + "."
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


# ---------------------------------------------------------------------------------------------------
# export: LangChain messages -> chat-template dicts with images by path
# ---------------------------------------------------------------------------------------------------
def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")


def to_hf_messages(
    messages: Sequence[BaseMessage], image_paths: Mapping[str, str], *, tool_images: bool = True
) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat-template messages (the structure ``QwenVLChatModel.render`` gives the processor) plus the
    image paths, in order.

    Each ``echo-image://<id>`` block becomes ``{"type": "image"}`` and ``image_paths[<id>]`` is
    appended to the returned path list, so the i-th image block of the conversation is the i-th
    path. A detector tool turn with an overlay gets the overlay image after its text when
    ``tool_images`` (as ``QwenVLChatModel(images_in_tool_messages=True)`` shows it). Every content is
    a list of blocks (one Arrow type for ``datasets``); tool-call arguments are dicts.
    """
    out: list[dict[str, Any]] = []
    paths: list[str] = []

    def image(image_id: str) -> dict[str, Any]:
        if image_id not in image_paths:
            raise KeyError(f"image {IMAGE_URI_PREFIX}{image_id} has no path; pass it in image_paths")
        paths.append(str(image_paths[image_id]))
        return {"type": "image"}

    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": [{"type": "text", "text": _text_of(m.content)}]})
        elif isinstance(m, HumanMessage):
            blocks = []
            for b in (m.content if isinstance(m.content, list) else [{"type": "text", "text": m.content}]):
                iid = image_id_from_block(b) if isinstance(b, dict) else None
                if iid is not None:
                    blocks.append(image(iid))
                elif isinstance(b, dict) and b.get("type") == "text":
                    blocks.append({"type": "text", "text": b.get("text", "")})
            out.append({"role": "user", "content": blocks})
        elif isinstance(m, AIMessage):
            text = _text_of(m.content)
            # An empty text turn must be an empty list: Qwen's templates test the content's truth
            # value before a tool call, and a list holding "" would add a newline inference lacks.
            entry: dict[str, Any] = {"role": "assistant", "content": [{"type": "text", "text": text}] if text else []}
            if m.tool_calls:
                entry["tool_calls"] = [
                    {"type": "function", "function": {"name": c["name"], "arguments": c.get("args") or {}}}
                    for c in m.tool_calls
                ]
            out.append(entry)
        elif isinstance(m, ToolMessage):
            blocks = [{"type": "text", "text": _text_of(m.content)}]
            art = m.artifact if isinstance(m.artifact, dict) else {}
            ov = art.get("overlay")
            if tool_images and isinstance(ov, dict) and ov.get("id"):
                blocks.append(image(str(ov["id"])))
            out.append({"role": "tool", "content": blocks})
    return out, paths


def to_hf_record(sample: CurriculumSample, *, tool_images: bool = True, relative_to: str | Path | None = None) -> dict[str, Any]:
    """A JSON-serialisable training record of a sample.

    Keys: ``task``, ``key``, ``organ``, ``split``, ``messages`` (chat-template dicts, see
    :func:`to_hf_messages`), ``images`` (paths, one per image block, in order; relative to
    ``relative_to`` when given), ``tools`` (the OpenAI tool schemas of the organ as a JSON string,
    ``""`` for the finalizer-format task), ``meta`` (JSON string), ``truth`` (JSON string: ``label``,
    ``boxes`` in 0..1000, ``boxes_px``, ``width``, ``height`` -- what the GRPO rewards compare with).
    """
    msgs, paths = to_hf_messages(sample.messages, sample.image_paths, tool_images=tool_images)
    if relative_to is not None:
        base = Path(relative_to).resolve()
        paths = [_rel(p, base) for p in paths]
    # Every agent-format conversation is rendered with the organ's tools bound, as at inference; the
    # finalizer-format conversation (informed_diagnosis) is asked without tools, as LLMFinalizer does.
    has_tools = sample.task not in FINALIZER_TASKS
    tools = _tool_schemas_json(sample.organ) if has_tools else ""
    return {
        "task": sample.task, "key": sample.key, "organ": sample.organ, "split": sample.split or "",
        "messages": msgs, "images": paths, "tools": tools, "meta": json.dumps(sample.meta, ensure_ascii=False),
        "truth": json.dumps(sample.truth, ensure_ascii=False),
    }


def strip_tool_images(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a record without the overlay images of its tool turns (and their paths)."""
    paths = list(record["images"])
    kept: list[str] = []
    msgs = []
    i = 0
    for m in record["messages"]:
        blocks = []
        for b in m.get("content") or []:
            if isinstance(b, dict) and b.get("type") == "image":
                if m["role"] != "tool":
                    blocks.append(b)
                    kept.append(paths[i])
                i += 1
            else:
                blocks.append(b)
        msgs.append({**m, "content": blocks})
    return {**record, "messages": msgs, "images": kept}


def _rel(path: str, base: Path) -> str:
    p = Path(path).resolve()
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return str(p)


# ---------------------------------------------------------------------------------------------------
# output: JSONL, HF datasets, count table
# ---------------------------------------------------------------------------------------------------
def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write records as JSON lines; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a curriculum JSONL file written by :func:`write_jsonl`."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def resolve_images(record: Mapping[str, Any], base: str | Path) -> list[str]:
    """Absolute image paths of a record whose paths are relative to ``base`` (the JSONL's folder)."""
    return [p if Path(p).is_absolute() else str((Path(base) / p).resolve()) for p in record["images"]]


def to_hf_dataset(records: Sequence[Mapping[str, Any]], *, base: str | Path | None = None) -> Any:
    """A ``datasets.Dataset`` of records that yields chat-template ``messages``, ``images`` (paths)
    and ``tools`` (list) when indexed.

    Conversations are stored as JSON text (Arrow would unify the differing tool-argument dicts of
    different rows, adding ``null`` keys that the chat template would render) and decoded on access
    with ``set_transform``, so SFT sees exactly the dicts of :func:`to_hf_messages`.
    """
    import datasets

    rows = [
        {
            "task": r["task"], "key": r["key"], "organ": r["organ"],
            "messages_json": json.dumps(r["messages"], ensure_ascii=False),
            "images": resolve_images(r, base) if base is not None else list(r["images"]),
            "tools_json": r.get("tools") or "",
        }
        for r in records
    ]
    ds = datasets.Dataset.from_list(rows)
    ds.set_transform(decode_batch)
    return ds


def decode_batch(batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    """``set_transform`` decoder of :func:`to_hf_dataset` (JSON text -> messages / tools)."""
    out = dict(batch)
    if "messages_json" in out:
        out["messages"] = [json.loads(s) for s in out.pop("messages_json")]
    if "tools_json" in out:
        out["tools"] = [json.loads(s) if s else None for s in out.pop("tools_json")]
    return out


def count_table(samples: Sequence[CurriculumSample]) -> str:
    """A Markdown table: samples per task and organ, with perturbed counts."""
    organs = sorted({s.organ for s in samples})
    counts = Counter((s.task, s.organ) for s in samples)
    pert = Counter(s.task for s in samples if s.meta.get("perturbed"))
    head = "| task | group | " + " | ".join(organs) + " | total | perturbed |"
    sep = "|---|---|" + "---:|" * (len(organs) + 2)
    lines = [head, sep]
    for t in TASKS:
        n = sum(counts[(t, o)] for o in organs)
        if not n:
            continue
        lines.append(f"| {t} | {TASK_GROUPS[t]} | " + " | ".join(str(counts[(t, o)]) for o in organs)
                     + f" | {n} | {pert[t]} |")
    lines.append("| **all** | | " + " | ".join(str(sum(counts[(t, o)] for t in TASKS)) for o in organs)
                 + f" | {len(samples)} | {sum(pert.values())} |")
    return "\n".join(lines)


def check_no_leakage(samples: Iterable[CurriculumSample], images: Sequence[ManifestImage], forbidden: Sequence[str] = ("test",)) -> None:
    """Raise if a sample comes from an image of a forbidden split (by key and by pixels' path)."""
    bad_keys = {im.key for im in images if im.split in forbidden}
    bad_paths = {str(im.image.resolve()) for im in images if im.split in forbidden}
    for s in samples:
        if s.key in bad_keys or any(str(Path(p).resolve()) in bad_paths for p in s.image_paths.values()):
            raise AssertionError(f"sample {s.task}/{s.key} uses an image of a forbidden split {list(forbidden)}")


def config_dict(config: CurriculumConfig) -> dict[str, Any]:
    """The config as plain data (for the output folder's ``curriculum_config.json``)."""
    d = asdict(config)
    d["tasks"] = list(d["tasks"])
    d["forbidden_splits"] = list(d["forbidden_splits"])
    return d


__all__ = [
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
    "to_hf_record",
    "tool_schemas",
    "write_jsonl",
]
