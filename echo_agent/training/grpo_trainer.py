"""GRPO for the Qwen-VL reasoner with the agent's real tools, through TRL's ``GRPOTrainer``.

The rollouts call the same tools as the agent -- the organ's lesion detector (through the single
detection path :func:`echo_agent.tools.run_detector`), the pixel captioner and the knowledge retriever
-- exposed to TRL as an ``environment_factory`` (one environment class per organ, whose public methods
are the tools, named as at inference: ``detect_<organ>_lesions``, ``describe_image``,
``retrieve_knowledge``). Each tool returns the same model-facing JSON as the agent's tool turn (and,
with ``overlays``, the detector's overlay image), and errors come back as the same ``Error: ...`` text.

The prompt shows the tools with the *same* JSON schemas, in the same order, as inference: the
processor's ``apply_chat_template`` is wrapped so that each environment method is rendered with the
schema of the real LangChain tool (:func:`echo_agent.training.curriculum.tool_schemas`) instead of one
derived from the Python signature, and in the agent's order rather than TRL's alphabetical one.

Tool prompts and final-answer prompts can be trained together: a final-answer prompt
(``agent_final``, ``informed_diagnosis``) is asked without tools at inference, so in a mixed run it
gets the tool-less :data:`ANSWER_ENVIRONMENT` (TRL renders each prompt with its own environment's
tools) and is rendered exactly as ``LLMFinalizer`` asks it.

Rewards: a preset of :mod:`echo_agent.training.rewards` (``echo-ground`` / ``echo-diag``) as TRL
``reward_funcs`` + ``reward_weights``; ground truth reaches them as dataset columns.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import EchoInputError
from ..eval.manifest import ManifestImage
from ..messages import dumps, evidence_to_model
from ..organs import OrganSpec, get_organ
from ..prompts import tool_text
from ..schemas import Box, DetectorReport
from ._config import dump_config, offline_env
from .curriculum import FINALIZER_TASKS, SimulatedDetector, read_jsonl, tool_schemas
from .grpo_config import EchoGRPOConfig
from .grpo_data import ANSWER_ENVIRONMENT, _decode_grpo, grpo_rows
from .rewards import VALIDITY_METRICS, get_preset
from .sft_trainer import _LogWriter, _require_train_extra, load_model_and_processor


def _error_text(exc: Exception) -> str:
    # Exactly the text the graph's ToolNode returns for a failed tool call.
    from ..graph.build import tool_error_text

    return tool_error_text(exc)


def _google_doc(description: str, fields: dict[str, str]) -> str:
    lines = [description, "", "Args:"]
    lines += [f"    {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines)


def make_environment(
    spec: OrganSpec,
    *,
    detector: str = "auto",
    overlays: bool = True,
    detectors: dict[str, Any] | None = None,
    captioner: Any = None,
    retriever: Any = None,
    classifiers: dict[str, Any] | None = None,
    seed: int = 0,
) -> type:
    """An environment class for ``spec`` whose methods are the agent's tools (TRL ``environment_factory``).

    ``reset(**row)`` reads the dataset row (``image_path``, ``key``, ``gt_label``, ``truth``) and
    loads the image; tool calls then work on that image. ``detector``: ``'live'`` runs the real
    detector (``detectors[organ]`` or the packaged weights), ``'simulated'`` uses
    :class:`~echo_agent.training.curriculum.SimulatedDetector` (ground truth + noise; demos only),
    ``'auto'`` picks live when the organ has weights. Organs with a second-look classifier get its
    tool too (``classifiers[organ]`` or the packaged weights), as at inference.
    """
    from ..tools.builders import ClassifyArgs, DescribeArgs, DetectArgs, RetrieveArgs, regions_to_boxes

    det_name, det_desc = tool_text("detect_lesions", spec)
    cls_name, cls_desc = tool_text("classify_regions", spec)
    desc_name, desc_desc = tool_text("describe_image")
    kb_name, kb_desc = tool_text("retrieve_knowledge")
    inference = tool_schemas(spec)
    schemas = {s["function"]["name"]: s for s in inference}
    order = {s["function"]["name"]: i for i, s in enumerate(inference)}
    mode = detector
    if mode == "auto":
        weights = spec.resolve_weights()
        mode = "live" if (detectors and spec.name in detectors) or (weights is not None and weights.exists()) else "simulated"
    shared: dict[str, Any] = {"captioner": captioner, "retriever": retriever}

    def source() -> Any:
        if "source" not in shared:
            if mode == "live":
                from .curriculum import LiveDetector

                shared["source"] = LiveDetector(detectors)
            else:
                shared["source"] = SimulatedDetector(seed)
        return shared["source"]

    def cap() -> Any:
        if shared["captioner"] is None:
            from ..evidence.captioner import PixelCaptioner

            shared["captioner"] = PixelCaptioner()
        return shared["captioner"]

    def ret() -> Any:
        if shared["retriever"] is None:
            from ..evidence.knowledge import get_retriever

            shared["retriever"] = get_retriever()
        return shared["retriever"]

    class EchoToolEnvironment:
        """One rollout's view of the agent's tools on one image."""

        organ = spec.name

        def __init__(self) -> None:
            self.image: Any = None
            self.im: ManifestImage | None = None
            self.counts = {"det": 0, "cls": 0, "desc": 0, "kb": 0}
            self.calls: list[tuple[str, dict[str, Any]]] = []
            self.candidates: dict[str, Box] = {}  # detection id -> pixel box, for calls that cite ids

        def reset(self, **row: Any) -> None:
            from ..imaging import load_image

            truth = row.get("truth") or {}
            if isinstance(truth, str):
                truth = json.loads(truth)
            path = row.get("image_path")
            if not path:
                raise EchoInputError("a GRPO dataset row needs 'image_path'")
            self.image = load_image(path).array
            boxes = tuple(Box.from_xyxy(b) for b in truth.get("boxes_px", []))
            self.im = ManifestImage(image=Path(path), organ=spec.name, label=str(row.get("gt_label") or truth.get("label")),
                                    boxes=boxes, split=row.get("split"))
            self.counts = {"det": 0, "cls": 0, "desc": 0, "kb": 0}
            self.calls = []
            self.candidates = {}
            return None

        def _result(self, item: Any, image: Any = None) -> Any:
            text = dumps(evidence_to_model(item))
            if image is None:
                return text
            from PIL import Image

            return [{"type": "text", "text": text}, {"type": "image", "image": Image.fromarray(image)}]

    def detect(self, score_threshold: float = 0.25, tta: bool = False, region: list[int] | None = None) -> Any:
        self.calls.append((det_name, {"score_threshold": score_threshold, "tta": tta, "region": region}))
        try:
            args = DetectArgs.model_validate({"score_threshold": score_threshold, "tta": tta, "region": region})
            h, w = self.image.shape[:2]
            self.counts["det"] += 1
            eid = f"det{self.counts['det']}"
            src = source()
            dets = src(self.im, self.image, score_threshold=args.score_threshold, tta=args.tta) or []
            region_box = Box.from_model(args.region, w, h) if args.region else None
            if region_box is not None:
                dets = [d for d in dets if d.box.intersection(region_box) > 0]
            dets = [d.model_copy(update={"id": f"{eid}:{i}"}) for i, d in enumerate(dets)]
            self.candidates.update((d.id, d.box) for d in dets)
            report = DetectorReport(id=eid, organ=spec.name, detector=src.name, detections=dets,
                                    score_threshold=args.score_threshold, tta=args.tta, region=region_box,
                                    image_width=w, image_height=h)
        except Exception as exc:
            return _error_text(exc)
        overlay = None
        if overlays:
            from ..imaging.overlay import render_overlay

            overlay = render_overlay(self.image, dets)
        return self._result(report, overlay)

    def describe(self, regions: list[list[int]] | None = None, detection_ids: list[str] | None = None) -> Any:
        self.calls.append((desc_name, {"regions": regions, "detection_ids": detection_ids}))
        try:
            args = DescribeArgs.model_validate({"regions": regions or [], "detection_ids": detection_ids})
            h, w = self.image.shape[:2]
            boxes = regions_to_boxes(args.regions, args.detection_ids, w, h, lambda: self.candidates)
            self.counts["desc"] += 1
            ctx = cap().describe(self.image, organ=spec.name, regions=boxes, detection_ids=args.detection_ids,
                                 evidence_id=f"desc{self.counts['desc']}")
        except Exception as exc:
            return _error_text(exc)
        return self._result(ctx)

    def classify(self, regions: list[list[int]] | None = None, detection_ids: list[str] | None = None,
                 whole_image: bool = True) -> Any:
        self.calls.append((cls_name, {"regions": regions, "detection_ids": detection_ids, "whole_image": whole_image}))
        try:
            from ..detectors import get_region_classifier
            from ..tools.toolkit import classify_regions

            args = ClassifyArgs.model_validate({"regions": regions or [], "detection_ids": detection_ids,
                                                "whole_image": whole_image})
            h, w = self.image.shape[:2]
            clf = (classifiers or {}).get(spec.name) or get_region_classifier(spec)
            boxes = regions_to_boxes(args.regions, args.detection_ids, w, h, lambda: self.candidates)
            res = classify_regions(spec, self.image, boxes, args.detection_ids,
                                   whole_image=args.whole_image, classifier=clf,
                                   evidence_id=f"cls{self.counts['cls'] + 1}")
            self.counts["cls"] += 1
        except Exception as exc:
            return _error_text(exc)
        return self._result(res)

    def retrieve(self, query: str, organ: str | None = None, k: int = 3) -> Any:
        self.calls.append((kb_name, {"query": query, "organ": organ, "k": k}))
        try:
            args = RetrieveArgs.model_validate({"query": query, "organ": organ, "k": k})
            target = args.organ or spec.name
            get_organ(target)
            self.counts["kb"] += 1
            res = ret().retrieve(args.query, organ=target, k=args.k, evidence_id=f"kb{self.counts['kb']}")
        except Exception as exc:
            return _error_text(exc)
        return self._result(res)

    tools = [(detect, det_name, det_desc, DetectArgs)]
    if cls_name in schemas:  # the organ has a second-look classifier (as at inference)
        tools.append((classify, cls_name, cls_desc, ClassifyArgs))
    tools += [(describe, desc_name, desc_desc, DescribeArgs), (retrieve, kb_name, kb_desc, RetrieveArgs)]
    for fn, name, description, model in tools:
        fields = {k: (f.description or k) for k, f in model.model_fields.items() if k != "runtime"}
        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = _google_doc(description, fields)
        fn.__echo_schema__ = schemas[name]  # type: ignore[attr-defined]
        fn.__echo_order__ = order[name]  # type: ignore[attr-defined]
        setattr(EchoToolEnvironment, name, fn)
    EchoToolEnvironment.__name__ = f"EchoToolEnvironment_{spec.name}"
    return EchoToolEnvironment


class FinalAnswerEnvironment:
    """A final-answer prompt's environment: no tools, no observation (``LLMFinalizer`` asks for the
    answer without tools)."""

    def reset(self, **row: Any) -> None:
        return None


def inference_tool_list(tools: Sequence[Any]) -> list[Any]:
    """The tools as the reasoner is bound with them at inference: environment methods become the
    inference schemas they carry (``__echo_schema__``), in the inference order (``__echo_order__``:
    detector first). TRL lists an environment's methods alphabetically, and the order is part of the
    prompt: the micro policy, shown its kidney tools in alphabetical order, called the breast detector.
    Other tools keep their order, before the environment's."""
    others = [t for t in tools if getattr(t, "__echo_schema__", None) is None]
    echo = sorted((t for t in tools if getattr(t, "__echo_schema__", None) is not None),
                  key=lambda t: getattr(t, "__echo_order__", 0))
    return [*others, *(t.__echo_schema__ for t in echo)]


def use_inference_tool_schemas(processor: Any) -> Any:
    """Make ``processor.apply_chat_template`` render environment methods as at inference
    (:func:`inference_tool_list`); other tools pass through unchanged."""
    original = processor.apply_chat_template
    if getattr(original, "__echo_wrapped__", False):
        return processor

    def apply_chat_template(conversation: Any, *args: Any, tools: Any = None, **kwargs: Any) -> Any:
        if tools:
            tools = inference_tool_list(tools)
        return original(conversation, *args, tools=tools, **kwargs)

    apply_chat_template.__echo_wrapped__ = True  # type: ignore[attr-defined]
    processor.apply_chat_template = apply_chat_template
    return processor


def grpo_records(cfg: EchoGRPOConfig) -> list[dict[str, Any]]:
    """The curriculum records of ``cfg.tasks`` in ``cfg.train_file`` (file order)."""
    path = Path(cfg.train_file)
    records = [r for r in read_jsonl(path) if r["task"] in set(cfg.tasks)]
    if not records:
        raise ValueError(f"{path} has no records of tasks {cfg.tasks}; build the curriculum with them")
    return records


def informative_records(model: Any, processor: Any, records: list[dict[str, Any]], cfg: EchoGRPOConfig
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(kept records, report)`` of the informative-prompt filter (``cfg.filter_samples`` > 0): each
    tool-less prompt is answered ``filter_samples`` times by ``model`` at the rollout temperature and
    scored with the run's rewards; a prompt whose answers all earn the same reward is dropped (on such
    a prompt a GRPO group is almost surely all-equal: zero advantage, only the KL term). Tool prompts
    are kept: their rollouts need the tool environment, and they hold the tool-calling skill in place."""
    from .answer_rewards import answer_rewards

    if cfg.filter_samples < 2:
        raise ValueError(f"filter_samples must be 0 (off) or at least 2, got {cfg.filter_samples}: "
                         "one answer per prompt has no spread to keep a prompt for")
    answerable = [i for i, r in enumerate(records) if r["task"] in FINALIZER_TASKS]
    if not answerable:
        return records, {"answered": 0, "kept": len(answerable), "tool_prompts": len(records) - len(answerable)}
    got = answer_rewards(model, processor, [records[i] for i in answerable], Path(cfg.train_file).resolve().parent,
                         get_preset(cfg.reward_weights or cfg.preset), samples=cfg.filter_samples,
                         temperature=cfg.temperature, max_new_tokens=cfg.max_completion_length)
    dropped = {i for i, spread in zip(answerable, got.spread(), strict=True) if spread <= 1e-9}
    kept = [r for i, r in enumerate(records) if i not in dropped]
    if not kept:
        raise ValueError(f"the informative-prompt filter left no prompt: all {len(answerable)} tool-less prompts "
                         f"got {cfg.filter_samples} equally rewarded answers; lower filter_samples to 0 or add prompts")
    report = {"answered": len(answerable), "samples": cfg.filter_samples, "kept": len(answerable) - len(dropped),
              "tool_prompts": len(records) - len(answerable), "mean_reward": got.mean, "terms": got.terms}
    return kept, report


def grpo_dataset(cfg: EchoGRPOConfig, records: list[dict[str, Any]] | None = None) -> Any:
    """The GRPO prompts (``datasets.Dataset`` decoded on access): ``records`` (default: those of
    ``cfg.tasks``), at most ``cfg.max_prompts`` of them (seeded)."""
    import datasets

    path = Path(cfg.train_file)
    records = grpo_records(cfg) if records is None else records
    if cfg.max_prompts is not None and len(records) > cfg.max_prompts:
        records = random.Random(cfg.seed).sample(records, cfg.max_prompts)
    ds = datasets.Dataset.from_list(grpo_rows(records, path.resolve().parent))
    ds.set_transform(_decode_grpo)
    return ds


def run_grpo(cfg: EchoGRPOConfig, *, model: Any = None, processor: Any = None,
             detectors: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run GRPO; save ``<output_dir>/final`` and the logs. Returns a summary with the reward curve."""
    offline_env()
    _require_train_extra()
    import torch
    from trl import GRPOConfig, GRPOTrainer

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "echo_grpo_config.yaml")
    records = grpo_records(cfg)
    if model is None or processor is None:
        model, processor = load_model_and_processor(cfg.model_path, dtype=cfg.dtype, max_pixels=cfg.max_pixels)
        if cfg.adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, cfg.adapter_path).merge_and_unload()
    prompt_filter = None
    if cfg.filter_samples:
        was_training = model.training
        records, prompt_filter = informative_records(model.eval(), processor, records, cfg)
        model.train(was_training)
        (out / "prompt_filter.json").write_text(json.dumps(prompt_filter, indent=1), "utf-8")
    dataset = grpo_dataset(cfg, records)
    processor.tokenizer.padding_side = "left"
    use_inference_tool_schemas(processor)
    organs = sorted({dataset[i]["organ"] for i in range(len(dataset))})
    # Final-reasoning prompts (LLMFinalizer's turn) are asked without tools at inference: alone they
    # get no environment (binding tools would change the rendered prompt); beside tool prompts, the
    # tool-less ANSWER_ENVIRONMENT.
    with_tools = not set(cfg.tasks) <= FINALIZER_TASKS
    factories: dict[str, Any] | None = None
    if with_tools:
        factories = {o: make_environment(get_organ(o), detector=cfg.detector, overlays=cfg.overlays,
                                         detectors=detectors, seed=cfg.seed) for o in organs}
        if set(cfg.tasks) & FINALIZER_TASKS:
            factories[ANSWER_ENVIRONMENT] = FinalAnswerEnvironment
    preset = get_preset(cfg.reward_weights or cfg.preset)
    peft_config = None
    if cfg.use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules,
                                 task_type="CAUSAL_LM")
    bf16 = torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16
    # The validity metrics ride along with weight 0: logged every step (rewards/<name>/mean), never optimised.
    metrics = [k for k in VALIDITY_METRICS if k not in preset.weights]
    reward_funcs = preset.funcs() + [VALIDITY_METRICS[k] for k in metrics]
    reward_weights = preset.weight_list() + [0.0] * len(metrics)
    args = GRPOConfig(
        output_dir=str(out), reward_weights=reward_weights, max_tool_calling_iterations=cfg.max_tool_calling_iterations,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, beta=cfg.beta, learning_rate=cfg.learning_rate, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, report_to=cfg.report_to, seed=cfg.seed,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=cfg.gradient_checkpointing,
        use_vllm=cfg.use_vllm, remove_unused_columns=False,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=processor,
        environment_factory=factories, peft_config=peft_config, callbacks=[_LogWriter(out / "train_log.jsonl")],
    )
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    final = out / "final"
    trainer.save_model(str(final))
    processor.save_pretrained(str(final))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1, default=str), "utf-8")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"steps": int(trainer.state.global_step), "rewards": rewards, "final_dir": str(final),
            "preset": preset.name, "weights": dict(preset.weights), "n_prompts": len(dataset),
            **({"prompt_filter": prompt_filter} if prompt_filter else {})}


__all__ = [
    "ANSWER_ENVIRONMENT",
    "FinalAnswerEnvironment",
    "grpo_dataset",
    "grpo_records",
    "grpo_rows",
    "inference_tool_list",
    "informative_records",
    "make_environment",
    "run_grpo",
    "use_inference_tool_schemas",
]
