"""A BM25 index over knowledge entries (bm25s), cached on disk by content hash."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._text import TOKENIZER_VERSION, tokenize

log = logging.getLogger(__name__)

#: BM25 parameters (the common Lucene defaults); part of the cache key.
BM25_PARAMS = {"k1": 1.5, "b": 0.75, "method": "lucene"}
_META = "echo_meta.json"


class BM25Index:
    """BM25 scores of every document for a tokenised query.

    ``doc_ids`` fixes the row order; :meth:`scores` returns one float per document, in that order.
    """

    def __init__(self, model: object, doc_ids: Sequence[str]) -> None:
        self._model = model
        self.doc_ids = tuple(doc_ids)
        self._vocab: dict[str, int] = dict(model.vocab_dict)  # type: ignore[attr-defined]

    @classmethod
    def build(cls, doc_ids: Sequence[str], texts: Sequence[str]) -> BM25Index:
        import bm25s

        vocab: dict[str, int] = {}
        corpus_ids: list[list[int]] = []
        for text in texts:
            toks = tokenize(text)
            corpus_ids.append([vocab.setdefault(t, len(vocab)) for t in toks])
        model = bm25s.BM25(**BM25_PARAMS)
        model.index((corpus_ids, vocab), show_progress=False)
        return cls(model, doc_ids)

    def query_ids(self, query: str) -> list[int]:
        """Vocabulary ids of the query's terms (unknown terms dropped, duplicates removed)."""
        seen: dict[int, None] = {}
        for t in tokenize(query):
            i = self._vocab.get(t)
            if i is not None:
                seen.setdefault(i, None)
        return list(seen)

    def scores(self, query: str) -> np.ndarray:
        ids = self.query_ids(query)
        if not ids:
            return np.zeros(len(self.doc_ids), dtype=np.float32)
        return np.asarray(self._model.get_scores_from_ids(ids), dtype=np.float32)  # type: ignore[attr-defined]

    # -- disk cache ----------------------------------------------------------------------------
    def save(self, directory: Path, fingerprint: str) -> None:
        """Write the index atomically (temporary folder, then rename) under ``directory``."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
        try:
            self._model.save(str(tmp), show_progress=False)  # type: ignore[attr-defined]
            meta = {"fingerprint": fingerprint, "doc_ids": list(self.doc_ids)}
            (tmp / _META).write_text(json.dumps(meta), encoding="utf-8")
            if directory.exists():
                shutil.rmtree(directory, ignore_errors=True)
            os.replace(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path, fingerprint: str, doc_ids: Sequence[str]) -> BM25Index:
        """Load a cached index; raises ``ValueError`` when it is stale or inconsistent."""
        import bm25s

        meta = json.loads((directory / _META).read_text(encoding="utf-8"))
        if meta.get("fingerprint") != fingerprint or meta.get("doc_ids") != list(doc_ids):
            raise ValueError("cached index was built from different knowledge")
        model = bm25s.BM25.load(str(directory), show_progress=False, verbosity=0)
        index = cls(model, doc_ids)
        n_docs = int(model.scores["num_docs"])
        if n_docs != len(doc_ids) or not index._vocab:
            raise ValueError(f"cached index has {n_docs} documents, expected {len(doc_ids)}")
        # bm25s appends an empty token "" to the vocabulary without a matrix column; skip it.
        max_id = max((i for t, i in index._vocab.items() if t), default=-1)
        if max_id >= len(model.scores["indptr"]) - 1:
            raise ValueError("cached index vocabulary and score matrix disagree")
        return index


def load_or_build(
    cache_root: Path | None, fingerprint: str, doc_ids: Sequence[str], texts: Sequence[str]
) -> tuple[BM25Index, str]:
    """Return ``(index, how)`` where ``how`` is ``'cache'``, ``'built'`` or ``'built-nocache'``.

    A missing, stale or corrupt cache is rebuilt; a cache folder that cannot be written only costs
    a warning, never an error.
    """
    if cache_root is None:
        return BM25Index.build(doc_ids, texts), "built-nocache"
    directory = cache_root / f"bm25-{fingerprint[:24]}"
    if directory.exists():
        try:
            return BM25Index.load(directory, fingerprint, doc_ids), "cache"
        except Exception as exc:  # corrupt or partial cache: rebuild below
            log.warning("knowledge index cache at %s is unusable (%s); rebuilding it", directory, exc)
    index = BM25Index.build(doc_ids, texts)
    try:
        index.save(directory, fingerprint)
    except OSError as exc:
        log.warning(
            "could not write the knowledge index cache to %s (%s); continuing without it", directory, exc
        )
        return index, "built-nocache"
    return index, "built"


def cache_key_parts() -> dict[str, str]:
    """Everything besides the knowledge content that changes the index."""
    import bm25s

    return {
        "tokenizer": TOKENIZER_VERSION,
        "bm25": json.dumps(BM25_PARAMS, sort_keys=True),
        "bm25s": getattr(bm25s, "__version__", "?"),
    }
