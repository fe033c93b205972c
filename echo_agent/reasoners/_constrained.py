"""JSON-schema constrained decoding for local transformers models (``QwenVLChatModel``).

The character-level JSON-schema parser and the token enforcer come from ``lm-format-enforcer``
(its core modules only: its transformers integration does not import under transformers 5). This
module gives it the tokenizer's vocabulary and exposes the enforcer as the
``prefix_allowed_tokens_fn`` that ``generate`` takes.

One gap of the enforcer is closed here: inside a free-text string it offers a token only if the
token stays inside the string or ends with its closing quote, so a token that closes the string
and goes on (``.","`` or ``."}`` in a vocabulary that merged them) was refused even where the
document allows it, and a model that learned those merges was pushed off its own spelling of the
end of a string. ``_QuotedTokens`` offers them where the characters after the quote are valid.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
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


def _open_string_start(text: str) -> int | None:
    """Where the string that JSON ``text`` ends inside opens (the index of its opening quote), or
    ``None`` where ``text`` does not end inside a string."""
    start, escaped = None, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and start is not None:
            escaped = True
        elif ch == '"':
            start = i if start is None else None
    return start


def _accepts(parser: Any, text: str) -> bool:
    """Whether ``parser`` takes every character of ``text`` in turn."""
    for ch in text:
        if ch not in parser.get_allowed_characters():
            return False
        parser = parser.add_character(ch)
    return True


@dataclass
class _StringEnd:
    """What may follow one string's closing quote, learnt while the string is written."""

    is_key: bool | None = None  # an object's key (the key chooses the value's schema)
    rest_ok: dict[str, bool] = field(default_factory=dict)  # text after the quote -> valid
    unlimited: list[int] | None = None  # the tokens allowed wherever no length limit binds


class _QuotedTokens:
    """The vocabulary's tokens that end a free-text string inside themselves: plain text, the
    closing quote, then more of the document (``.","``). Tokens that start with the quote are the
    enforcer's own business (it explores them); so are those whose only quote is their last
    character."""

    def __init__(self, data: Any) -> None:
        self.tokens: list[tuple[int, str, str]] = []  # (id, the text before the quote, the rest)
        for token, text, _ in data.regular_tokens:
            k = text.find('"')
            content = text[:k]
            if 0 < k < len(text) - 1 and "\\" not in content and all(ch >= " " for ch in content):
                self.tokens.append((token, content, text[k:]))
        self.longest = max((len(content) for _, content, _ in self.tokens), default=0)

    def allowed(self, parser: Any, end: _StringEnd) -> list[int]:
        """The quoted tokens ``parser`` (inside a free-text string) can take. ``end`` caches, for
        this string, whether what follows its closing quote may start with a given text: that does
        not depend on the string's content unless the string is a key, so keys are checked token
        by token, content included."""
        key = parser.shortcut_key()
        if not self.tokens or not (isinstance(key, tuple) and key[0] == "json_freetext"):
            return []
        _, cur_len, min_len, max_len = key
        no_limit_binds = max_len - cur_len >= self.longest
        if end.unlimited is not None and no_limit_binds:
            return end.unlimited  # computed earlier in this string, when the same held (the string only grows)
        fast = cur_len >= min_len and '"' in parser.get_allowed_characters()
        if fast and end.is_key is None:
            end.is_key = ":" in parser.add_character('"').get_allowed_characters()
        fast = fast and not end.is_key
        if fast and no_limit_binds:  # one list for the rest of the string
            end.unlimited = [token for token, _, rest in self.tokens if self._rest_ok(parser, end, rest)]
            return end.unlimited
        out = []
        for token, content, rest in self.tokens:
            if not min_len <= cur_len + len(content) <= max_len:
                continue
            if fast:
                ok = self._rest_ok(parser, end, rest)
            else:
                ok = _accepts(parser, content + rest)
            if ok:
                out.append(token)
        return out

    @staticmethod
    def _rest_ok(parser: Any, end: _StringEnd, rest: str) -> bool:
        if rest not in end.rest_ok:
            end.rest_ok[rest] = _accepts(parser, rest)
        return end.rest_ok[rest]


@dataclass(frozen=True)
class _VocabIndex:
    """What the decoder looks up in a vocabulary at every step, built once per tokenizer data."""

    spaced: frozenset[int]  # tokens that start with whitespace
    quoted: _QuotedTokens


_INDEX: weakref.WeakKeyDictionary[Any, _VocabIndex] = weakref.WeakKeyDictionary()


def _vocab_index(data: Any) -> _VocabIndex:
    if data not in _INDEX:
        spaced = frozenset(i for i, text, _ in data.regular_tokens if text[:1].isspace())
        _INDEX[data] = _VocabIndex(spaced, _QuotedTokens(data))
    return _INDEX[data]


def prefix_allowed_tokens_fn(data: Any, schema: dict[str, Any]) -> Any:
    """``generate(prefix_allowed_tokens_fn=...)``: the tokens that keep the reply a prefix of a
    JSON document valid under ``schema`` (the ids of the first call are the prompt; only what
    follows is parsed). Outside strings, tokens that start with whitespace are not offered: JSON
    never needs them, and a small model left free to emit them can spend its whole token budget
    on newlines (the enforcer's own whitespace limit did not hold here). Inside a free-text
    string, tokens that close it and go on validly are offered too (see the module's note)."""
    lmfe, te = _lmfe()
    enforcer = te.TokenEnforcer(data, lmfe.JsonSchemaParser(schema))
    index = _vocab_index(data)
    spaced, quoted = index.spaced, index.quoted
    prompt_len: list[int] = []
    ends: dict[str, _StringEnd] = {}  # by the reply up to the string's opening quote

    def allowed(batch_id: int, ids: Any) -> list[int]:
        seq = ids.tolist()
        if not prompt_len:
            prompt_len.append(len(seq))
        out = enforcer.get_allowed_tokens(seq).allowed_tokens  # the enforcer's cached list: never mutated
        reply = data.decoder(seq[prompt_len[0]:])
        start = _open_string_start(reply)
        if start is None:
            kept = [t for t in out if t not in spaced]
            return kept or list(out)
        state = enforcer.prefix_states.get(tuple(seq))
        extra = quoted.allowed(state.parser, ends.setdefault(reply[: start + 1], _StringEnd())) if state else []
        # Never among the enforcer's own: their first quote is unescaped and neither their first nor
        # their last character, which its free-text tokens never have.
        return out + extra if extra else out

    return allowed
