"""``python -m pipelines.index``: a corpus folder (or URI) in, a searchable index folder (or URI) out.

    python -m pipelines.index --corpus data/rag/corpus --index out/rag-index
    python -m pipelines.index --corpus s3://bucket/docs --index s3://bucket/index --resume
    python -m pipelines.index --corpus docs/ --index out/idx --chunk-unit chars --chunk-size 1200 --chunk-overlap 200

The last line says what happened: files read / skipped (named) / passages /
embedded now / reused / removed / failed, and the time.  Exit codes: 0 done
(failed passages are counted, not fatal), 2 bad input or settings (one line on
stderr, no traceback), or the code another error's type declares
(:func:`dspy_ray.util.cli.report_error`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from dspy_ray.endpoints.settings import EndpointSettings, resolve_settings
from dspy_ray.retrieval import dense
from dspy_ray.retrieval.retriever import MODES
from dspy_ray.util.cli import EXIT_OK, HelpFormatter, add_endpoint_args, endpoint_flags, positive_int, report_error, say
from pipelines.chunking import ChunkSettings
from pipelines.documents import RecordColumns
from pipelines.index.base import IndexOptions
from pipelines.index.build import IndexBuild
from stages.embed import EmbedStage

# Defaults shown in --help come from the typed settings, so the help cannot drift from what a run uses.
_CHUNK = ChunkSettings.model_fields
_STAGE = EmbedStage.model_fields
_ENDPOINT = EndpointSettings.model_fields
_OPTIONS = {f.name: f.default for f in dataclasses.fields(IndexOptions)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.index", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    io = parser.add_argument_group("corpus and index")
    io.add_argument("--corpus", required=True, help="folder (recursive) or file: .txt .md .rst .html .htm, and "
                                                    "jsonl/csv/parquet records; a local path or s3://, gs:// URI")
    io.add_argument("--index", required=True, help="index folder or object-store prefix")
    io.add_argument("--resume", action="store_true",
                    help="reuse what --index holds: a killed build's embeddings, an earlier build's passages "
                         "(only new and changed passages are embedded; removed files are dropped)")
    io.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="skip corpus-relative paths matching GLOB (repeatable), e.g. 'genindex*.html'")
    columns = RecordColumns()
    io.add_argument("--text-column", default=columns.text, help="records: the text column")
    io.add_argument("--title-column", default=columns.title, help="records: the title column (else the record id)")
    io.add_argument("--id-column", default=columns.id, help="records: the id column (else the line or row number)")
    chunk = parser.add_argument_group("chunking")
    chunk.add_argument("--chunk-unit", choices=["tokens", "chars"], default=_CHUNK["unit"].default,
                       help="tokens = words and punctuation marks")
    chunk.add_argument("--chunk-size", type=positive_int, default=_CHUNK["size"].default,
                       help="largest passage, in units")
    chunk.add_argument("--chunk-overlap", type=int, default=_CHUNK["overlap"].default,
                       help="units shared by neighbours")
    ix = parser.add_argument_group("index")
    ix.add_argument("--exact-below", type=positive_int, default=_OPTIONS["exact_below"],
                    help="fewer passages get an exact (flat) FAISS index; more get --ann")
    ix.add_argument("--ann", choices=list(dense.ANN_TYPES), default=_OPTIONS["ann"], help="approximate index type")
    ix.add_argument("--shard-index-above", type=positive_int, default=None, metavar="N",
                    help="an IVF index of more than N vectors is built in parts by Ray tasks and merged into on-disk "
                         f"lists (index.ivfdata); default: what {dense.SHARD_BUDGET_BYTES >> 30} GiB of index holds "
                         "at the embedder's dimension (2.8M vectors at 384-d IVF-Flat)")
    # (HelpFormatter shows no "(default: ...)" for a help that says "default" itself.)
    ix.add_argument("--mode", choices=list(MODES), default=_OPTIONS["mode"],
                    help="retrievers' mode when a search names none (manifest)")
    ix.add_argument("--k", type=positive_int, default=_OPTIONS["k"],
                    help="retrievers' k when a search names none (manifest)")
    _add_embed_args(parser)
    run = parser.add_argument_group("execution")
    run.add_argument("--num-actors", type=positive_int, default=_STAGE["num_actors"].default, help="embedding actors")
    run.add_argument("--concurrency", type=positive_int, default=_STAGE["max_in_flight_per_actor"].default,
                     help="requests in flight per actor")
    run.add_argument("--batch-size", type=positive_int, default=_STAGE["batch_size"].default,
                     help="passages per actor batch")
    run.add_argument("--shard-rows", type=positive_int, default=_OPTIONS["shard_rows"],
                     help="most vectors per embedding-store shard (each actor writes one shard per batch, so "
                          "--batch-size is the usual size); a killed build loses only the batches in flight")
    return parser


def _add_embed_args(parser: argparse.ArgumentParser) -> None:
    """The shared embedding-endpoint flags, and the ones only an index build needs."""
    emb = add_endpoint_args(parser, "EMBED", in_flight=True)
    # The flags default to None so that environment and .env come next; the settings' own defaults come last.
    emb.description = "defaults when no flag, variable or .env sets them: " + ", ".join(
        f"--embed-{name.replace('_', '-')} {_ENDPOINT[name].default}" for name in ("max_in_flight", "batch_size"))
    emb.add_argument("--embed-batch-size", type=positive_int, default=None,
                     help="inputs per request (env EMBED_BATCH_SIZE)")
    emb.add_argument("--query-prefix", default=None,
                     help="text before each query, e.g. 'query: ' (env EMBED_QUERY_PREFIX)")
    emb.add_argument("--passage-prefix", default=None,
                     help="text before each passage, e.g. 'passage: ' (env EMBED_PASSAGE_PREFIX)")


def options_from_args(args: argparse.Namespace) -> tuple[IndexOptions, EndpointSettings]:
    chunking = ChunkSettings(unit=args.chunk_unit, size=args.chunk_size, overlap=args.chunk_overlap)
    options = IndexOptions(
        corpus=args.corpus, index=args.index, resume=args.resume, chunking=chunking,
        columns=RecordColumns(text=args.text_column, title=args.title_column, id=args.id_column),
        exclude=tuple(args.exclude), exact_below=args.exact_below, ann=args.ann, mode=args.mode, k=args.k,
        shard_rows=args.shard_rows, shard_above=args.shard_index_above,
        stage=EmbedStage(num_actors=args.num_actors, max_in_flight_per_actor=args.concurrency,
                         batch_size=args.batch_size))
    # The key comes from EMBED_API_KEY / .env only: a flag would show in `ps` and shell history.
    embed = resolve_settings("EMBED", flags={
        **endpoint_flags(args, "EMBED"), "batch_size": args.embed_batch_size, "query_prefix": args.query_prefix,
        "passage_prefix": args.passage_prefix})
    return options, embed


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    args = build_parser().parse_args(argv)
    try:
        options, embed = options_from_args(args)
        summary = IndexBuild(options, embed, say).run()
    except Exception as exc:  # noqa: BLE001 - report_error re-raises what declares no exit code: a bug, in full
        return report_error(exc)
    if summary.ignored_line():
        say(summary.ignored_line())
    print(summary.line())
    return EXIT_OK
