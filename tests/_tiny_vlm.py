"""Tiny random Qwen2.5-VL / Qwen3-VL checkpoints built offline for tests.

Nothing is downloaded: a byte-level BPE tokenizer is trained on a few sentences with ``tokenizers``,
wrapped as ``Qwen2TokenizerFast`` with the Qwen special tokens, and the model is built from a config
with a few layers and hidden size 32-64, random weights. The chat templates come from the installed
TRL package (the original Qwen templates it ships: Qwen3-VL renders tools, Qwen2.5-VL does not).
Output of such a model is junk by construction; that is the point of the graph tests.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
# Added but not "special": decoding with skip_special_tokens keeps them, as in the real Qwen tokenizers.
PLAIN_ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

_CORPUS = [
    "Read this breast ultrasound image and give a diagnosis.",
    "irregular spiculated hypoechoic mass with posterior shadowing",
    "oval circumscribed parallel mass, benign features",
    '{"name": "detect_breast_lesions", "arguments": {"score_threshold": 0.25, "tta": true}}',
    '{"evidence_id":"det1","candidates":[{"id":"det1:0","box":[120,340,410,620],"label":"malignant","score":0.8}]}',
    "hydronephrosis kidney collecting system fluid grading",
    "You are Echo, an ultrasound reading assistant. Tools, functions, arguments, regions, query.",
]


def _trl_template(name: str) -> str:
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / name
    return path.read_text("utf-8")


def _corpus() -> list[str]:
    # The packaged prompts make the tokenizer compress the real conversations (short prompts = fast tests).
    from importlib import resources

    prompts = resources.files("echo_agent") / "assets" / "prompts"
    texts = [p.read_text("utf-8") for p in prompts.iterdir() if p.name.endswith((".md", ".yaml"))]
    return _CORPUS * 4 + texts


def _tokenizer(vocab_size: int = 1200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.add_tokens(PLAIN_ADDED)
    return fast


def build_tiny_qwen_vl(family: str, target: Path, *, seed: int = 0) -> Path:
    """Write a tiny random ``family`` ('qwen2_5_vl' or 'qwen3_vl') checkpoint to ``target``."""
    import torch

    torch.manual_seed(seed)
    tok = _tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tok)
    common_text = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    if family == "qwen2_5_vl":
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
            Qwen2VLImageProcessor,
            Qwen2VLVideoProcessor,
        )

        cfg = Qwen2_5_VLConfig(
            text_config=dict(common_text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[1]),
            **token_ids,
        )
        model = Qwen2_5_VLForConditionalGeneration(cfg)
        patch = 14
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=patch),
            video_processor=Qwen2VLVideoProcessor(),
            tokenizer=tok, chat_template=_trl_template("qwen2_5_vl.jinja"),
        )
    elif family == "qwen3_vl":
        from transformers import (
            Qwen2VLImageProcessor,
            Qwen3VLConfig,
            Qwen3VLForConditionalGeneration,
            Qwen3VLProcessor,
            Qwen3VLVideoProcessor,
        )

        cfg = Qwen3VLConfig(
            text_config=dict(common_text, head_dim=16,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                               num_position_embeddings=64, deepstack_visual_indexes=[1]),
            **token_ids,
        )
        model = Qwen3VLForConditionalGeneration(cfg)
        processor = Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(
                size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, patch_size=16,
                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
            ),
            video_processor=Qwen3VLVideoProcessor(),
            tokenizer=tok, chat_template=_trl_template("qwen3_vl.jinja"),
        )
    else:
        raise ValueError(f"unknown family {family!r}")
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target
