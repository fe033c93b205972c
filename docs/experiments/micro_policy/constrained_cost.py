"""Cost of the constrained decoder's extra tokens (a token that closes a free-text string and goes on)
on a synthetic vocabulary of Qwen's size: 150,000 tokens, about 2 % of them ending a string inside
themselves (``abc",`` and the like).

    python docs/experiments/micro_policy/constrained_cost.py

Prints, per free-text step of one string value, the median milliseconds of the enforcer alone
(``TokenEnforcer.get_allowed_tokens``), of the function as it was before the extra tokens (the
enforcer's list copied, the reply decoded and checked for an open string) and of
``prefix_allowed_tokens_fn`` now, each on a fresh enforcer, after one warm-up pass.
"""

from __future__ import annotations

import random
import statistics
import string
import time
from collections.abc import Callable
from typing import Any

from lmformatenforcer import JsonSchemaParser
from lmformatenforcer import tokenenforcer as te

from echo_agent.reasoners._constrained import _open_string_start, prefix_allowed_tokens_fn

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
          "properties": {"a": {"type": "string"}, "b": {"type": "boolean"}}}
REPLY = '{"a":"abcdefghijklmnop'


class Ids(list):
    def tolist(self) -> list[int]:
        return list(self)


def vocabulary(size: int = 150_000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    toks = list('{}[]:,"0123456789 .') + list(string.ascii_lowercase)
    seen = set(toks)
    while len(toks) < size:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
        if rng.random() < 0.02:
            w += rng.choice(['",', '","', '"}', '"]', '":', '"},{"', '"]}'])
        if w not in seen:
            seen.add(w)
            toks.append(w)
    return toks


def main() -> None:
    toks = vocabulary()
    eos = len(toks)
    vocab = [*toks, "<eos>"]
    data = te.TokenEnforcerTokenizerData([(i, t, False) for i, t in enumerate(toks)],
                                         lambda ids: "".join(vocab[i] for i in ids if i != eos), eos, False, len(vocab))
    quoted = sum(1 for t in toks if 0 < t.find('"') < len(t) - 1)
    start = [vocab.index("0")]
    steps = [vocab.index(ch) for ch in REPLY]
    first_free = len('{"a":"')

    def timed(calls: dict[str, Callable[[list[int]], Any]]) -> dict[str, list[float]]:
        """Milliseconds per free-text step of each call, the calls interleaved step by step (each
        has its own enforcer), so that neither gains from running first."""
        ids = list(start)
        for call in calls.values():
            call(ids)
        out: dict[str, list[float]] = {name: [] for name in calls}
        for i, t in enumerate(steps):
            ids.append(t)
            for name, call in calls.items():
                t0 = time.perf_counter()
                call(ids)
                if i + 1 >= first_free:
                    out[name].append((time.perf_counter() - t0) * 1000)
        return out

    for _round in ("warm-up", "measured"):  # the last round's numbers are printed
        enforcer = te.TokenEnforcer(data, JsonSchemaParser(SCHEMA))
        before_enforcer = te.TokenEnforcer(data, JsonSchemaParser(SCHEMA))

        def before(ids: list[int], e: te.TokenEnforcer = before_enforcer) -> list[int]:
            out = list(e.get_allowed_tokens(ids).allowed_tokens)
            _open_string_start(data.decoder(ids[1:]))
            return out

        fn = prefix_allowed_tokens_fn(data, SCHEMA)
        ms = timed({"enforcer alone": lambda ids, e=enforcer: e.get_allowed_tokens(ids),
                    "before the extra tokens": before,
                    "prefix_allowed_tokens_fn now": lambda ids, f=fn: f(0, Ids(ids))})
    print(f"vocabulary {len(toks)} tokens, {quoted} end a string inside themselves; "
          f"{len(ms['enforcer alone'])} free-text steps")
    for name, values in ms.items():
        print(f"{name}: median {statistics.median(values):.2f} ms per step")


if __name__ == "__main__":
    main()
