"""GRPO of a Qwen-VL reasoner with the agent's real tools (TRL GRPOTrainer, environment_factory).

    HF_HUB_OFFLINE=1 python tools/train_grpo.py --config configs/training/grpo_qwen3vl_echo_diag.yaml \
        model_path=runs/sft/final train_file=data/curriculum/train.jsonl
    python tools/train_grpo.py --config ... resume_from_checkpoint=true      # resume the latest checkpoint
    python tools/train_grpo.py --help-config                                  # every field with its help

Overrides are ``key=value`` (YAML values). Output: ``<output_dir>/checkpoint-*``, ``final/``,
``train_log.jsonl``, ``log_history.json``, ``echo_grpo_config.yaml``.
"""

from __future__ import annotations

import sys

from echo_agent.training._config import run_cli
from echo_agent.training.grpo_config import EchoGRPOConfig

if __name__ == "__main__":
    sys.exit(run_cli(__doc__ or "", EchoGRPOConfig, "echo_agent.training.grpo_trainer:run_grpo"))
