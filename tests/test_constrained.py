"""JSON-schema constrained decoding at the token level (``echo_agent.reasoners._constrained``),
with a character vocabulary plus a few merged tokens that end a string inside themselves."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lmformatenforcer")

from echo_agent.reasoners._constrained import (  # noqa: E402
    _open_string_start,
    prefix_allowed_tokens_fn,
    tokenizer_data,
)

CHARS = list('{}[]:,"0123456789abcdefghijklmnopqrstuvwxyz .;-_')
MERGES = ['.","', '.",', '."}', '."]', 'ab","', 'k":', 'k":"', '"}', '","']


class CharTokenizer:
    """One token per character, the merges above, and an end-of-sequence token."""

    def __init__(self) -> None:
        self.vocab = CHARS + MERGES + ["<eos>"]
        self.eos_token_id = len(self.vocab) - 1
        self.all_special_ids = [self.eos_token_id]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.index(ch) for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i != self.eos_token_id)


class Ids(list):
    def tolist(self) -> list[int]:
        return list(self)


TOK = CharTokenizer()
PROMPT = TOK.encode("0 0")  # the first call's ids are the prompt


@pytest.fixture(scope="module")
def data():
    return tokenizer_data(TOK)


def _offered(data, schema, reply: str) -> set[str]:
    """The texts of the tokens offered after ``reply``, walking the reply one character at a time
    (as the enforcer needs to see every step)."""
    fn = prefix_allowed_tokens_fn(data, schema)
    ids = list(PROMPT)
    fn(0, Ids(ids))
    for ch in reply:
        ids.append(TOK.vocab.index(ch))
        allowed = fn(0, Ids(ids))
    return {TOK.vocab[t] for t in allowed}


OBJ = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "string"}, "b": {"type": "boolean"}}}


def test_a_token_that_closes_a_string_and_goes_on_is_offered_where_the_document_allows_it(data):
    offered = _offered(data, OBJ, '{"a":"x')
    assert {'.","', '.",', 'ab","'} <= offered  # a comma, then the next key's quote: valid
    assert '."}' not in offered  # "b" is required: the object cannot close yet
    assert '."]' not in offered  # no list is open
    later = _offered(data, OBJ, '{"b":true,"a":"x')
    assert '."}' in later  # every required key written: now the object may close
    assert "x" in later and "." in later  # the enforcer's own free-text tokens are still there


def test_the_string_length_limits_hold_for_merged_tokens(data):
    schema = {**OBJ, "properties": {"a": {"type": "string", "maxLength": 2}, "b": {"type": "boolean"}}}
    offered = _offered(data, schema, '{"a":"x')
    assert '.",' in offered  # 1 + 1 characters: within maxLength 2
    assert 'ab","' not in offered  # 1 + 2 characters: over it
    schema["properties"]["a"] = {"type": "string", "minLength": 3}
    offered = _offered(data, schema, '{"a":"x')
    assert 'ab","' in offered and '.",' not in offered  # 3 characters reach minLength 3; 2 do not


def test_enum_strings_and_keys_are_checked_with_their_content(data):
    enum = {"type": "object", "additionalProperties": False, "required": ["label"],
            "properties": {"label": {"type": "string", "enum": ["ab", "ok"]}}}
    assert '.",' not in _offered(data, enum, '{"label":"')  # "." starts no allowed label
    free_keys = {"type": "object", "additionalProperties": {"type": "integer"}}
    offered = _offered(data, free_keys, '{"')
    assert 'k":' in offered  # a key "k", then its colon
    assert 'k":"' not in offered  # the value of any key is an integer, never a string


def test_greedy_decoding_that_prefers_merges_writes_the_document_it_means(data):
    """A 'model' that always takes the longest offered token matching the text it means finishes
    the document in fewer steps with the merges, and the result parses under the schema."""
    target = '{"a":"ab.","b":true}'
    fn = prefix_allowed_tokens_fn(data, OBJ)
    ids, steps = list(PROMPT), 0
    allowed = fn(0, Ids(ids))
    while TOK.decode(ids[len(PROMPT):]) != target:
        rest = target[len(TOK.decode(ids[len(PROMPT):])):]
        fits = [t for t in allowed if t != TOK.eos_token_id and rest.startswith(TOK.vocab[t])]
        assert fits, f"nothing offered for {rest!r}"
        ids.append(max(fits, key=lambda t: len(TOK.vocab[t])))
        allowed, steps = fn(0, Ids(ids)), steps + 1
    assert TOK.eos_token_id in allowed
    assert json.loads(TOK.decode(ids[len(PROMPT):])) == {"a": "ab.", "b": True}
    used = [TOK.vocab[t] for t in ids[len(PROMPT):]]
    assert '.","' in used and steps < len(target)


def test_open_string_start_tracks_quotes_and_escapes():
    assert _open_string_start('{"a":') is None
    assert _open_string_start('{"a":"x') == 5
    assert _open_string_start('{"a":"say \\"hi') == 5  # an escaped quote does not close the string
    assert _open_string_start('{"a":"x\\\\"') is None  # an escaped backslash, then the closing quote
