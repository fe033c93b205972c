"""Supervised fine-tuning of a Qwen-VL reasoner on the curriculum with TRL's ``SFTTrainer``.

The conversations are rendered by the checkpoint's own chat template with the organ's tool schemas
(``tools=``), as :class:`echo_agent.reasoners.qwen_vl.QwenVLChatModel` renders them at inference.
TRL's vision collator does not pass ``tools`` to the template, so :class:`ToolAwareVisionCollator`
does: it renders each conversation with its own tools and pads the batch.

Example::

    from echo_agent.training.sft_config import EchoSFTConfig
    from echo_agent.training.sft_trainer import run_sft
    run_sft(EchoSFTConfig(model_path="/models/Qwen3-VL-2B-Instruct", train_file="cur/train.jsonl",
                          output_dir="runs/sft"))
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingExtraError
from ._config import dump_config, offline_env
from .curriculum import read_jsonl, to_hf_dataset
from .sft_config import EchoSFTConfig


def _require_train_extra() -> None:
    for mod in ("torch", "transformers", "trl", "datasets"):
        try:
            __import__(mod)
        except ImportError:
            raise MissingExtraError(mod, "train", "training the reasoner") from None


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use 'auto', 'bfloat16', 'float16' or 'float32'")
    return dt


def load_model_and_processor(
    model_path: str, *, dtype: str = "auto", attn_implementation: str | None = None, max_pixels: int | None = None
) -> tuple[Any, Any]:
    """A Qwen-VL checkpoint and its processor, from a local folder (offline)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..reasoners.lite_vision import try_register

    try_register()  # checkpoints whose vision side is a pretrained EfficientNet-Lite
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    processor = AutoProcessor.from_pretrained(model_path)
    if max_pixels is not None:
        ip = processor.image_processor
        if isinstance(getattr(ip, "size", None), dict) and "longest_edge" in ip.size:
            ip.size = {**ip.size, "longest_edge": int(max_pixels)}
        if hasattr(ip, "max_pixels"):
            ip.max_pixels = int(max_pixels)
    return model, processor


def open_rgb(path: str) -> Any:
    """The image file at ``path`` as an RGB PIL image (loaded, the file closed)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def fill_images(messages: list[dict[str, Any]], images: list[Any]) -> list[dict[str, Any]]:
    """Put ``images`` into the ``{"type": "image"}`` blocks of every role, in order (TRL's helper
    skips tool turns, where the detector overlay lives)."""
    it = iter(images)
    out = []
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            blocks = []
            for b in content:
                if isinstance(b, dict) and b.get("type") == "image" and "image" not in b:
                    try:
                        b = {"type": "image", "image": next(it)}
                    except StopIteration:
                        raise ValueError(f"the conversation has more image blocks than its {len(images)} image(s)") from None
                    n += 1
                blocks.append(b)
            m = {**m, "content": blocks}
        out.append(m)
    if n != len(images):
        raise ValueError(f"the conversation has {n} image block(s) but {len(images)} image(s)")
    return out


@dataclass
class ToolAwareVisionCollator:
    """Collates curriculum records (``messages``, ``images`` as paths, ``tools``) for a VLM.

    Each conversation is rendered with its own ``tools`` through the processor's chat template
    (``chat_template`` overrides it, e.g. TRL's training template with generation markers), images are
    loaded from their paths in order, and the batch is right-padded. Labels are ``-100`` on padding
    and, with ``assistant_only_loss``, on everything outside the assistant turns.
    """

    processor: Any
    chat_template: str | None = None
    assistant_only_loss: bool = True
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        outs = []
        for ex in examples:
            images = [open_rgb(p) if isinstance(p, str) else p for p in ex.get("images") or []]
            messages = fill_images(ex["messages"], images)
            kwargs: dict[str, Any] = {}
            if ex.get("tools"):
                kwargs["tools"] = ex["tools"]
            out = self.processor.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=True, return_dict=True, return_tensors="pt",
                return_assistant_tokens_mask=self.assistant_only_loss, **kwargs,
            )
            outs.append(out)
        pad_id = self.processor.tokenizer.pad_token_id
        lengths = [int(o["input_ids"].shape[1]) for o in outs]
        width = max(lengths)
        if self.max_length is not None:
            width = min(width, self.max_length)
        batch: dict[str, Any] = {}
        seq_keys = [k for k, v in outs[0].items() if hasattr(v, "shape") and v.ndim == 2 and v.shape[1] == lengths[0]]
        for k in seq_keys:
            fill = pad_id if k == "input_ids" else 0
            rows = []
            for o in outs:
                v = o[k][0][:width]
                rows.append(torch.cat([v, torch.full((width - v.shape[0],), fill, dtype=v.dtype)]))
            batch[k] = torch.stack(rows)
        for k in outs[0]:
            if k in seq_keys:
                continue
            vals = [o[k] for o in outs if k in o]
            if vals and hasattr(vals[0], "shape"):
                batch[k] = torch.cat(vals, dim=0)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        if self.assistant_only_loss:
            labels[batch.pop("assistant_masks") == 0] = -100
        else:
            batch.pop("assistant_masks", None)
        batch["labels"] = labels
        return batch


def load_records(cfg: EchoSFTConfig) -> tuple[list[dict[str, Any]], Path]:
    """The curriculum records a run trains on (task filter, seeded subsample)."""
    path = Path(cfg.train_file)
    records = read_jsonl(path)
    if cfg.tasks:
        records = [r for r in records if r["task"] in set(cfg.tasks)]
    if not cfg.tool_images:
        from .curriculum import strip_tool_images

        records = [strip_tool_images(r) for r in records]
    if cfg.max_samples is not None and len(records) > cfg.max_samples:
        rng = random.Random(cfg.seed)
        records = rng.sample(records, cfg.max_samples)
    if not records:
        raise ValueError(f"{path} has no records for tasks {cfg.tasks}; build the curriculum first")
    return records, path.resolve().parent


class _LogWriter:
    """TrainerCallback that appends every log line to ``<output_dir>/train_log.jsonl`` as it comes."""

    def __new__(cls, path: Path) -> Any:
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if logs and state.is_world_process_zero:
                    with path.open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")

        return _CB()


def run_sft(cfg: EchoSFTConfig, *, model: Any = None, processor: Any = None) -> dict[str, Any]:
    """Train, save ``<output_dir>/final`` (adapter or full model, plus the processor) and the logs.

    Returns a summary: steps, final loss, output paths. Resumes from ``cfg.resume_from_checkpoint``.
    """
    offline_env()
    _require_train_extra()
    import torch
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "echo_sft_config.yaml")
    records, base = load_records(cfg)
    dataset = to_hf_dataset(records, base=base)
    if model is None or processor is None:
        model, processor = load_model_and_processor(
            cfg.model_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, max_pixels=cfg.max_pixels
        )
    peft_config = None
    if cfg.use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM",
        )
    elif cfg.freeze_vision:
        visual = getattr(getattr(model, "model", model), "visual", None)
        if visual is not None:
            for p in visual.parameters():
                p.requires_grad_(False)
    chat_template = None
    if cfg.assistant_only_loss and not has_generation_markers(processor.chat_template):
        chat_template = get_training_chat_template(processor)
    bf16 = torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16
    args = SFTConfig(
        output_dir=str(out), learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler_type, weight_decay=cfg.weight_decay,
        gradient_checkpointing=cfg.gradient_checkpointing, bf16=bf16, seed=cfg.seed,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        max_length=cfg.max_length, assistant_only_loss=cfg.assistant_only_loss,
        dataloader_num_workers=cfg.dataloader_num_workers, use_cpu=not torch.cuda.is_available(),
    )
    collator = ToolAwareVisionCollator(processor, chat_template=chat_template,
                                       assistant_only_loss=cfg.assistant_only_loss, max_length=cfg.max_length)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         data_collator=collator, peft_config=peft_config, callbacks=[_LogWriter(out / "train_log.jsonl")])
    result = trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    final = out / "final"
    trainer.save_model(str(final))
    processor.save_pretrained(str(final))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1), "utf-8")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": int(trainer.state.global_step), "train_loss": float(result.training_loss),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "final_dir": str(final), "adapter": bool(cfg.use_lora), "n_records": len(records),
    }


__all__ = ["ToolAwareVisionCollator", "fill_images", "load_model_and_processor", "load_records", "open_rgb", "run_sft", "torch_dtype"]
