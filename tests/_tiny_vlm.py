"""Tiny random Qwen2.5-VL / Qwen3-VL checkpoints for tests (built offline; see
:mod:`echo_agent.training.tiny_model`, which the CPU micro demo uses too)."""

from __future__ import annotations

from echo_agent.training.tiny_model import PLAIN_ADDED, SPECIAL_TOKENS, build_tiny_qwen_vl

__all__ = ["PLAIN_ADDED", "SPECIAL_TOKENS", "build_tiny_qwen_vl"]
