"""``python -m pipelines.index``: a corpus folder (or URI) in, a searchable index folder (or URI) out.

    python -m pipelines.index --corpus data/rag/corpus --index out/rag-index
    python -m pipelines.index --corpus s3://bucket/docs --index s3://bucket/index --resume
    python -m pipelines.index --corpus docs/ --index out/idx --chunk-unit chars --chunk-size 1200 --chunk-overlap 200

What a build does, in order:

1. **checks, before any embedding**: the corpus exists and has indexable files
   (:mod:`pipelines.documents`); the index folder is writable; an index or a
   killed build's embeddings already there need ``--resume``, and must have
   been made with the same chunking and (checked once the endpoint answers a
   probe) the same embedder model, dimension and prefixes.
2. **read and chunk** every file (:mod:`pipelines.chunking`); a file unchanged
   since the last build (same sha256) reuses its passages without parsing.
   Unreadable, undecodable or empty files and bad records are reported by name
   on stderr, counted, and listed in ``errors.parquet``.
3. **embed** the passages whose text has no vector in the embedding store yet,
   on a Ray Data actor pool (:mod:`stages.embed`), many requests in flight;
   vectors stream back to this process and are written to the store in
   shards as they arrive, so a killed build loses at most one shard. A passage
   whose embedding fails after retries is recorded with its error, left out of
   the index, and retried by the next ``--resume``.
4. **publish**: ``passages.parquet``, the FAISS index (exact below
   ``--exact-below`` passages, else ``--ann``, trained on a sample), the BM25
   index, ``files.parquet``, ``errors.parquet`` and, last, ``manifest.json``
   (layout: :mod:`dspy_ray.retrieval.manifest`).

The last line says what happened: files read / skipped (named) / passages /
embedded now / reused / removed / failed, and the time.  Exit codes: 0 done
(failed passages are counted, not fatal), 2 bad input or settings (one line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError

from dspy_ray.client.embeddings import EmbeddingClient, EmbeddingConfigError
from dspy_ray.endpoints.fallback import open_endpoints
from dspy_ray.util.fs import filesystem_for, is_uri, read_bytes, write_bytes
from dspy_ray.retrieval import dense
from dspy_ray.retrieval.manifest import (
    BM25_DIR,
    BUILD_STATE,
    ERRORS,
    FAISS_INDEX,
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
    RetrievalIndexError,
    check_embedder,
    join,
    read_manifest,
)
from dspy_ray.retrieval.passages import PASSAGE_SCHEMA, embedding_text
from dspy_ray.retrieval.retriever import MODES
from dspy_ray.retrieval.sparse import SETTINGS as BM25_SETTINGS
from dspy_ray.retrieval.sparse import BM25Index
from dspy_ray.retrieval.store import SHARD_ROWS, EmbeddingStore, as_matrix
from dspy_ray.endpoints.settings import EndpointSettings, resolve_settings
from pipelines.chunking import ChunkSettings, chunk_document
from pipelines.documents import Corpus, CorpusError, Problem, RecordColumns, file_digest, parse_bytes, scan_corpus
from pipelines.runner import OutputError, check_writable
from stages.embed import EmbedStage
from dspy_ray.util.cli import EXIT_USAGE

logger = logging.getLogger(__name__)

FILES_SCHEMA = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
                          ("kind", pa.string()), ("passages", pa.int64()), ("error", pa.string())])
ERRORS_SCHEMA = pa.schema([("kind", pa.string()), ("where", pa.string()), ("error", pa.string())])
SHOWN_PROBLEMS = 20  # problems printed one per line; the rest are counted (all are in errors.parquet)


class IndexDirError(ValueError):
    """The index location cannot be used as asked."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


@dataclass(frozen=True)
class IndexOptions:
    corpus: str
    index: str
    resume: bool = False
    chunking: ChunkSettings = field(default_factory=ChunkSettings)
    columns: RecordColumns = RecordColumns()
    exclude: tuple[str, ...] = ()
    exact_below: int = dense.EXACT_BELOW
    ann: str = "ivf_flat"
    mode: str = "hybrid"
    k: int = 5
    shard_rows: int = SHARD_ROWS
    stage: EmbedStage = field(default_factory=EmbedStage)


@dataclass
class IndexSummary:
    index: str
    files: int = 0
    skipped: list[Problem] = field(default_factory=list)  # file-level problems
    records_skipped: int = 0
    ignored: dict[str, int] = field(default_factory=dict)
    new_files: int = 0
    changed_files: int = 0
    unchanged_files: int = 0
    removed_files: int = 0
    passages: int = 0
    embedded_now: int = 0
    reused: int = 0
    removed: int = 0
    failed: int = 0
    index_type: str = ""
    dim: int = 0
    model: str = ""
    seconds: float = 0.0
    embed_seconds: float = 0.0  # the embedding stage: from its start to its last result
    first_result_s: float = 0.0  # from its start to its first result (actors starting up)
    first_result_rows: int = 0

    def line(self) -> str:
        shown = "; ".join(str(p) for p in self.skipped[:5])
        more = f"; and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
        skipped = f"{len(self.skipped)} skipped" + (f" ({shown}{more})" if self.skipped else "")
        changes = (f" ({self.new_files} new, {self.changed_files} changed, {self.unchanged_files} unchanged, "
                   f"{self.removed_files} removed)" if self.unchanged_files or self.removed_files else "")
        records = f", {self.records_skipped} records skipped" if self.records_skipped else ""
        failed = f", {self.failed} failed (in {ERRORS}; --resume retries them)" if self.failed else ", 0 failed"
        return (f"indexed {self.index}: {self.files} files read{changes}, {skipped}{records}; "
                f"{self.passages} passages: {self.embedded_now} embedded now, {self.reused} reused, "
                f"{self.removed} removed{failed}; {self.index_type} index, {self.dim}-d {self.model}; "
                f"{self.seconds:.1f} s")

    def ignored_line(self) -> str:
        items = ", ".join(f"{k} {v}" for k, v in sorted(self.ignored.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"ignored (not a document kind, hidden or excluded): {items}" if items else ""


@dataclass
class _Passages:
    """The corpus's passages as columns, in corpus order (row i of passages.parquet before failures are dropped)."""

    columns: dict[str, list] = field(default_factory=lambda: {name: [] for name in PASSAGE_SCHEMA.names})

    def __len__(self) -> int:
        return len(self.columns["id"])

    def extend(self, rows: dict[str, list]) -> None:
        for name, values in rows.items():
            self.columns[name].extend(values)

    def table(self, keep: list[int] | None = None) -> pa.Table:
        table = pa.table(self.columns, schema=PASSAGE_SCHEMA)
        return table if keep is None else table.take(pa.array(keep, pa.int64()))


class _Progress:
    """One stderr line every few seconds: embedded so far, rate, failures."""

    def __init__(self, total: int, say: Callable[[str], None], every_s: float = 10.0):
        self.total, self.say, self.every_s = total, say, every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int, failed: int, final: bool = False) -> None:
        now = time.perf_counter()
        if final or now - self.last >= self.every_s:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            self.say(f"embedding: {done:,}/{self.total:,} passages ({rate:,.0f}/s), {failed:,} failed")


class IndexBuild:
    """One run of the index CLI: :meth:`run` does check, read, embed and publish, in that order."""

    def __init__(self, options: IndexOptions, embed: EndpointSettings, say: Callable[[str], None]):
        self.options, self.embed_settings, self.say = options, embed, say
        self.index = options.index if is_uri(options.index) else os.path.abspath(options.index)
        self.fs, self.root = filesystem_for(self.index)
        self.summary = IndexSummary(self.index)
        self.previous: IndexManifest | None = None
        self.problems: list[Problem] = []
        self.passages = _Passages()
        self.files: list[dict] = []

    def run(self) -> IndexSummary:
        start = time.perf_counter()
        corpus = self.check()
        self.read(corpus)
        with open_endpoints(embed=self.embed_settings, discover=ray_connected(), say=self.say) as endpoints:
            settings = endpoints.embed
            dim = self.check_embedder(settings)
            failures, embedded = self.embed(settings, dim)
        self.publish(corpus, settings, dim, failures, embedded, start)
        self.summary.seconds = time.perf_counter() - start
        return self.summary

    # -- 1. checks -------------------------------------------------------------------

    def check(self) -> Corpus:
        corpus = scan_corpus(self.options.corpus, self.options.exclude)
        try:
            kind = self.fs.get_file_info(self.root).type
        except (OSError, ValueError) as exc:
            raise IndexDirError(f"index {self.index}: cannot open ({' '.join(str(exc).split())[:300]})") from None
        if kind == pafs.FileType.File:
            raise IndexDirError(f"index {self.index} exists and is not a folder")
        has_manifest = read_bytes(self.fs, join(self.root, MANIFEST)) is not None
        state = read_bytes(self.fs, join(self.root, BUILD_STATE))
        has_store = bool(EmbeddingStore(self.index).shards())
        if (has_manifest or state is not None or has_store) and not self.options.resume:
            raise IndexDirError(f"index {self.index} already holds an index or a build's embeddings; pass --resume "
                                f"to update it (only new and changed passages are embedded), or choose a new --index")
        try:
            check_writable(self.index, self.fs, self.root)
        except OutputError as exc:
            raise IndexDirError(str(exc).replace("output", "index", 1)) from None
        chunking = self.options.chunking.model_dump()
        if has_manifest:
            self.previous = read_manifest(self.index)
            _same_chunking(self.previous.chunking.model_dump(), chunking, self.index)
        if state is not None:
            _same_chunking(json.loads(state).get("chunking", {}), chunking, self.index)
        return corpus

    def check_embedder(self, settings: EndpointSettings) -> int:
        """Probe the endpoint (a bad URL, key or model fails here) and compare it with what the folder holds."""
        client = EmbeddingClient(settings)
        try:
            dim = client.probe()
        finally:
            client.close()
        if self.previous is not None:
            check_embedder(self.previous, settings.model, dim, self.index, settings.query_prefix,
                           settings.passage_prefix)
        raw = read_bytes(self.fs, join(self.root, BUILD_STATE))
        if raw is not None:
            state = json.loads(raw)
            built = state.get("embedder", {})
            if (built.get("model"), built.get("dim")) != (settings.model, dim):
                raise RetrievalIndexError(
                    f"index {self.index} holds embeddings of an interrupted build with embedder "
                    f"{built.get('model')!r} ({built.get('dim')}-d); this run's embedder is {settings.model!r} "
                    f"({dim}-d): use that embedder, or a new --index")
        store_dim = EmbeddingStore(self.index).dim()
        if store_dim is not None and store_dim != dim:
            raise RetrievalIndexError(f"index {self.index}: stored embeddings are {store_dim}-d, the embedder "
                                      f"{settings.model!r} gives {dim}-d; use a new --index")
        return dim

    # -- 2. read and chunk ------------------------------------------------------------------

    def read(self, corpus: Corpus) -> None:
        previous_files, previous_rows = self._previous_build()
        self.summary.ignored = corpus.ignored
        for f in corpus.files:
            try:
                raw = corpus.read(f)
            except OSError as exc:
                self._problem(Problem(f.path, f"cannot read ({getattr(exc, 'strerror', None) or exc})"))
                self.files.append({"path": f.path, "sha256": None, "bytes": f.size, "kind": f.kind,
                                   "passages": 0, "error": self.problems[-1].reason})
                continue
            digest = file_digest(raw)
            before = previous_files.get(f.path)
            if before is None:
                self.summary.new_files += 1 if self.previous is not None else 0
            elif before != digest:
                self.summary.changed_files += 1
            if before == digest and f.path in previous_rows:
                self.summary.unchanged_files += 1
                rows = previous_rows[f.path]
                self.passages.extend(rows)
                self.files.append({"path": f.path, "sha256": digest, "bytes": len(raw), "kind": f.kind,
                                   "passages": len(rows["id"]), "error": None})
                continue
            docs, problems = parse_bytes(f.path, f.kind, raw, self.options.columns)
            for problem in problems:
                self._problem(problem)
            count = 0
            for doc in docs:
                chunks = chunk_document(doc, self.options.chunking)
                count += len(chunks)
                self.passages.extend({
                    "id": [c.id for c in chunks], "source": [c.source for c in chunks],
                    "title": [c.title for c in chunks], "section": [c.section for c in chunks],
                    "text": [c.text for c in chunks], "start": [c.start for c in chunks],
                    "end": [c.end for c in chunks], "chunk": [c.chunk for c in chunks],
                    "file": [c.file for c in chunks], "hash": [c.hash for c in chunks]})
            file_problem = next((p.reason for p in problems if p.kind == "file"), None)
            self.files.append({"path": f.path, "sha256": digest, "bytes": len(raw), "kind": f.kind,
                               "passages": count, "error": file_problem})
        current = {f.path for f in corpus.files}
        self.summary.removed_files = len(set(previous_files) - current)
        self.summary.skipped = [p for p in self.problems if p.kind == "file"]
        self.summary.records_skipped = sum(p.kind == "record" for p in self.problems)
        self.summary.files = sum(1 for f in self.files if f["error"] is None)
        if len(self.problems) > SHOWN_PROBLEMS:
            self.say(f"... and {len(self.problems) - SHOWN_PROBLEMS} more problems (all in {ERRORS})")
        if not len(self.passages):
            raise CorpusError(f"corpus {self.options.corpus}: no passages to index: "
                              f"{len(self.summary.skipped)} of {len(corpus.files)} files skipped "
                              f"({'; '.join(str(p) for p in self.summary.skipped[:3])})")

    def _problem(self, problem: Problem) -> None:
        self.problems.append(problem)
        if len(self.problems) <= SHOWN_PROBLEMS:
            self.say(f"skipped {problem}")

    def _previous_build(self) -> tuple[dict[str, str], dict[str, dict[str, list]]]:
        """(path -> sha256, path -> its passages as columns) of the last complete build, if any."""
        if self.previous is None:
            return {}, {}
        local = self._read_table(FILES)
        passages = self._read_table(PASSAGES)
        if local is None or passages is None:
            return {}, {}
        files = local.to_pylist()
        shas = {f["path"]: f["sha256"] for f in files if f["sha256"]}
        columns = {name: passages.column(name).to_pylist() for name in PASSAGE_SCHEMA.names}
        rows: dict[str, dict[str, list]] = {}
        for i, path in enumerate(columns["file"]):
            group = rows.setdefault(path, {name: [] for name in PASSAGE_SCHEMA.names})
            for name in PASSAGE_SCHEMA.names:
                group[name].append(columns[name][i])
        # Reuse a file's passages only if all of them made it into the index: one whose embedding
        # failed last time is missing from passages.parquet, so that file is read and chunked again.
        complete = {f["path"] for f in files if f["error"] is None and f["path"] in rows
                    and len(rows[f["path"]]["id"]) == f["passages"]}
        return shas, {path: group for path, group in rows.items() if path in complete}

    def _read_table(self, name: str) -> pa.Table | None:
        try:
            return pq.read_table(join(self.root, name), filesystem=self.fs)
        except (FileNotFoundError, pa.ArrowInvalid, OSError):
            return None

    # -- 3. embed ---------------------------------------------------------------------------------

    def embed(self, settings: EndpointSettings, dim: int) -> tuple[dict[str, str], set[str]]:
        """Embed what the store lacks; returns (hash -> error for failures, hashes embedded now)."""
        store = EmbeddingStore(self.index)
        done = store.hashes()
        columns = self.passages.columns
        todo: dict[str, str] = {}
        for h, title, section, text in zip(columns["hash"], columns["title"], columns["section"], columns["text"]):
            if h not in done and h not in todo:
                todo[h] = embedding_text(title, section, text)
        write_bytes(self.fs, join(self.root, BUILD_STATE), json.dumps({
            "embedder": {"model": settings.model, "dim": dim, "query_prefix": settings.query_prefix,
                         "passage_prefix": settings.passage_prefix},
            "chunking": self.options.chunking.model_dump(), "corpus": self.options.corpus,
            "started_at": _now()}, indent=2).encode())
        if not todo:
            return {}, set()
        self.say(f"embedding {len(todo):,} passages ({len(done):,} already in the store) with {settings.model!r}")
        return self._run_stage(store, todo, settings, dim), set(todo)

    def _run_stage(self, store: EmbeddingStore, todo: dict[str, str], settings: EndpointSettings,
                   dim: int) -> dict[str, str]:
        import ray

        from dspy_ray.util.ray_runtime import init_ray
        from pipelines.inputs import to_dataset

        init_ray()
        ray.data.DataContext.get_current().enable_progress_bars = False  # _Progress prints one line instead
        stage = self.options.stage
        table = pa.table({"hash": list(todo), "embedding_text": list(todo.values())})
        # One actor batch per block: Ray Data hands a block's results back when the whole block is done,
        # so smaller blocks mean a steadier stream of results (and of progress) from a slow endpoint.
        per_block = max(1, min(stage.batch_size, -(-table.num_rows // (2 * stage.num_actors))))
        budget = min(stage.max_in_flight_per_actor, max(1, settings.max_in_flight // stage.num_actors))
        ds = stage.apply(to_dataset(table, rows_per_block=per_block), settings, max_in_flight=budget)
        failures: dict[str, str] = {}
        progress = _Progress(table.num_rows, self.say)
        seen = 0
        started = time.perf_counter()
        try:
            with store.writer(dim, self.options.shard_rows) as writer:
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    ok = pc.is_null(batch.column("error"))
                    good = batch.filter(ok)
                    writer.add(good.column("hash").to_pylist(), as_matrix(good.column("vector"), dim))
                    bad = batch.filter(pc.invert(ok))
                    failures.update(zip(bad.column("hash").to_pylist(), bad.column("error").to_pylist()))
                    if not seen:
                        self.summary.first_result_s = time.perf_counter() - started
                        self.summary.first_result_rows = batch.num_rows
                    seen += batch.num_rows
                    progress.update(seen, len(failures))
        except Exception as exc:  # noqa: BLE001 - Ray wraps the actor's exception; surface a config error plainly
            cause = _config_cause(exc)
            if cause is not None:
                raise cause from None
            raise
        self.summary.embed_seconds = time.perf_counter() - started
        progress.update(seen, len(failures), final=True)
        return failures

    # -- 4. publish --------------------------------------------------------------------------------

    def publish(self, corpus: Corpus, settings: EndpointSettings, dim: int, failures: dict[str, str],
                embedded: set[str], start: float) -> None:
        columns = self.passages.columns
        keep = [i for i, h in enumerate(columns["hash"]) if h not in failures]
        table = self.passages.table(keep)
        hashes = table.column("hash").to_pylist()
        wanted: dict[str, list[int]] = {}
        for row, h in enumerate(hashes):
            wanted.setdefault(h, []).append(row)
        n = table.num_rows
        if n == 0:
            raise CorpusError(f"corpus {self.options.corpus}: every passage failed to embed "
                              f"(first error: {next(iter(failures.values()))}); nothing to index")
        spec = dense.choose_index(n, dim, exact_below=self.options.exact_below, ann=self.options.ann)
        store = EmbeddingStore(self.index)
        train = store.sample(wanted, spec.train_size(n), dim) if spec.needs_training else None
        if spec.needs_training:
            self.say(f"training {spec.factory} on {len(train):,} of {n:,} vectors")
        index = dense.build_index(spec, dim, store.vectors(wanted, dim), train)
        if index.ntotal != n:
            raise RuntimeError(f"index build: {index.ntotal} vectors for {n} passages (embedding store incomplete)")
        texts = [embedding_text(t, s, x) for t, s, x in zip(table.column("title").to_pylist(),
                                                            table.column("section").to_pylist(),
                                                            table.column("text").to_pylist())]
        bm25 = BM25Index.build(texts)
        del texts

        previous_ids = set(self._read_table(PASSAGES).column("id").to_pylist()) if self.previous else set()
        ids = table.column("id").to_pylist()
        s = self.summary
        s.passages, s.failed = n, len(columns["hash"]) - n
        s.embedded_now = sum(1 for h in hashes if h in embedded)
        s.reused = n - s.embedded_now
        s.removed = len(previous_ids - set(ids))
        s.index_type, s.dim, s.model = spec.type, dim, settings.model
        errors = ([{"kind": p.kind, "where": p.where, "error": p.reason} for p in self.problems]
                  + [{"kind": "passage", "where": columns["id"][i], "error": failures[h]}
                     for i, h in enumerate(columns["hash"]) if h in failures])
        fingerprint = hashlib.sha256("".join(f"{f['path']}\0{f['sha256']}\n" for f in self.files).encode()).hexdigest()
        manifest = IndexManifest(
            embedder=EmbedderInfo(model=settings.model, dim=dim, base_url=settings.redacted()["base_url"],
                                  origin=settings.origin, query_prefix=settings.query_prefix,
                                  passage_prefix=settings.passage_prefix),
            passages=n,
            index=DenseIndexInfo(type=spec.type, factory=spec.factory, nlist=spec.nlist, nprobe=spec.nprobe,
                                 ef_search=spec.ef_search, trained_on=0 if train is None else len(train),
                                 exact_below=self.options.exact_below),
            bm25=dict(BM25_SETTINGS),
            retrieval=RetrievalDefaults(mode=self.options.mode, k=self.options.k),
            corpus=CorpusInfo(root=_redacted_location(self.options.corpus), fingerprint=fingerprint,
                              files=s.files, records=sum(1 for x in set(table.column("source").to_pylist()) if "#" in x),
                              skipped=len(s.skipped)),
            chunking=ChunkingInfo(**self.options.chunking.model_dump()),
            build=BuildInfo(created_at=_now(), seconds=round(time.perf_counter() - start, 3),
                            embedded_now=s.embedded_now, reused=s.reused, removed=s.removed, failed=s.failed,
                            versions=_versions()),
        )
        self._write(table, index, bm25, errors, manifest)
        dropped = store.compact(set(wanted), dim)
        if dropped:
            logger.info("embedding store: dropped %d vectors no passage uses", dropped)

    def _write(self, table: pa.Table, index, bm25: BM25Index, errors: list[dict], manifest: IndexManifest) -> None:
        """Stage every file locally, then put them in place; the manifest goes last and marks the index complete."""
        staging = tempfile.mkdtemp(prefix="index-") if is_uri(self.index) else join(self.root, f".staging-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging, exist_ok=True)
        try:
            pq.write_table(table, os.path.join(staging, PASSAGES), compression="zstd")
            dense.write_index(index, os.path.join(staging, FAISS_INDEX))
            bm25.save(os.path.join(staging, BM25_DIR))
            pq.write_table(pa.Table.from_pylist(self.files, schema=FILES_SCHEMA), os.path.join(staging, FILES))
            pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), os.path.join(staging, ERRORS))
            fs, root = self.fs, self.root
            if read_bytes(fs, join(root, MANIFEST)) is not None:
                fs.delete_file(join(root, MANIFEST))  # from here until the new one is written, no half-index is served
            for name in (PASSAGES, FAISS_INDEX, FILES, ERRORS, BM25_DIR):
                _install(os.path.join(staging, name), fs, join(root, name))
            write_bytes(fs, join(root, MANIFEST), manifest.model_dump_json(indent=2).encode())
            fs.delete_file(join(root, BUILD_STATE))
        finally:
            shutil.rmtree(staging, ignore_errors=True)


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


def _same_chunking(before: dict, now: dict, where: str) -> None:
    if before and before != now:
        raise IndexDirError(f"index {where} was built with chunking {before}; this run asks for {now}: "
                            f"use the same --chunk-* flags, or a new --index")


def _config_cause(exc: BaseException) -> EmbeddingConfigError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, EmbeddingConfigError):
            return EmbeddingConfigError(str(exc).splitlines()[-1] if "\n" in str(exc) else str(exc))
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def ray_connected() -> bool:
    """Connect first when this runs as a cluster job (RAY_ADDRESS set), so discovery can find the Serve
    embedder; a local run starts Ray only when there is something to embed (a local Ray serves no models)."""
    import ray

    if os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        from dspy_ray.util.ray_runtime import init_ray

        init_ray()
    return ray.is_initialized()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


# -- command line --------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = ChunkSettings()
    stage = EmbedStage()
    parser = argparse.ArgumentParser(prog="python -m pipelines.index", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = parser.add_argument_group("corpus and index")
    io.add_argument("--corpus", required=True, help="folder (recursive) or file: .txt .md .rst .html .htm, and "
                                                    "jsonl/csv/parquet records; a local path or s3://, gs:// URI")
    io.add_argument("--index", required=True, help="index folder or object-store prefix")
    io.add_argument("--resume", action="store_true",
                    help="reuse what --index holds: a killed build's embeddings, an earlier build's passages "
                         "(only new and changed passages are embedded; removed files are dropped)")
    io.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="skip corpus-relative paths matching GLOB (repeatable), e.g. 'genindex*.html'")
    io.add_argument("--text-column", default="text", help="records: the text column")
    io.add_argument("--title-column", default="title", help="records: the title column (else the record id)")
    io.add_argument("--id-column", default="id", help="records: the id column (else the line or row number)")
    chunk = parser.add_argument_group("chunking")
    chunk.add_argument("--chunk-unit", choices=["tokens", "chars"], default=defaults.unit,
                       help="tokens = words and punctuation marks")
    chunk.add_argument("--chunk-size", type=_positive, default=defaults.size, help="largest passage, in units")
    chunk.add_argument("--chunk-overlap", type=int, default=defaults.overlap, help="units shared by neighbours")
    ix = parser.add_argument_group("index")
    ix.add_argument("--exact-below", type=_positive, default=dense.EXACT_BELOW,
                    help="fewer passages get an exact (flat) FAISS index; more get --ann")
    ix.add_argument("--ann", choices=list(dense.ANN_TYPES), default="ivf_flat", help="approximate index type")
    ix.add_argument("--mode", choices=list(MODES), default="hybrid", help="retrievers' default mode (manifest)")
    ix.add_argument("--k", type=_positive, default=5, help="retrievers' default k (manifest)")
    emb = parser.add_argument_group("embedding endpoint (flags > environment > .env > discovery > embedded embedder)")
    emb.add_argument("--embed-base-url", default=None, help="OpenAI-compatible /v1 base URL (env EMBED_BASE_URL)")
    emb.add_argument("--embed-model", default=None, help="embedding model id (env EMBED_MODEL)")
    emb.add_argument("--embed-batch-size", type=_positive, default=None,
                     help="inputs per request (env EMBED_BATCH_SIZE; default 32)")
    emb.add_argument("--embed-max-in-flight", type=_positive, default=None,
                     help="requests in flight, all actors together (env EMBED_MAX_IN_FLIGHT; default 256)")
    emb.add_argument("--query-prefix", default=None, help="text before each query, e.g. 'query: ' (env EMBED_QUERY_PREFIX)")
    emb.add_argument("--passage-prefix", default=None,
                     help="text before each passage, e.g. 'passage: ' (env EMBED_PASSAGE_PREFIX)")
    run = parser.add_argument_group("execution")
    run.add_argument("--num-actors", type=_positive, default=stage.num_actors, help="embedding actors")
    run.add_argument("--concurrency", type=_positive, default=stage.max_in_flight_per_actor,
                     help="requests in flight per actor")
    run.add_argument("--batch-size", type=_positive, default=stage.batch_size, help="passages per actor batch")
    run.add_argument("--shard-rows", type=_positive, default=SHARD_ROWS,
                     help="vectors per embedding-store shard: the most a killed build loses")
    return parser


def options_from_args(args: argparse.Namespace) -> tuple[IndexOptions, EndpointSettings]:
    chunking = ChunkSettings(unit=args.chunk_unit, size=args.chunk_size, overlap=args.chunk_overlap)
    options = IndexOptions(
        corpus=args.corpus, index=args.index, resume=args.resume, chunking=chunking,
        columns=RecordColumns(text=args.text_column, title=args.title_column, id=args.id_column),
        exclude=tuple(args.exclude), exact_below=args.exact_below, ann=args.ann, mode=args.mode, k=args.k,
        shard_rows=args.shard_rows,
        stage=EmbedStage(num_actors=args.num_actors, max_in_flight_per_actor=args.concurrency,
                         batch_size=args.batch_size))
    # The key comes from EMBED_API_KEY / .env only: a flag would show in `ps` and shell history.
    embed = resolve_settings("EMBED", flags={
        "base_url": args.embed_base_url, "model": args.embed_model, "batch_size": args.embed_batch_size,
        "max_in_flight": args.embed_max_in_flight, "query_prefix": args.query_prefix,
        "passage_prefix": args.passage_prefix})
    return options, embed


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    args = build_parser().parse_args(argv)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        options, embed = options_from_args(args)
        summary = IndexBuild(options, embed, say).run()
    except (CorpusError, IndexDirError, RetrievalIndexError, EmbeddingConfigError, ValidationError) as exc:
        print(f"error: {' '.join(str(exc).split())[:1000]}", file=sys.stderr)
        return 2
    if summary.ignored_line():
        say(summary.ignored_line())
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
