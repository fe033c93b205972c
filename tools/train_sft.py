"""Supervised fine-tuning of a Qwen-VL reasoner on the curriculum (TRL SFTTrainer, optional LoRA).

    HF_HUB_OFFLINE=1 python tools/train_sft.py --config configs/training/sft_qwen3vl_lora.yaml \
        model_path=/models/Qwen3-VL-2B-Instruct train_file=data/curriculum/train.jsonl
    python tools/train_sft.py --config ... resume_from_checkpoint=true      # resume the latest checkpoint
    python tools/train_sft.py --help-config                                  # every field with its help

Overrides are ``key=value`` (YAML values). Output: ``<output_dir>/checkpoint-*``, ``final/``,
``train_log.jsonl``, ``log_history.json``, ``echo_sft_config.yaml``.
"""

from __future__ import annotations

import sys

from echo_agent.training._config import run_cli
from echo_agent.training.sft_config import EchoSFTConfig

if __name__ == "__main__":
    sys.exit(run_cli(__doc__ or "", EchoSFTConfig, "echo_agent.training.sft_trainer:run_sft"))
