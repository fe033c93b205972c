"""The curated knowledge base and its retrievers.

The knowledge base is data: YAML files (``echo_agent/assets/knowledge/<organ>.yaml`` for the built-in
organs, any file an :class:`~echo_agent.organs.OrganSpec` lists in ``knowledge_files`` for plug-ins),
each entry a :class:`KnowledgeEntry` with its citations. The default retriever is BM25 (bm25s) over
lower-cased, synonym-expanded, lightly stemmed text; its index is built on first use and cached on
disk under a hash of the knowledge content. Dense and hybrid retrieval with the packaged
all-MiniLM-L6-v2 model are optional (the ``dense`` extra).

Example::

    from echo_agent.evidence.knowledge import get_retriever
    result = get_retriever().retrieve("taller-than-wide hypoechoic mass", organ="breast", k=3)
    for s in result.snippets:
        print(s.id, round(s.score, 2), s.title, "--", s.source)
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import EchoInputError, UnknownOrganError
from ..schemas import KnowledgeResult, KnowledgeSnippet

#: Version of the knowledge-file format (``schema_version`` in every file).
SCHEMA_VERSION = 1
#: Version of the retrieval pipeline; part of each retriever's ``name``.
RETRIEVER_VERSION = "1"
#: Largest ``k`` a caller may ask for.
MAX_K = 50
#: Longest query accepted, in characters.
MAX_QUERY_CHARS = 2000
#: Reciprocal-rank-fusion constant (the usual 60 from Cormack et al., SIGIR 2009).
RRF_K = 60

_ID_PATTERN = r"^[a-z][a-z0-9_]*/[a-z0-9][a-z0-9-]*$"
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class KnowledgeBaseError(EchoInputError):
    """A knowledge file is missing, unreadable or has an invalid entry; the message names file and entry."""


# -- data model -------------------------------------------------------------------------------------
class KnowledgeEntry(BaseModel):
    """One curated passage with its metadata and citations.

    ``id`` is ``'<organ>/<slug>'``; ``passage`` is our own summary of the cited public sources;
    ``suspicion`` says whether the finding, when present, raises or lowers suspicion of malignancy
    (or of disease, for non-oncologic organs).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_ID_PATTERN, description="'<organ>/<slug>', e.g. 'breast/birads-4a'.")
    organ: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str = Field(min_length=3, max_length=200)
    finding: str | None = Field(None, description="What kind of finding it describes, e.g. 'mass margin'.")
    category: str | None = Field(
        None, description="Category it belongs to where relevant, e.g. BI-RADS '4A'."
    )
    suspicion: Literal["raises", "lowers", "neutral", "varies"] | None = None
    tags: tuple[str, ...] = ()
    passage: str = Field(min_length=40, max_length=2000, description="The exact text returned to callers.")
    sources: tuple[str, ...] = Field(min_length=1, description="Citations of the public sources summarised.")

    @field_validator("title", "passage")
    @classmethod
    def _squash(cls, v: str) -> str:
        return " ".join(v.split())

    @field_validator("sources")
    @classmethod
    def _sources_nonempty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(" ".join(s.split()) for s in v)
        if any(len(s) < 10 for s in out):
            raise ValueError("every source must be a full citation (at least 10 characters)")
        return out

    @model_validator(mode="after")
    def _id_matches_organ(self) -> KnowledgeEntry:
        if not self.id.startswith(self.organ + "/"):
            raise ValueError(f"id {self.id!r} must start with its organ, {self.organ + '/'!r}")
        return self

    @property
    def source(self) -> str:
        """All citations joined into one string."""
        return "; ".join(self.sources)

    def index_text(self) -> str:
        """The text the retrievers index: organ, title (twice, as a light field boost), metadata and passage."""
        parts = [
            self.organ,
            self.title,
            self.title,
            self.finding or "",
            self.category or "",
            " ".join(self.tags),
        ]
        return "\n".join(p for p in parts if p) + "\n" + self.passage

    def to_snippet(self, score: float = 0.0) -> KnowledgeSnippet:
        return KnowledgeSnippet(
            id=self.id,
            organ=self.organ,
            title=self.title,
            passage=self.passage,
            source=self.source,
            finding=self.finding,
            category=self.category,
            score=float(score),
        )


class KnowledgeFile(BaseModel):
    """The layout of one knowledge YAML file (``schema.json`` is generated from this model)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    organ: str | None = Field(None, description="When set, every entry must belong to this organ.")
    entries: list[KnowledgeEntry] = Field(min_length=1)


def knowledge_json_schema() -> dict[str, Any]:
    """JSON schema of a knowledge file (what ``assets/knowledge/schema.json`` holds)."""
    schema = KnowledgeFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://github.com/echo-agent/echo-agent/echo_agent/assets/knowledge/schema.json"
    return schema


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(entry)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def load_knowledge_file(path: str | Path) -> list[KnowledgeEntry]:
    """Read and validate one knowledge file; every problem raises :class:`KnowledgeBaseError`."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)  # noqa: S506 - a safe loader
    except FileNotFoundError:
        raise KnowledgeBaseError(
            f"knowledge file {path} does not exist; fix the path or the organ's knowledge_files"
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise KnowledgeBaseError(
            f"knowledge file {path} cannot be read as YAML ({exc}); fix its syntax"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise KnowledgeBaseError(
            f"knowledge file {path} must be a mapping with an 'entries' list (see assets/knowledge/schema.json)"
        )
    entries: list[KnowledgeEntry] = []
    for i, raw in enumerate(data["entries"]):
        eid = raw.get("id", f"#{i}") if isinstance(raw, dict) else f"#{i}"
        try:
            entries.append(KnowledgeEntry.model_validate(raw))
        except ValidationError as exc:
            raise KnowledgeBaseError(
                f"knowledge file {path}, entry {eid!r} (#{i}) is invalid: {_format_validation(exc)}"
            ) from None
    header = {k: v for k, v in data.items() if k != "entries"}
    try:
        KnowledgeFile.model_validate({**header, "entries": [e.model_dump() for e in entries]})
    except ValidationError as exc:
        raise KnowledgeBaseError(f"knowledge file {path} is invalid: {_format_validation(exc)}") from None
    organ = header.get("organ")
    for e in entries:
        if organ is not None and e.organ != organ:
            raise KnowledgeBaseError(
                f"knowledge file {path}, entry {e.id!r} has organ {e.organ!r} but the file is for {organ!r}"
            )
    return entries


# -- knowledge base --------------------------------------------------------------------------------
class KnowledgeBase:
    """An immutable, validated collection of :class:`KnowledgeEntry` with unique ids."""

    def __init__(self, entries: Iterable[KnowledgeEntry], *, origins: Sequence[str] | None = None) -> None:
        self._entries: tuple[KnowledgeEntry, ...] = tuple(entries)
        origins = list(origins) if origins is not None else ["<memory>"] * len(self._entries)
        seen: dict[str, str] = {}
        for e, origin in zip(self._entries, origins):
            if e.id in seen:
                raise KnowledgeBaseError(
                    f"knowledge entry id {e.id!r} appears twice ({seen[e.id]} and {origin}); ids must be unique"
                )
            seen[e.id] = origin
        self._by_id = {e.id: e for e in self._entries}
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, files: Sequence[str | Path] | None = None) -> KnowledgeBase:
        """Load knowledge files; by default every registered organ's ``knowledge_files``."""
        if files is None:
            from ..organs import list_organs

            paths = [p for spec in list_organs() for p in spec.resolve_knowledge_files()]
        else:
            paths = [Path(f) for f in files]
        entries: list[KnowledgeEntry] = []
        origins: list[str] = []
        for p in dict.fromkeys(paths):  # a file shared by two organs is read once
            got = load_knowledge_file(p)
            entries.extend(got)
            origins.extend([str(p)] * len(got))
        return cls(entries, origins=origins)

    # -- access ----------------------------------------------------------------------------------
    @property
    def entries(self) -> tuple[KnowledgeEntry, ...]:
        return self._entries

    @property
    def organs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.organ for e in self._entries))

    def get(self, entry_id: str) -> KnowledgeEntry:
        try:
            return self._by_id[entry_id]
        except KeyError:
            raise KeyError(f"no knowledge entry {entry_id!r}") from None

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._by_id

    def __iter__(self) -> Iterator[KnowledgeEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the entries' content (the cache key of every index built from them)."""
        if self._fingerprint is None:
            payload = json.dumps([e.model_dump(mode="json") for e in self._entries], sort_keys=True)
            self._fingerprint = hashlib.sha256(payload.encode("utf-8")).hexdigest()
        return self._fingerprint


def default_cache_dir() -> Path:
    """``$ECHO_AGENT_CACHE`` or ``~/.cache/echo-agent``, with a ``knowledge`` sub-folder."""
    root = os.environ.get("ECHO_AGENT_CACHE") or str(Path.home() / ".cache" / "echo-agent")
    return Path(root).expanduser() / "knowledge"


# -- retrievers ------------------------------------------------------------------------------------
class _BaseRetriever:
    """Argument checks, organ filter and top-k selection shared by the retrievers."""

    name = "base"
    #: Whether only documents with a positive score may be returned (true for lexical scores).
    _positive_only = True

    def __init__(self, knowledge_base: KnowledgeBase | None = None, *, cache_dir: Path | None = None) -> None:
        self._kb = knowledge_base
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._lock = threading.Lock()
        self._ready = False
        self._organ_masks: dict[str, np.ndarray] = {}
        #: How the index was obtained on first use: 'cache', 'built' or 'built-nocache'.
        self.index_source: str | None = None
        #: Seconds the first-use setup took (load the knowledge, load or build the index).
        self.setup_seconds: float | None = None

    @property
    def knowledge_base(self) -> KnowledgeBase:
        if self._kb is None:
            self._kb = KnowledgeBase.load()
        return self._kb

    @property
    def cache_root(self) -> Path:
        return self._cache_dir if self._cache_dir is not None else default_cache_dir()

    def _fingerprint(self) -> str:
        from ._bm25 import cache_key_parts

        parts = {"kb": self.knowledge_base.fingerprint, **cache_key_parts(), "retriever": RETRIEVER_VERSION}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()

    def warm_up(self) -> None:
        """Load the knowledge and build (or load) the index now instead of on the first query."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            t0 = time.perf_counter()
            kb = self.knowledge_base
            organs = np.array([e.organ for e in kb.entries])
            self._organ_masks = {o: organs == o for o in kb.organs}
            self._setup()
            self.setup_seconds = time.perf_counter() - t0
            self._ready = True

    def _setup(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _scores(self, query: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public --------------------------------------------------------------------------------
    def retrieve(
        self, query: str, *, organ: str | None = None, k: int = 3, evidence_id: str = "kb"
    ) -> KnowledgeResult:
        """Return the ``k`` best-matching knowledge snippets for ``query``, best first.

        ``organ`` restricts the search to one organ's entries (``k`` results still come back when
        the organ has that many matching entries). Raises :class:`~echo_agent.errors.EchoInputError`
        for an empty query or a ``k`` outside ``1..MAX_K`` and
        :class:`~echo_agent.errors.UnknownOrganError` for an organ that is neither registered nor in
        the knowledge base.
        """
        t0 = time.perf_counter()
        query, organ, k = self._check(query, organ, k)
        self.warm_up()
        snippets: list[KnowledgeSnippet] = []
        mask = None
        if organ is not None:
            mask = self._organ_masks.get(organ)
            if mask is None:  # a registered organ without knowledge: nothing to return
                return KnowledgeResult(
                    id=evidence_id,
                    query=query,
                    organ=organ,
                    snippets=[],
                    elapsed_ms=(time.perf_counter() - t0) * 1e3,
                )
        scores = self._scores(query)
        candidates = scores.astype(np.float64, copy=True)
        if mask is not None:
            candidates[~mask] = -np.inf
        if self._positive_only:
            candidates[candidates <= 0] = -np.inf
        n_ok = int(np.isfinite(candidates).sum())
        if n_ok:
            kk = min(k, n_ok)
            top = (
                np.argpartition(-candidates, kk - 1)[:kk]
                if kk < len(candidates)
                else np.arange(len(candidates))
            )
            # Sort by score, ties broken by knowledge-base order so results are deterministic.
            top = sorted((i for i in top if np.isfinite(candidates[i])), key=lambda i: (-candidates[i], i))[
                :kk
            ]
            entries = self.knowledge_base.entries
            snippets = [entries[i].to_snippet(float(scores[i])) for i in top]
        return KnowledgeResult(
            id=evidence_id,
            query=query,
            organ=organ,
            snippets=snippets,
            elapsed_ms=(time.perf_counter() - t0) * 1e3,
        )

    def _check(self, query: str, organ: str | None, k: int) -> tuple[str, str | None, int]:
        if not isinstance(query, str) or not query.strip():
            raise EchoInputError("the knowledge query is empty; pass a few words, e.g. 'spiculated margin'")
        query = " ".join(query.split())
        if len(query) > MAX_QUERY_CHARS:
            raise EchoInputError(
                f"the knowledge query has {len(query)} characters; shorten it to at most {MAX_QUERY_CHARS}"
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
            raise EchoInputError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        if organ is not None:
            organ = str(organ).strip().lower() or None  # "" from a model's tool call means "any organ"
        if organ is not None:
            if organ not in self.knowledge_base.organs:
                from ..organs import get_organ

                try:
                    get_organ(organ)
                except UnknownOrganError:
                    raise UnknownOrganError(
                        f"organ {organ!r} has no knowledge and is not registered; use one of "
                        f"{sorted(self.knowledge_base.organs)} or None for all organs"
                    ) from None
        return query, organ, int(k)


class KnowledgeRetriever(_BaseRetriever):
    """BM25 retrieval over the knowledge base (optionally fused with dense retrieval).

    The index is built lazily on the first query (or :meth:`warm_up`) and cached under
    ``cache_dir`` (default :func:`default_cache_dir`) keyed by a hash of the knowledge content and
    the tokeniser; a changed knowledge base or a corrupt cache is rebuilt. With ``hybrid=True`` the
    BM25 ranking is fused with :class:`DenseRetriever`'s by reciprocal-rank fusion; that needs the
    ``dense`` extra and raises :class:`~echo_agent.errors.MissingExtraError` without it.
    """

    name = f"bm25/{RETRIEVER_VERSION}"

    def __init__(
        self,
        knowledge_base: KnowledgeBase | None = None,
        *,
        cache_dir: Path | None = None,
        hybrid: bool = False,
    ) -> None:
        super().__init__(knowledge_base, cache_dir=cache_dir)
        self.hybrid = bool(hybrid)
        self._index: Any = None
        self._dense: DenseRetriever | None = None
        if self.hybrid:
            from ._dense import MODEL_NAME, check_available

            check_available()
            self.name = f"hybrid-bm25+{MODEL_NAME}/{RETRIEVER_VERSION}"
            self._positive_only = False

    def _setup(self) -> None:
        from ._bm25 import load_or_build

        kb = self.knowledge_base
        self._index, self.index_source = load_or_build(
            self.cache_root,
            self._fingerprint(),
            [e.id for e in kb.entries],
            [e.index_text() for e in kb.entries],
        )
        if self.hybrid:
            self._dense = DenseRetriever(kb, cache_dir=self._cache_dir)
            self._dense.warm_up()

    def bm25_scores(self, query: str) -> np.ndarray:
        """Raw BM25 score of every entry, in knowledge-base order."""
        self.warm_up()
        return self._index.scores(query)

    def _scores(self, query: str) -> np.ndarray:
        bm25 = self._index.scores(query)
        if not self.hybrid:
            return bm25
        assert self._dense is not None
        return reciprocal_rank_fusion(
            [_ranking(bm25, positive_only=True), _ranking(self._dense.dense_scores(query))], n=len(bm25)
        )


class DenseRetriever(_BaseRetriever):
    """Cosine-similarity retrieval with the packaged all-MiniLM-L6-v2 (needs the ``dense`` extra).

    Document embeddings are computed on first use and cached as ``.npy`` next to the BM25 index.
    """

    name = f"minilm/{RETRIEVER_VERSION}"
    _positive_only = False

    def __init__(self, knowledge_base: KnowledgeBase | None = None, *, cache_dir: Path | None = None) -> None:
        from ._dense import MiniLMEncoder

        super().__init__(knowledge_base, cache_dir=cache_dir)
        self._encoder = MiniLMEncoder()  # raises MissingExtraError when the extra is absent
        self._emb: np.ndarray | None = None

    def _setup(self) -> None:
        from ._dense import load_or_encode

        kb = self.knowledge_base
        fingerprint = self._fingerprint()
        cached = (self.cache_root / f"minilm-{fingerprint[:24]}.npy").exists()
        self._emb = load_or_encode(
            self._encoder, self.cache_root, fingerprint, [e.index_text() for e in kb.entries]
        )
        self.index_source = "cache" if cached else "built"
        self._encoder.load()  # queries need the model even when the documents came from the cache

    def dense_scores(self, query: str) -> np.ndarray:
        """Cosine similarity of the query with every entry, in knowledge-base order."""
        self.warm_up()
        assert self._emb is not None
        q = self._encoder.encode([query])[0]
        return self._emb @ q

    def _scores(self, query: str) -> np.ndarray:
        return self.dense_scores(query)


def _ranking(scores: np.ndarray, positive_only: bool = False) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    if positive_only:
        order = [i for i in order if scores[i] > 0]
    return order


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], n: int, k: int = RRF_K) -> np.ndarray:
    """Fuse rankings (lists of document indices, best first) into one score per document.

    >>> reciprocal_rank_fusion([[2, 0], [0, 1]], n=3, k=1).round(3).tolist()
    [0.833, 0.333, 0.5]
    """
    fused = np.zeros(n, dtype=np.float64)
    for ranking in rankings:
        for rank, i in enumerate(ranking):
            fused[i] += 1.0 / (k + rank + 1)
    return fused


_default: KnowledgeRetriever | None = None
_default_lock = threading.Lock()


def get_retriever() -> KnowledgeRetriever:
    """The process-wide BM25 retriever over all registered organs' knowledge (built lazily, cached)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = KnowledgeRetriever()
    return _default


def _reset_default_retriever() -> None:
    """Forget the process-wide retriever (after registering an organ with new knowledge; for tests)."""
    global _default
    with _default_lock:
        _default = None


__all__ = [
    "MAX_K",
    "SCHEMA_VERSION",
    "DenseRetriever",
    "KnowledgeBase",
    "KnowledgeBaseError",
    "KnowledgeEntry",
    "KnowledgeFile",
    "KnowledgeRetriever",
    "default_cache_dir",
    "get_retriever",
    "knowledge_json_schema",
    "load_knowledge_file",
    "reciprocal_rank_fusion",
]
