"""Recall@k of dense, BM25 and hybrid retrieval on the shipped corpus's questions: which mode is the default.

    python benchmarks/rag_recall.py                 # the embedded embedder (no endpoint configured)
    python benchmarks/rag_recall.py --fake          # the fake endpoint's hashed bag-of-words vectors
    EMBED_BASE_URL=... EMBED_MODEL=... python benchmarks/rag_recall.py

Indexes ``data/rag/corpus`` with the default chunking into a temporary folder,
then asks every answerable question of ``data/rag_train.jsonl`` and
``data/rag_dev.jsonl`` in each mode.  A question is a hit at k when one of the
top k passages comes from one of its ``sources`` (a document-level hit: the
passage is from a document that states the answer).  Also prints MRR@10 and
queries/s (one process, queries embedded in batches).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

KS = (1, 3, 5, 10)


def evaluate(retriever, questions: list[str], relevant: list[set[str]], modes=("dense", "bm25", "hybrid"),
             ks=KS) -> dict[str, dict]:
    """mode -> {"recall": {k: share}, "mrr": MRR@max(ks), "qps": queries/s}; ``relevant`` holds sources."""
    out = {}
    for mode in modes:
        start = time.perf_counter()
        results = retriever.search_many(questions, k=max(ks), mode=mode)
        qps = len(questions) / (time.perf_counter() - start)
        ranks = []
        for hits, wanted in zip(results, relevant):
            rank = next((i + 1 for i, p in enumerate(hits) if p.source in wanted), None)
            ranks.append(rank)
        out[mode] = {"recall": {k: sum(1 for r in ranks if r and r <= k) / len(ranks) for k in ks},
                     "mrr": sum(1 / r for r in ranks if r) / len(ranks), "qps": qps}
    return out


def print_table(title: str, results: dict[str, dict], ks=KS) -> None:
    print(title)
    head = " ".join(f"{'R@' + str(k):>6}" for k in ks)
    print(f"  {'mode':<8} {head} {'MRR@' + str(max(ks)):>7} {'q/s':>7}")
    best = max(results, key=lambda m: (results[m]["recall"][5], results[m]["mrr"]))
    for mode, r in results.items():
        cells = " ".join(f"{r['recall'][k]:>6.3f}" for k in ks)
        print(f"  {mode:<8} {cells} {r['mrr']:>7.3f} {r['qps']:>7.0f}{'  <- best R@5' if mode == best else ''}")


@contextlib.contextmanager
def embedder(fake: bool):
    """Resolved EMBED settings: the fake endpoint, or flags/env/.env, else the embedded embedder."""
    from dspy_ray.endpoints.fallback import open_endpoints
    from dspy_ray.endpoints.settings import EndpointSettings, resolve_settings

    if fake:
        from dspy_ray.testing.fake_llm import FakeLLM

        with FakeLLM() as server:
            yield EndpointSettings(base_url=server.base_url, model="fake-embed", origin="configured")
        return
    with open_endpoints(embed=resolve_settings("EMBED"), discover=False) as endpoints:
        yield endpoints.embed


def main() -> None:
    import ray

    from dspy_ray.retrieval import open_retriever
    from pipelines.chunking import ChunkSettings
    from pipelines.index import IndexBuild, IndexOptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake", action="store_true", help="the fake endpoint's bag-of-words vectors")
    parser.add_argument("--chunk-size", type=int, default=ChunkSettings().size)
    parser.add_argument("--chunk-overlap", type=int, default=ChunkSettings().overlap)
    args = parser.parse_args()
    rows = [json.loads(line) for name in ("rag_train.jsonl", "rag_dev.jsonl")
            for line in (ROOT / "data" / name).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["answerable"]]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with embedder(args.fake) as settings, tempfile.TemporaryDirectory() as tmp:
        chunking = ChunkSettings(size=args.chunk_size, overlap=args.chunk_overlap)
        options = IndexOptions(corpus=str(ROOT / "data" / "rag" / "corpus"), index=f"{tmp}/index", chunking=chunking)
        summary = IndexBuild(options, settings, lambda line: None).run()
        print(f"embedder {settings.model} ({summary.dim}-d, {settings.origin}); {summary.passages} passages "
              f"(chunks of {chunking.size} {chunking.unit}, overlap {chunking.overlap}); built in "
              f"{summary.seconds:.1f} s; {len(rows)} answerable questions (train + dev)")
        retriever = open_retriever(f"{tmp}/index", settings)
        print_table("document-level hit rate (a top-k passage is from a source of the answer):",
                    evaluate(retriever, [r["question"] for r in rows], [set(r["sources"]) for r in rows]))
        retriever.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
