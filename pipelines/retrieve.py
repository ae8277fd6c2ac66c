"""``python -m pipelines.retrieve``: rank passages for a file of queries, no LM - how retrieval is evaluated.

    python -m pipelines.retrieve --index out/rag-index --input data/rag_dev.jsonl --query-column question \\
        --k 10 --output out/dev-retrieval.jsonl [--mode dense|bm25|hybrid] [--no-decompose] [--per-source N]

Multi-part questions ("read a CSV file and write it as JSON") are searched as a
whole and in parts, the rankings fused, and at most ``--per-source`` passages
(default 2) of one document kept, so the second document gets a place
(:mod:`dspy_ray.retrieval.decompose`; no LM).

Input: a jsonl / csv / parquet file (or folder) with a query column (``--query-column``,
default ``question``) and an id column (``--id-column``, default ``id``; generated from
file and line when absent).  Every input problem is reported before the first
embedding call, naming the file and line (:mod:`pipelines.inputs`).

Output (``.jsonl``, or ``.parquet`` by extension; a local path or a URI): one row
per input query, in input order, with these columns - a stable contract:

===============  =================  ===========================================================
column           type               meaning
===============  =================  ===========================================================
``id``           string             the query's id
``query``        string             the query text
``mode``         string             dense, bm25 or hybrid
``k``            int                passages asked for
``passage_ids``  list<string>       ranked passage ids (``<source>:<chunk>``), best first
``sources``      list<string>       each passage's source (path, or ``file#record``)
``scores``       list<double>       each passage's score (cosine, BM25, or fusion)
``errors``       list<string>       empty when the query was answered
===============  =================  ===========================================================

Exit codes: 0 done (per-query failures are in ``errors``), 2 bad input or settings.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from dspy_ray.client.embeddings import EmbeddingRequestError
from dspy_ray.endpoints.fallback import open_endpoints
from dspy_ray.endpoints.settings import resolve_settings
from dspy_ray.retrieval import MODES, Retriever, RetrieverOptions, read_manifest
from dspy_ray.util.cli import (EXIT_OK, HelpFormatter, add_endpoint_args, endpoint_flags, positive_int,
                               report_error, say)
from dspy_ray.util.fs import filesystem_for, write_bytes
from pipelines.index.embed import ray_connected
from pipelines.inputs import InputSpec, load_corpus

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("query", pa.string()), ("mode", pa.string()), ("k", pa.int64()),
    ("passage_ids", pa.list_(pa.string())), ("sources", pa.list_(pa.string())),
    ("scores", pa.list_(pa.float64())), ("errors", pa.list_(pa.string())),
])
QUERIES_PER_CALL = 256


def retrieve_rows(retriever: Retriever, ids: list[str], queries: list[str], errors: list[list[str]], k: int,
                  mode: str) -> list[dict]:
    """Output rows; a batch whose embedding fails is retried query by query, so one bad query fails alone."""
    rows = [{"id": i, "query": q, "mode": mode, "k": k, "passage_ids": [], "sources": [], "scores": [],
             "errors": list(e)} for i, q, e in zip(ids, queries, errors)]
    todo = [n for n, row in enumerate(rows) if not row["errors"]]
    for start in range(0, len(todo), QUERIES_PER_CALL):
        part = todo[start:start + QUERIES_PER_CALL]
        try:
            found = retriever.search_many([queries[n] for n in part], k=k, mode=mode)
        except EmbeddingRequestError:
            found = []
            for n in part:
                try:
                    found.append(retriever.search_many([queries[n]], k=k, mode=mode)[0])
                except EmbeddingRequestError as exc:
                    rows[n]["errors"].append(f"retrieval failed: {exc}")
                    found.append(None)
        for n, passages in zip(part, found):
            if passages is not None:
                rows[n].update(passage_ids=[p.id for p in passages], sources=[p.source for p in passages],
                               scores=[float(p.score) for p in passages])
    return rows


def write_rows(rows: list[dict], output: str) -> None:
    fs, path = filesystem_for(output)
    if output.endswith(".parquet"):
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), sink)
        data = sink.getvalue()
    else:
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    write_bytes(fs, path, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrieve", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--index", required=True, help="index folder or URI (python -m pipelines.index wrote it)")
    parser.add_argument("--input", required=True, help="queries: jsonl / csv / parquet file or folder")
    parser.add_argument("--output", required=True, help="results file: .jsonl or .parquet (path or URI)")
    parser.add_argument("--query-column", default="question", help="column holding the query text")
    parser.add_argument("--id-column", default="id", help="column holding query ids (generated if absent)")
    parser.add_argument("--k", type=positive_int, default=10, help="passages per query")
    parser.add_argument("--mode", choices=list(MODES), default=None, help="default: the index's (manifest)")
    parser.add_argument("--no-decompose", dest="decompose", action="store_false",
                        help="search each query whole only, not also its parts (split at conjunctions)")
    parser.add_argument("--per-source", type=int, default=None, metavar="N",
                        help="at most N passages of one document per query (default 2; 0: no cap)")
    parser.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists searched (approximate indexes)")
    parser.add_argument("--ef-search", type=positive_int, default=None, help="HNSW search breadth")
    add_endpoint_args(parser, "EMBED")
    return parser


def retrieve(args: argparse.Namespace) -> tuple[list[dict], str]:
    """The output rows for ``args``, written to ``--output``, and the mode they were ranked in."""
    manifest = read_manifest(args.index)  # a missing index fails before the queries are read
    table = load_corpus(InputSpec(args.input, text_column=args.query_column, id_column=args.id_column))
    mode = args.mode or manifest.retrieval.mode
    if args.per_source is not None and args.per_source < 0:
        raise ValueError(f"--per-source must be 0 or more, got {args.per_source}")
    options = RetrieverOptions(mode=mode, k=args.k, nprobe=args.nprobe, ef_search=args.ef_search,
                               decompose=args.decompose, per_source=args.per_source)
    embed = resolve_settings("EMBED", flags=endpoint_flags(args, "EMBED"))
    needs_embedder = mode != "bm25"
    with (open_endpoints(embed=embed, discover=ray_connected(), say=say) if needs_embedder
          else contextlib.nullcontext(None)) as endpoints:
        retriever = Retriever.open(args.index, endpoints.embed if endpoints else None, options)
        try:
            rows = retrieve_rows(retriever, table.column("id").to_pylist(),
                                 table.column(args.query_column).to_pylist(),
                                 table.column("errors").to_pylist(), args.k, mode)
        finally:
            retriever.close()
    write_rows(rows, args.output)
    return rows, mode


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        rows, mode = retrieve(args)
    except Exception as exc:  # noqa: BLE001 - report_error re-raises what declares no exit code: a bug, in full
        # The retriever's own option checks (a mode the index lacks) raise plain ValueError: a usage error here.
        return report_error(exc, usage=(ValueError,))
    failed = sum(1 for r in rows if r["errors"])
    print(f"retrieved top {args.k} ({mode}) for {len(rows)} queries in {time.perf_counter() - start:.1f} s "
          f"-> {args.output}; {failed} with errors")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
