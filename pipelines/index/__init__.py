"""The index build (``python -m pipelines.index``): a corpus in, a FAISS + BM25 index folder out.

What lives here, one module per step of a build, in the order :class:`IndexBuild` runs them:

1. :mod:`~pipelines.index.check` — **checks, before any embedding**: the corpus exists and has
   indexable files (:mod:`pipelines.documents`); the index folder is writable; an index or a
   killed build's embeddings already there need ``--resume``, and must have been made with the
   same chunking and (checked once the endpoint answers a probe) the same embedder model,
   dimension and prefixes.
2. :mod:`~pipelines.index.read` — **read and chunk** every file (:mod:`pipelines.chunking`), in
   Ray tasks over groups of files when Ray is up, each writing its passages as a parquet part in the
   index folder (:mod:`~pipelines.index.parts`): the texts never come to the build process. A file
   unchanged since the last build (same sha256) reuses its passages without parsing.
   Unreadable, undecodable or empty files and bad records are reported by name on stderr,
   counted, and listed in ``errors.parquet``.
3. :mod:`~pipelines.index.embed` — **embed** the passages whose text has no vector in the
   embedding store yet (planned from the parts' hash columns, the texts read from the parts by Ray
   tasks), on a Ray Data actor pool (:mod:`stages.embed`), many requests in flight;
   each actor writes its batch's vectors to the store as a whole shard before reporting the batch
   done, so no vector comes back to the build and a killed build loses only the batches in flight.
   A passage whose embedding fails after retries is recorded with its error, left out of the
   index, and retried by the next ``--resume``.
4. :mod:`~pipelines.index.publish` — **publish**: ``passages.parquet`` (streamed from the parts,
   which are then dropped), the FAISS index (exact below ``--exact-below`` passages, else
   ``--ann``, trained on a sample; an IVF index above ``--shard-index-above`` vectors is built in
   parts by Ray tasks and merged into on-disk lists: :mod:`~pipelines.index.sharded`), the BM25
   index (over the texts read back from ``passages.parquet``), ``files.parquet``,
   ``errors.parquet`` and, last, ``manifest.json`` (layout: :mod:`dspy_ray.retrieval.manifest`).

:mod:`~pipelines.index.build` runs them (:class:`IndexBuild`), :mod:`~pipelines.index.base` holds
what they share (:class:`IndexOptions`, :class:`IndexSummary`), :mod:`~pipelines.index.parts` the
passages between read and publish, :mod:`~pipelines.index.cli` is the command line::

    python -m pipelines.index --corpus data/rag/corpus --index out/rag-index
    python -m pipelines.index --corpus s3://bucket/docs --index s3://bucket/index --resume

    >>> summary = IndexBuild(IndexOptions("data/rag/corpus", "out/rag-index"), settings, print).run()  # doctest: +SKIP
    >>> summary.passages, summary.failed                                                              # doctest: +SKIP
    (463, 0)
"""

from pipelines.index.base import IndexDirError, IndexOptions, IndexSummary
from pipelines.index.build import IndexBuild
from pipelines.index.cli import build_parser, main, options_from_args
from pipelines.index.embed import ray_connected

__all__ = ["IndexBuild", "IndexDirError", "IndexOptions", "IndexSummary", "build_parser", "main",
           "options_from_args", "ray_connected"]
