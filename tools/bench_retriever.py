#!/usr/bin/env python
"""Benchmark the knowledge retriever: quality on the labelled query set and latency.

Quality: recall@1, recall@3 (share of a query's relevant entries found in the top k, averaged over
queries) and MRR (reciprocal rank of the first relevant entry), for the whole set and for its two
halves (``dev``: looked at while adjusting the tokeniser; ``heldout``: only ever scored).
Latency: cold setup (load the knowledge, build the index, write the cache), warm setup (load the
index from the cache) and per-query median / p95 after a warm-up pass.

Usage::

    python tools/bench_retriever.py                 # BM25, plus dense and hybrid when the extra is installed
    python tools/bench_retriever.py --no-dense      # BM25 only
    python tools/bench_retriever.py --ablate-synonyms   # also BM25 without the synonym expansion map
    python tools/bench_retriever.py --show-misses   # list queries whose relevant entries miss the top 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from echo_agent.errors import MissingExtraError  # noqa: E402
from echo_agent.evidence import _text  # noqa: E402
from echo_agent.evidence.knowledge import DenseRetriever, KnowledgeBase, KnowledgeRetriever  # noqa: E402

DEFAULT_QUERIES = REPO / "tests" / "data" / "retrieval_queries.yaml"


def load_queries(path: Path) -> list[dict]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return list(data["queries"])


def score(retriever, queries: list[dict], k: int = 3) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Quality metrics per split ('all', 'dev', 'heldout') and the misses at ``k``."""
    rows: dict[str, list[tuple[float, float, float]]] = {"all": [], "dev": [], "heldout": []}
    misses = []
    for q in queries:
        res = retriever.retrieve(q["query"], organ=q.get("organ"), k=10)
        ranked = [s.id for s in res.snippets]
        rel = set(q["relevant"])
        r1 = len(rel & set(ranked[:1])) / min(len(rel), 1)
        r3 = len(rel & set(ranked[:k])) / min(len(rel), k)
        rr = next((1.0 / (i + 1) for i, d in enumerate(ranked) if d in rel), 0.0)
        for split in ("all", q.get("split", "dev")):
            rows[split].append((r1, r3, rr))
        if not rel & set(ranked[:k]):
            misses.append(
                f"  {q['query']!r} (organ={q.get('organ')}): expected {sorted(rel)}, got {ranked[:k]}"
            )
    out = {}
    for split, vals in rows.items():
        if vals:
            out[split] = {
                "n": len(vals),
                "recall@1": statistics.fmean(v[0] for v in vals),
                "recall@3": statistics.fmean(v[1] for v in vals),
                "mrr": statistics.fmean(v[2] for v in vals),
            }
    return out, misses


def latency(retriever, queries: list[dict], repeat: int) -> tuple[float, float]:
    """Median and p95 of per-query wall time in ms (after one warm-up pass)."""
    for q in queries:
        retriever.retrieve(q["query"], organ=q.get("organ"), k=3)
    times = []
    for _ in range(repeat):
        for q in queries:
            t0 = time.perf_counter()
            retriever.retrieve(q["query"], organ=q.get("organ"), k=3)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]


def run_variant(
    name: str, make: Callable[[Path], object], queries: list[dict], repeat: int, show_misses: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="echo-bench-") as tmp:
        cache = Path(tmp)
        r_cold = make(cache)
        t0 = time.perf_counter()
        r_cold.warm_up()
        cold = time.perf_counter() - t0
        r_warm = make(cache)
        t0 = time.perf_counter()
        r_warm.warm_up()
        warm = time.perf_counter() - t0
        metrics, misses = score(r_warm, queries)
        med, p95 = latency(r_warm, queries, repeat)
    print(f"\n## {name}  ({r_warm.name}; index: cold {r_cold.index_source}, warm {r_warm.index_source})")
    print("| split | n | recall@1 | recall@3 | MRR |")
    print("|---|---|---|---|---|")
    for split in ("all", "dev", "heldout"):
        m = metrics.get(split)
        if m:
            print(f"| {split} | {m['n']} | {m['recall@1']:.3f} | {m['recall@3']:.3f} | {m['mrr']:.3f} |")
    print(
        f"setup: cold {cold * 1e3:.0f} ms (build + write cache), warm {warm * 1e3:.0f} ms (load from cache)"
    )
    print(f"query latency (k=3, {repeat}x{len(queries)} queries): median {med:.3f} ms, p95 {p95:.3f} ms")
    if show_misses and misses:
        print("misses at k=3:")
        print("\n".join(misses))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=Path, default=DEFAULT_QUERIES)
    ap.add_argument("--repeat", type=int, default=20, help="timed passes over the query set")
    ap.add_argument("--no-dense", action="store_true", help="skip dense and hybrid retrieval")
    ap.add_argument("--ablate-synonyms", action="store_true", help="also run BM25 without the synonym map")
    ap.add_argument("--show-misses", action="store_true")
    args = ap.parse_args(argv)

    queries = load_queries(args.queries)
    kb = KnowledgeBase.load()
    print(
        f"# knowledge retriever benchmark: {len(kb)} entries ({', '.join(kb.organs)}), {len(queries)} queries"
    )
    print(
        f"python {platform.python_version()} on {platform.machine()}, {platform.processor() or platform.system()}"
    )

    run_variant("BM25", lambda c: KnowledgeRetriever(kb, cache_dir=c), queries, args.repeat, args.show_misses)
    if args.ablate_synonyms:
        saved = _text._EXPANSION_RES
        _text._EXPANSION_RES = ()
        _text.stem.cache_clear()
        try:
            run_variant(
                "BM25 without synonym expansion (ablation)",
                lambda c: KnowledgeRetriever(kb, cache_dir=c),
                queries,
                args.repeat,
                args.show_misses,
            )
        finally:
            _text._EXPANSION_RES = saved
    if not args.no_dense:
        try:
            run_variant(
                "Dense (all-MiniLM-L6-v2)",
                lambda c: DenseRetriever(kb, cache_dir=c),
                queries,
                max(1, args.repeat // 10),
                args.show_misses,
            )
            run_variant(
                "Hybrid (BM25 + dense, RRF)",
                lambda c: KnowledgeRetriever(kb, cache_dir=c, hybrid=True),
                queries,
                max(1, args.repeat // 10),
                args.show_misses,
            )
        except MissingExtraError as exc:
            print(f"\n(dense and hybrid skipped: {exc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
