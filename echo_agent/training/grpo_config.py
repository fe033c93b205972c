"""Configuration of a GRPO run with the agent's real tools (``tools/train_grpo.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EchoGRPOConfig:
    """What ``run_grpo`` optimises, with which rewards and tools. YAML file + ``key=value`` overrides."""

    model_path: str = field(default="", metadata={"help": "Policy checkpoint (usually the SFT run's final/ folder)."})
    adapter_path: str | None = field(default=None, metadata={"help": "A LoRA adapter from SFT to start from (merged)."})
    train_file: str = field(default="", metadata={"help": "Curriculum JSONL; the prompts of its agent tasks are used."})
    output_dir: str = field(default="runs/grpo", metadata={"help": "Checkpoints, logs and the final model go here."})
    tasks: list[str] = field(
        default_factory=lambda: ["grounded_diagnosis", "tool_detection", "report_generation"],
        metadata={"help": "Curriculum tasks whose system+user turns become GRPO prompts."},
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Use at most this many prompts (seeded)."})
    filter_samples: int = field(
        default=0,
        metadata={"help": "Informative-prompt filter: before training, answer each tool-less prompt (agent_final, "
                          "informed_diagnosis) this many times with the starting policy at the rollout temperature "
                          "and drop those whose answers all earn the same reward -- their groups would have zero "
                          "advantage. Tool prompts are kept. Applied before max_prompts. 0: off."},
    )
    preset: str = field(default="echo-diag", metadata={"help": "Reward preset: 'echo-ground' or 'echo-diag'."})
    reward_weights: dict[str, float] | None = field(
        default=None, metadata={"help": "Custom {reward: weight} instead of the preset."}
    )
    detector: str = field(
        default="auto",
        metadata={"help": "'live' (packaged/override weights), 'simulated' (ground truth + noise, for demos) or "
                          "'auto' (live when the organ has weights, else simulated)."},
    )
    overlays: bool = field(default=True, metadata={"help": "Return the detector overlay image in its tool result."})
    max_tool_calling_iterations: int = field(default=4, metadata={"help": "Tool rounds per rollout."})
    num_generations: int = field(default=4, metadata={"help": "Rollouts per prompt (the GRPO group)."})
    max_completion_length: int = field(default=1024, metadata={"help": "Tokens per rollout (tool results included)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the reference model (0 = no reference)."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate."})
    max_steps: int = field(default=200, metadata={"help": "Optimiser steps."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Rollouts per device and step (multiple of num_generations)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] | str = field(default="all-linear", metadata={"help": "LoRA target modules."})
    dtype: str = field(default="auto", metadata={"help": "'auto', 'bfloat16', 'float32'."})
    max_pixels: int | None = field(default=None, metadata={"help": "Processor image budget in pixels."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Trade compute for memory."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 (None = on when CUDA is there)."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (GPU; see TRL's docs)."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    logging_steps: int = field(default=1, metadata={"help": "Log every N steps."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | bool | None = field(default=None, metadata={"help": "Checkpoint folder or true (latest)."})
    report_to: str = field(default="none", metadata={"help": "'none', 'tensorboard', 'wandb' ..."})


__all__ = ["EchoGRPOConfig"]
