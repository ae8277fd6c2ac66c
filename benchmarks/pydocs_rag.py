"""A real corpus: the Python 3.11 documentation Debian ships, indexed and searched.

    apt-get install python3.11-doc                  # HTML under /usr/share/doc/python3.11/html
    python benchmarks/pydocs_rag.py                 # the embedded embedder (no endpoint configured)
    python benchmarks/pydocs_rag.py --index out/pydocs --resume    # keep the index; re-run only what is new
    python benchmarks/pydocs_rag.py --fake          # the fake endpoint's bag-of-words vectors (a dry run)

Indexes every page (the generated index pages ``genindex*``, ``py-modindex``
and ``search`` excluded: they are link lists; ``_sources``/``_static`` are skipped
as ``_`` folders) with the default settings of ``python -m pipelines.index``,
and reports the ingestion time (the embedding stage apart), passages, index
size on disk, and, for the 44 questions of ``benchmarks/data/pydocs_questions.jsonl``,
recall@k of dense, BM25 and hybrid retrieval: a hit when a top-k passage comes
from one of the question's answering ``pages``.
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

DOCS = Path("/usr/share/doc/python3.11/html")
QUESTIONS = ROOT / "benchmarks" / "data" / "pydocs_questions.jsonl"
EXCLUDE = ("genindex*.html", "py-modindex.html", "search.html")


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    import ray

    from dspy_ray.retrieval import open_retriever
    from pipelines.index import IndexBuild, IndexOptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default=str(DOCS), help="the HTML folder")
    parser.add_argument("--index", default=None, help="keep the index here (default: a temporary folder)")
    parser.add_argument("--resume", action="store_true", help="reuse what --index holds")
    parser.add_argument("--fake", action="store_true", help="the fake endpoint's bag-of-words vectors")
    args = parser.parse_args()
    if not Path(args.docs).is_dir():
        sys.exit(f"{args.docs} not found: `apt-get install python3.11-doc` first")
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
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
        retriever = open_retriever(str(index), settings)
        results = evaluate(retriever, [q["question"] for q in questions], [set(q["pages"]) for q in questions])
        print_table(f"page-level hit rate on {len(questions)} questions (a top-k passage is from an answering page):",
                    results)
        retriever.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
