"""JSON-schema constrained decoding for local transformers models (``QwenVLChatModel``).

The character-level JSON-schema parser and the token enforcer come from ``lm-format-enforcer``
(its core modules only: its transformers integration does not import under transformers 5). This
module gives it the tokenizer's vocabulary and exposes the enforcer as the
``prefix_allowed_tokens_fn`` that ``generate`` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import MissingExtraError

__all__ = ["prefix_allowed_tokens_fn", "tokenizer_data"]


def _lmfe() -> Any:
    try:
        import lmformatenforcer
        from lmformatenforcer import tokenenforcer
    except ImportError:
        raise MissingExtraError("lm-format-enforcer", "vlm", "JSON-schema constrained decoding") from None
    return lmformatenforcer, tokenenforcer


def tokenizer_data(tokenizer: Any, eos_token_ids: int | Sequence[int] | None = None) -> Any:
    """The enforcer's view of ``tokenizer`` (its vocabulary as strings in a prefix tree); build it
    once per tokenizer. ``eos_token_ids``: the ids that end a reply (default: the tokenizer's EOS)."""
    _, te = _lmfe()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = len(tokenizer)
    # A token's text after another token shows whether it starts a word (a leading space that a
    # lone decode strips): decode it after "0" and drop that character.
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    regular = []
    for i in range(vocab):
        if i in special:
            continue
        after = tokenizer.decode([zero, i])[1:]
        alone = tokenizer.decode([i])
        regular.append((i, after, len(after) > len(alone)))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids).rstrip("\ufffd")  # a partial multi-byte character is not text yet

    eos = eos_token_ids if eos_token_ids is not None else tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else eos
    return te.TokenEnforcerTokenizerData(regular, decode, eos, False, vocab)


def _inside_string(text: str) -> bool:
    """Whether JSON ``text`` ends inside a string (an odd number of unescaped quotes)."""
    inside, escaped = False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and inside:
            escaped = True
        elif ch == '"':
            inside = not inside
    return inside


def prefix_allowed_tokens_fn(data: Any, schema: dict[str, Any]) -> Any:
    """``generate(prefix_allowed_tokens_fn=...)``: the tokens that keep the reply a prefix of a
    JSON document valid under ``schema`` (the ids of the first call are the prompt; only what
    follows is parsed). Outside strings, tokens that start with whitespace are not offered: JSON
    never needs them, and a small model left free to emit them can spend its whole token budget
    on newlines (the enforcer's own whitespace limit did not hold here)."""
    lmfe, te = _lmfe()
    enforcer = te.TokenEnforcer(data, lmfe.JsonSchemaParser(schema))
    spaced = {i for i, text, _ in data.regular_tokens if text[:1].isspace()}
    prompt_len: list[int] = []

    def allowed(batch_id: int, ids: Any) -> list[int]:
        seq = ids.tolist()
        if not prompt_len:
            prompt_len.append(len(seq))
        out = list(enforcer.get_allowed_tokens(seq).allowed_tokens)
        if not _inside_string(data.decoder(seq[prompt_len[0]:])):
            kept = [t for t in out if t not in spaced]
            return kept or out
        return out

    return allowed
