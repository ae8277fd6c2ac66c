"""A real corpus: the Python 3.11 documentation Debian ships, indexed and searched.

    apt-get install python3.11-doc                  # HTML under /usr/share/doc/python3.11/html
    python benchmarks/pydocs_rag.py                 # the embedded embedder (no endpoint configured)
    python benchmarks/pydocs_rag.py --index out/pydocs --resume    # keep the index; re-run only what is new
    python benchmarks/pydocs_rag.py --fake          # the fake endpoint's bag-of-words vectors (a dry run)

Indexes every page (the generated index pages ``genindex*``, ``py-modindex``
and ``search`` excluded: they are link lists; ``_sources``/``_static`` are skipped
as ``_`` folders) with the default settings of ``python -m pipelines.index``,
and reports the ingestion time (the embedding stage apart), passages, index
size on disk, and, for the questions of ``benchmarks/data/pydocs_questions.jsonl``,
recall@k of dense, BM25 and hybrid retrieval: a hit when a top-k passage comes
from one of the question's answering ``pages``.

The questions are of two kinds (``kind``): ``single`` (44, one fact, any of
``pages`` answers) and ``two_page`` (24, written for this benchmark: each needs
two pages, one from each of its ``parts``; a hit only when both are in the top
k).  A second table gives recall@5 by kind for each mode with the multi-part
remedies of :mod:`dspy_ray.retrieval.decompose` off and on: sub-queries fused
(``decompose``) and at most N passages per page (``per_source``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from benchmarks.rag_recall import embedder, evaluate, print_table  # noqa: E402

VARIANTS = (  # (name, decompose, per_source)
    ("plain", False, 0), ("per_source=1", False, 1), ("per_source=2", False, 2),
    ("decompose", True, 0), ("decompose+per_source=2 (default)", True, 2), ("decompose+per_source=1", True, 1),
)


def found(question: dict, sources: list[str], k: int) -> bool:
    """A single-fact question: a top-k passage from an answering page; a two-page one: one from each part."""
    top = set(sources[:k])
    if question.get("kind") == "two_page":
        return all(top & set(part) for part in question["parts"])
    return bool(top & set(question["pages"]))


def recall_by_kind(retriever, questions: list[dict], modes=("dense", "bm25", "hybrid"), k: int = 5) -> None:
    """Recall@k by kind for each mode and variant, and the two-page / single ratio."""
    texts = [q["question"] for q in questions]
    kinds = sorted({q.get("kind", "single") for q in questions}, reverse=True)
    count = {kind: sum(q.get("kind", "single") == kind for q in questions) for kind in kinds}
    print(f"recall@{k} by kind ({', '.join(f'{n} {kind}' for kind, n in count.items())}); a two_page question "
          f"is a hit only when both of its pages are in the top {k}:")
    print(f"  {'mode':<7} {'variant':<34} " + " ".join(f"{kind:>9}" for kind in kinds) + f" {'ratio':>6} {'all':>6} {'q/s':>6}")
    for mode in modes:
        for name, decompose, per_source in VARIANTS:
            start = time.perf_counter()
            results = retriever.search_many(texts, k=k, mode=mode, decompose=decompose, per_source=per_source)
            qps = len(texts) / (time.perf_counter() - start)
            hits = [found(q, [p.source for p in r], k) for q, r in zip(questions, results)]
            share = {kind: sum(h for h, q in zip(hits, questions) if q.get("kind", "single") == kind) / count[kind]
                     for kind in kinds}
            ratio = share.get("two_page", 0) / share["single"] if share.get("single") else float("nan")
            print(f"  {mode:<7} {name:<34} " + " ".join(f"{share[kind]:>9.3f}" for kind in kinds)
                  + f" {ratio:>6.2f} {sum(hits) / len(hits):>6.3f} {qps:>6.0f}")

DOCS = Path("/usr/share/doc/python3.11/html")
QUESTIONS = ROOT / "benchmarks" / "data" / "pydocs_questions.jsonl"
EXCLUDE = ("genindex*.html", "py-modindex.html", "search.html")


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    import ray

    from pipelines.index import IndexBuild, IndexOptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default=str(DOCS), help="the HTML folder")
    parser.add_argument("--index", default=None, help="keep the index here (default: a temporary folder)")
    parser.add_argument("--resume", action="store_true", help="reuse what --index holds")
    parser.add_argument("--fake", action="store_true", help="the fake endpoint's bag-of-words vectors")
    parser.add_argument("--eval-only", action="store_true", help="search the index --index holds; build nothing")
    args = parser.parse_args()
    if not Path(args.docs).is_dir():
        sys.exit(f"{args.docs} not found: `apt-get install python3.11-doc` first")
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    if args.eval_only:
        with embedder(args.fake) as settings:
            search(args.index, settings, questions)
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with embedder(args.fake) as settings, tempfile.TemporaryDirectory() as tmp:
        index = Path(args.index or f"{tmp}/index")
        options = IndexOptions(corpus=args.docs, index=str(index), exclude=EXCLUDE, resume=args.resume)
        cpu0, start = time.process_time(), time.perf_counter()
        summary = IndexBuild(options, settings, lambda line: print("  " + line, flush=True)).run()
        wall = time.perf_counter() - start
        print(summary.line())
        sizes = {name: folder_size(index / name) for name in ("index.faiss", "passages.parquet", "bm25", "embeddings")}
        embedded = summary.embedded_now
        rate = f" ({embedded / summary.embed_seconds:.1f} passages/s)" if summary.embed_seconds else ""
        print(f"\ningestion: {wall / 60:.1f} min wall for {summary.files} pages -> {summary.passages:,} passages; "
              f"embedding stage {summary.embed_seconds / 60:.1f} min for {embedded:,} passages{rate}; "
              f"driver CPU {time.process_time() - cpu0:.0f} s")
        print("index size: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items())
              + f"; searchable total {(sum(sizes.values()) - sizes['embeddings']) / 1e6:.1f} MB")
        print(f"embedder: {settings.model} ({summary.dim}-d, {settings.origin}); index {summary.index_type}\n")
        search(str(index), settings, questions)
    ray.shutdown()


def search(index: str, settings, questions: list[dict]) -> None:
    from dspy_ray.retrieval import open_retriever

    retriever = open_retriever(f"{index}?decompose=0&per_source=0", settings)
    single = [q for q in questions if q.get("kind", "single") == "single"]
    results = evaluate(retriever, [q["question"] for q in single], [set(q["pages"]) for q in single])
    print_table(f"page-level hit rate on the {len(single)} single-fact questions, each query as it is "
                f"(a top-k passage is from an answering page):", results)
    print()
    recall_by_kind(retriever, questions)
    retriever.close()


if __name__ == "__main__":
    main()
