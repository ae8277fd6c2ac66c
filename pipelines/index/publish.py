"""Step 4 of a build: publish the index, in named steps (:meth:`Publisher.publish`), the manifest last.

What it writes (layout: :mod:`dspy_ray.retrieval.manifest`): ``passages.parquet`` (the passages that
embedded, streamed from the read step's parts one at a time: this process keeps their hash and id
columns only, for the FAISS plan and the counts), the FAISS index (exact below ``--exact-below``
passages, else ``--ann``, trained on a sample; an IVF index above ``--shard-index-above`` vectors
built in parts by Ray tasks and merged into on-disk lists, ``index.ivfdata``:
:mod:`pipelines.index.sharded`), the BM25 index (``bm25s`` needs every passage's text in this
process: they are read back from the new ``passages.parquet``), ``files.parquet``,
``errors.parquet`` and, last, ``manifest.json``, whose presence marks the index
complete::

    >>> Publisher(options, IndexDir.at(options.index), None, summary, say).publish(
    ...     read, embedded, settings, dim=384, start=start)                         # doctest: +SKIP
    >>> read_manifest(options.index).passages, summary.index_type                   # doctest: +SKIP
    (463, 'flat')
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.retrieval import dense
from dspy_ray.retrieval.manifest import (
    BM25_DIR,
    BUILD_STATE,
    ERRORS,
    FAISS_LISTS,
    FILES,
    MANIFEST,
    PASSAGES,
    BuildInfo,
    ChunkingInfo,
    CorpusInfo,
    DenseIndexInfo,
    EmbedderInfo,
    IndexManifest,
    RetrievalDefaults,
    write_manifest,
)
from dspy_ray.retrieval.passages import PASSAGE_SCHEMA, embedding_texts
from dspy_ray.retrieval.sparse import SETTINGS as BM25_SETTINGS
from dspy_ray.retrieval.sparse import BM25Index
from dspy_ray.retrieval.store import EmbeddingStore, workers_reach
from dspy_ray.util.fs import is_uri
from pipelines.documents import CorpusError, Problem
from pipelines.index.base import IndexDir, IndexOptions, IndexSummary, now
from pipelines.index.embed import Embedded
from pipelines.index.parts import PassageParts
from pipelines.index.read import CorpusRead
from pipelines.index.sharded import (
    ShardedBuild,
    ShardedIndex,
    WholeIndex,
    drop_parts,
    whole_index,
)

logger = logging.getLogger(__name__)

FILES_SCHEMA = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
                          ("kind", pa.string()), ("passages", pa.int64()), ("error", pa.string())])
ERRORS_SCHEMA = pa.schema([("kind", pa.string()), ("where", pa.string()), ("error", pa.string())])


@dataclass
class Indexed:
    """What went into ``passages.parquet``: its rows, hash -> rows (the FAISS plan), and the counts publish needs."""

    rows: int = 0
    wanted: dict[str, list[int]] = field(default_factory=dict)
    ids: list[pa.Array] = field(default_factory=list)  # the id column, part by part
    embedded_now: int = 0  # rows whose vector was made by this build
    records: int = 0  # distinct record sources (``file#id``)
    failed: list[dict] = field(default_factory=list)  # errors.parquet's rows for passages that failed to embed

    def add(self, part: pa.Table, embedded: Embedded) -> pa.Table:
        """Account for one part; its passages that embedded (the next rows of passages.parquet)."""
        bad = pc.is_in(part.column("hash"), value_set=pa.array(list(embedded.failures), pa.string()))
        lost = part.filter(bad)
        self.failed += [{"kind": "passage", "where": i, "error": embedded.failures[h]}
                        for i, h in zip(lost.column("id").to_pylist(), lost.column("hash").to_pylist())]
        kept = part.filter(pc.invert(bad))
        for row, h in enumerate(kept.column("hash").to_pylist(), start=self.rows):
            self.wanted.setdefault(h, []).append(row)
        self.rows += kept.num_rows
        self.ids.append(kept.column("id").combine_chunks())
        self.embedded_now += pc.sum(pc.is_in(kept.column("hash"), value_set=embedded.embedded)).as_py() or 0
        # A record's passages all come from its file, so from one part: distinct per part is distinct.
        sources = kept.column("source")
        self.records += pc.count_distinct(sources.filter(pc.match_substring(sources, "#"))).as_py()
        return kept


class Publisher:
    def __init__(self, options: IndexOptions, index: IndexDir, previous: IndexManifest | None,
                 summary: IndexSummary, say: Callable[[str], None]):
        self.options, self.index, self.previous, self.summary, self.say = options, index, previous, summary, say

    def publish(self, read: CorpusRead, embedded: Embedded, settings: EndpointSettings, dim: int,
                start: float) -> None:
        """Build both indexes over the passages that embedded, count, write everything, then drop dead vectors."""
        staging = (tempfile.mkdtemp(prefix="index-") if is_uri(self.index.location)
                   else self.index.path(f".staging-{uuid.uuid4().hex[:8]}"))
        os.makedirs(staging, exist_ok=True)
        try:
            indexed = self._passages(read.parts, embedded, os.path.join(staging, PASSAGES))
            dense_index, spec = self._dense_index(indexed.wanted, indexed.rows, dim)
            bm25 = _bm25_index(os.path.join(staging, PASSAGES))
            self._count(indexed, read.parts.total, spec.type, dim, settings.model)
            errors = _error_rows(read.problems, indexed.failed)
            manifest = self._manifest(indexed, read.files, settings, dim, spec, dense_index, start)
            self._write(staging, dense_index, bm25, read.files, errors, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            drop_parts(self.index)  # a sharded build's partial indexes, merged or not
        self._compact(indexed.wanted, dim)

    def _passages(self, parts: PassageParts, embedded: Embedded, dest: str) -> Indexed:
        """Write ``dest`` (passages.parquet) from the parts, one at a time, leaving out the passages that failed."""
        indexed = Indexed()
        with pq.ParquetWriter(dest, PASSAGE_SCHEMA, compression="zstd") as writer:
            for part in parts.tables():
                writer.write_table(indexed.add(part, embedded))
        if indexed.rows == 0:
            raise CorpusError(f"corpus {self.options.corpus}: every passage failed to embed "
                              f"(first error: {next(iter(embedded.failures.values()))}); nothing to index")
        return indexed

    def _dense_index(self, wanted: dict[str, list[int]], n: int, dim: int
                     ) -> tuple[WholeIndex | ShardedIndex, dense.DenseIndexSpec]:
        """(the FAISS index, its spec): built here from the store shard by shard, or in parts by Ray tasks."""
        options = self.options
        spec = dense.choose_index(n, dim, exact_below=options.exact_below, ann=options.ann)
        if dense.builds_sharded(spec, n, dim, options.shard_above) and workers_reach(self.index.location):
            built = ShardedBuild(self.index, spec, dim, self.say, options.shard_above).build(wanted, n)
        else:
            built = whole_index(EmbeddingStore(self.index.location), spec, wanted, n, dim, self.say)
        if built.ntotal != n:
            raise RuntimeError(f"index build: {built.ntotal} vectors for {n} passages (embedding store incomplete)")
        return built, spec

    def _count(self, indexed: Indexed, read: int, index_type: str, dim: int, model: str) -> None:
        """The summary's passage counts: indexed, failed, embedded now, reused, removed since the last build."""
        s = self.summary
        s.passages, s.failed = indexed.rows, read - indexed.rows
        s.embedded_now = indexed.embedded_now
        s.reused = s.passages - s.embedded_now
        s.removed = self._removed(pa.chunked_array(indexed.ids, pa.string()).combine_chunks()) if self.previous else 0
        s.index_type, s.dim, s.model = index_type, dim, model

    def _removed(self, ids: pa.Array) -> int:
        """How many passages of the last build's passages.parquet (read batch by batch) are not in ``ids``."""
        removed = 0
        try:
            with self.index.fs.open_input_file(self.index.path(PASSAGES)) as f:
                for batch in pq.ParquetFile(f).iter_batches(columns=["id"]):
                    removed += batch.num_rows - (pc.sum(pc.is_in(batch.column(0), value_set=ids)).as_py() or 0)
        except FileNotFoundError:
            return 0
        return removed

    def _manifest(self, indexed: Indexed, files: list[dict], settings: EndpointSettings, dim: int,
                  spec: dense.DenseIndexSpec, built: WholeIndex | ShardedIndex, start: float) -> IndexManifest:
        s, options = self.summary, self.options
        fingerprint = hashlib.sha256("".join(f"{f['path']}\0{f['sha256']}\n" for f in files).encode()).hexdigest()
        return IndexManifest(
            embedder=EmbedderInfo(model=settings.model, dim=dim, base_url=settings.redacted()["base_url"],
                                  origin=settings.origin, query_prefix=settings.query_prefix,
                                  passage_prefix=settings.passage_prefix),
            passages=s.passages,
            index=DenseIndexInfo(type=spec.type, factory=spec.factory, nlist=spec.nlist, nprobe=spec.nprobe,
                                 ef_search=spec.ef_search, trained_on=built.trained_on,
                                 exact_below=options.exact_below, parts=built.parts, lists_file=built.lists_file),
            bm25=dict(BM25_SETTINGS),
            retrieval=RetrievalDefaults(mode=options.mode, k=options.k),
            corpus=CorpusInfo(root=_redacted_location(options.corpus), fingerprint=fingerprint, files=s.files,
                              records=indexed.records, skipped=len(s.skipped)),
            chunking=ChunkingInfo(**options.chunking.model_dump()),
            build=BuildInfo(created_at=now(), seconds=round(time.perf_counter() - start, 3),
                            embedded_now=s.embedded_now, reused=s.reused, removed=s.removed, failed=s.failed,
                            versions=_versions()),
        )

    def _write(self, staging: str, dense_index: WholeIndex | ShardedIndex, bm25: BM25Index, files: list[dict],
               errors: list[dict], manifest: IndexManifest) -> None:
        """Stage the other files next to passages.parquet (local), then put them in place; the manifest goes last
        and marks the index complete."""
        dense_names = dense_index.write(staging)
        bm25.save(os.path.join(staging, BM25_DIR))
        pq.write_table(pa.Table.from_pylist(files, schema=FILES_SCHEMA), os.path.join(staging, FILES))
        pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), os.path.join(staging, ERRORS))
        self._put_in_place(staging, manifest, dense_names)

    def _put_in_place(self, staging: str, manifest: IndexManifest, dense_names: tuple[str, ...]) -> None:
        fs = self.index.fs
        if self.index.read(MANIFEST) is not None:
            fs.delete_file(self.index.path(MANIFEST))  # from here until the new one is written, no half-index is served
        for name in (PASSAGES, *dense_names, FILES, ERRORS, BM25_DIR):
            _install(os.path.join(staging, name), fs, self.index.path(name))
        write_manifest(self.index.location, manifest)
        fs.delete_file(self.index.path(BUILD_STATE))
        if FAISS_LISTS not in dense_names and fs.get_file_info(self.index.path(FAISS_LISTS)).type == pafs.FileType.File:
            fs.delete_file(self.index.path(FAISS_LISTS))  # an earlier sharded build's lists

    def _compact(self, wanted: dict[str, list[int]], dim: int) -> None:
        dropped = EmbeddingStore(self.index.location).compact(set(wanted), dim)
        if dropped:
            logger.info("embedding store: dropped %d vectors no passage uses", dropped)


def _bm25_index(passages: str) -> BM25Index:
    """BM25 over every passage of the written ``passages`` file: bm25s needs all their texts here at once."""
    texts = embedding_texts(pq.read_table(passages, columns=["title", "section", "text"]))
    return BM25Index.build(texts)


def _error_rows(problems: list[Problem], failed: list[dict]) -> list[dict]:
    """The rows of errors.parquet: unreadable files and bad records, then passages that failed to embed."""
    return [{"kind": p.kind, "where": p.where, "error": p.reason} for p in problems] + failed


def _install(local: str, fs: pafs.FileSystem, target: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        if os.path.isdir(local):
            shutil.rmtree(target, ignore_errors=True)
        os.replace(local, target)
        return
    if os.path.isdir(local):
        try:
            fs.delete_dir(target)
        except (FileNotFoundError, OSError):
            pass
        fs.create_dir(target, recursive=True)
    pafs.copy_files(local, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _redacted_location(location: str) -> str:
    from dspy_ray.endpoints.settings import redact_url

    return redact_url(location) if is_uri(location) else os.path.abspath(location)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("dspy-ray", "faiss-cpu", "bm25s"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
