"""Configuration of a supervised fine-tuning run on the curriculum (``tools/train_sft.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EchoSFTConfig:
    """What ``run_sft`` trains, on what, and how. Every field can be set in a YAML file or overridden
    on the command line (``key=value``)."""

    model_path: str = field(default="", metadata={"help": "Base checkpoint directory (Qwen2.5-VL / Qwen3-VL)."})
    train_file: str = field(default="", metadata={"help": "Curriculum JSONL (tools/build_curriculum.py)."})
    output_dir: str = field(default="runs/sft", metadata={"help": "Checkpoints, logs and the final model go here."})
    tasks: list[str] | None = field(default=None, metadata={"help": "Train only these curriculum tasks (None = all)."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many records (seeded shuffle)."})
    # model / adapter
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | str = field(
        default="all-linear", metadata={"help": "Modules to adapt ('all-linear' or a list of module names)."}
    )
    freeze_vision: bool = field(default=True, metadata={"help": "Full fine-tuning only: keep the vision tower frozen."})
    dtype: str = field(default="auto", metadata={"help": "'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16', 'float32'."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. 'sdpa' or 'flash_attention_2'."})
    max_pixels: int | None = field(default=None, metadata={"help": "Processor image budget in pixels (visual tokens)."})
    # optimisation
    assistant_only_loss: bool = field(default=True, metadata={"help": "Loss on assistant turns only (not on prompts, tool results)."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate sequences to this many tokens (None = no truncation)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimiser steps (-1 = from epochs)."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Conversations per device and step."})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "Micro-batches per optimiser step."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of steps for the LR warm-up."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Trade compute for memory."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (None = on when CUDA is there)."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and initialisation."})
    # bookkeeping
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps (log_history.json, trainer_state.json)."})
    save_steps: int = field(default=200, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | bool | None = field(
        default=None, metadata={"help": "A checkpoint folder, or true for the latest in output_dir."}
    )
    tool_images: bool = field(default=True, metadata={"help": "Keep the detector overlay image in tool turns."})
    report_to: str = field(default="none", metadata={"help": "'none', 'tensorboard', 'wandb' ..."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})


__all__ = ["EchoSFTConfig"]
