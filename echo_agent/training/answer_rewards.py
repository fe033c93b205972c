"""A policy's answers to tool-less prompts, scored with a reward preset outside the GRPO loop.

Two users: the val reward measure of ``tools/train_micro_policy.py`` (greedy answers, and sampled ones
at the rollout temperature), and GRPO's informative-prompt filter (``EchoGRPOConfig.filter_samples``),
which drops the prompts whose sampled answers all earn the same reward -- their GRPO groups would
have zero advantage and teach nothing but the KL term. :func:`score_answers` scores answers that come
from anywhere else (the SFT targets, another model, hand-built oracles) the same way, without a model.

Only prompts asked without tools are answered here (``agent_final``, ``informed_diagnosis``: what
``LLMFinalizer`` asks); they are rendered exactly as at inference, with no tool block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .curriculum import FINALIZER_TASKS, resolve_images
from .rewards import REWARD_FUNCS, RewardPreset


@dataclass
class AnswerRewards:
    """Rewards of ``samples`` answers (1: greedy) to each prompt, in prompt order."""

    per_prompt: list[list[float]]  #: the weighted reward of each answer
    terms: dict[str, float]  #: each reward term's mean over all answers (unweighted)
    texts: list[list[str]] = field(repr=False)  #: the answers

    @property
    def mean(self) -> float:
        values = [v for row in self.per_prompt for v in row]
        return sum(values) / max(len(values), 1)

    def spread(self) -> list[float]:
        """Per prompt, the highest minus the lowest reward of its answers (0: they all scored the same)."""
        return [max(row) - min(row) if row else 0.0 for row in self.per_prompt]


def answer_rewards(model: Any, processor: Any, records: Sequence[dict[str, Any]], base: str | Path,
                   preset: RewardPreset, *, samples: int = 0, temperature: float = 1.0,
                   max_new_tokens: int = 160) -> AnswerRewards:
    """Answer each tool-less curriculum record (``samples`` = 0: once, greedily; else ``samples``
    times at ``temperature``, each prompt's generator seeded by its position so that checkpoints are
    compared on the same draws) and score every answer with ``preset``'s weighted rewards, the ground
    truth taken from the same columns GRPO's dataset gives the reward functions.

    Raises ``ValueError`` for a record that is asked with tools at inference (its rollouts need the
    tool environment; train those with :func:`echo_agent.training.grpo_trainer.run_grpo`).
    """
    return answer_rewards_by_samples(model, processor, records, base, preset, [samples], temperature=temperature,
                                     max_new_tokens=max_new_tokens)[samples]


def answer_rewards_by_samples(model: Any, processor: Any, records: Sequence[dict[str, Any]], base: str | Path,
                              preset: RewardPreset, samples: Sequence[int], *, temperature: float = 1.0,
                              max_new_tokens: int = 160) -> dict[int, AnswerRewards]:
    """:func:`answer_rewards` for several ``samples`` counts at once (e.g. ``[0, 4]``: greedy and 4
    sampled answers), each prompt rendered once; the same answers as separate calls."""
    import torch

    from .sft_trainer import fill_images, open_rgb

    _check_tool_less(records)
    base = Path(base)
    cols = _truth_columns(records, base)
    counts = list(dict.fromkeys(samples))
    texts: dict[int, list[list[str]]] = {n: [] for n in counts}
    for i, r in enumerate(records):
        x = processor.apply_chat_template(
            fill_images(r["messages"][:2], [open_rgb(p) for p in resolve_images(r, base)]),
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        for n in counts:
            how: dict[str, Any] = {"do_sample": False}
            if n:
                torch.manual_seed(i)
                how = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "num_return_sequences": n}
            with torch.inference_mode():
                ids = model.generate(**x, max_new_tokens=max_new_tokens, **how)
            texts[n].append([processor.tokenizer.decode(row[x["input_ids"].shape[1]:], skip_special_tokens=True)
                             for row in ids])
    return {n: _scored(texts[n], cols, preset) for n in counts}


def score_answers(records: Sequence[dict[str, Any]], answers: Sequence[Sequence[str]], base: str | Path,
                  preset: RewardPreset) -> AnswerRewards:
    """Score given ``answers`` to tool-less curriculum records with ``preset``'s weighted rewards, the
    ground truth taken as :func:`answer_rewards` takes it; no model is involved. ``answers[i]`` lists
    the answers to ``records[i]``; every record needs the same number of them.

    >>> from echo_agent.training.rewards import get_preset
    >>> score_answers([], [], ".", get_preset("echo-diag")).per_prompt
    []

    Raises ``ValueError`` for a record asked with tools, or answers that do not match the records.
    """
    _check_tool_less(records)
    if len(answers) != len(records):
        raise ValueError(f"{len(answers)} answer lists for {len(records)} records")
    counts = {len(a) for a in answers}
    if len(counts) > 1:
        raise ValueError(f"every record needs the same number of answers, got {sorted(counts)}")
    if answers and not answers[0]:
        raise ValueError("each record needs at least one answer")
    return _scored([list(a) for a in answers], _truth_columns(records, Path(base)), preset)


def _check_tool_less(records: Sequence[dict[str, Any]]) -> None:
    for r in records:
        if r["task"] not in FINALIZER_TASKS:
            raise ValueError(f"record {r.get('key')!r} (task {r['task']!r}) is asked with tools; only "
                             f"{sorted(FINALIZER_TASKS)} prompts can be answered here")


def _truth_columns(records: Sequence[dict[str, Any]], base: Path) -> dict[str, list[Any]]:
    """The ground-truth columns GRPO's dataset gives the reward functions, one entry per record."""
    from .grpo_data import grpo_rows

    rows = grpo_rows(list(records), base)
    return {k: [row[k] for row in rows] for k in ("gt_label", "gt_boxes", "organ", "width", "height", "detections")}


def _scored(texts: list[list[str]], cols: dict[str, list[Any]], preset: RewardPreset) -> AnswerRewards:
    k = len(texts[0]) if texts else 1
    completions = [[{"role": "assistant", "content": t}] for row in texts for t in row]
    per = {key: [v for v in vals for _ in range(k)] for key, vals in cols.items()}
    total = [0.0] * len(completions)
    terms: dict[str, float] = {}
    for name, w in preset.weights.items():
        vals = REWARD_FUNCS[name](completions, **per)
        terms[name] = sum(vals) / max(len(vals), 1)
        total = [t + w * v for t, v in zip(total, vals, strict=True)]
    return AnswerRewards(per_prompt=[total[i * k:(i + 1) * k] for i in range(len(texts))], terms=terms, texts=texts)


__all__ = ["AnswerRewards", "answer_rewards", "answer_rewards_by_samples", "score_answers"]
