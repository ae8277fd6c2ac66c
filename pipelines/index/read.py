"""Step 2 of a build: read and chunk every corpus file, or reuse its passages when it has not changed.

Files are read, parsed (PDF, Word, mail ... through :mod:`dspy_ray.corpus.documents`, the reader the
batch pipeline uses) and chunked in Ray tasks over groups of files when Ray is already up (a cluster
job); the passages come back to this process, which builds the index from them.

A file whose sha256 is the one the last complete build recorded, and whose passages all made it
into that index, keeps its passages without being parsed.  Unreadable, undecodable or empty files
and bad records are reported by name (the first :data:`SHOWN_PROBLEMS`), counted, and kept for
``errors.parquet``::

    >>> read = CorpusReader(options, IndexDir.at(options.index), None, summary, say).read(corpus)  # doctest: +SKIP
    >>> len(read.passages), read.files[0]                                                       # doctest: +SKIP
    (463, {'path': 'animal_services/animal_services_overview.md', 'sha256': '1113547b…', 'bytes': 4016,
           'kind': 'md', 'passages': 10, 'error': None})
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from dspy_ray.retrieval.manifest import ERRORS, FILES, PASSAGES, IndexManifest
from dspy_ray.retrieval.passages import PASSAGE_SCHEMA
from pipelines.chunking import Chunk, ChunkSettings, chunk_document
from pipelines.documents import (
    Corpus,
    CorpusError,
    CorpusFile,
    Problem,
    RecordColumns,
    file_digest,
    parse_bytes,
)
from pipelines.index.base import IndexDir, IndexOptions, IndexSummary

FILES_PER_TASK = 32  # files one read task parses and chunks at most (when Ray is up)
BYTES_PER_TASK = 64 << 20  # and at most this many bytes of them
SHOWN_PROBLEMS = 20  # problems printed one per line; the rest are counted (all are in errors.parquet)


@dataclass
class PassageColumns:
    """The corpus's passages as columns, in corpus order (row i of passages.parquet before failures are dropped)."""

    columns: dict[str, list] = field(default_factory=lambda: {name: [] for name in PASSAGE_SCHEMA.names})

    def __len__(self) -> int:
        return len(self.columns["id"])

    def extend(self, rows: dict[str, list]) -> None:
        for name, values in rows.items():
            self.columns[name].extend(values)

    def add_chunks(self, chunks: list[Chunk]) -> int:
        """Append ``chunks``; how many there were."""
        self.extend({name: [getattr(c, name) for c in chunks] for name in PASSAGE_SCHEMA.names})
        return len(chunks)

    def table(self, keep: list[int] | None = None) -> pa.Table:
        table = pa.table(self.columns, schema=PASSAGE_SCHEMA)
        return table if keep is None else table.take(pa.array(keep, pa.int64()))


@dataclass
class CorpusPassages:
    """What reading the corpus hands the next steps."""

    passages: PassageColumns = field(default_factory=PassageColumns)
    files: list[dict] = field(default_factory=list)  # the rows of files.parquet, in corpus order
    problems: list[Problem] = field(default_factory=list)  # unreadable files and bad records


class CorpusReader:
    """Reads a corpus into passages, counting new, changed, unchanged and removed files in ``summary``."""

    def __init__(self, options: IndexOptions, index: IndexDir, previous: IndexManifest | None,
                 summary: IndexSummary, say: Callable[[str], None]):
        self.options, self.index, self.previous, self.summary, self.say = options, index, previous, summary, say

    def read(self, corpus: Corpus) -> CorpusPassages:
        """Every file's passages; :class:`CorpusError` when no file gave one."""
        shas, reusable = self._previous_build()
        read = CorpusPassages()
        self.summary.ignored, self.summary.unsupported = corpus.ignored, corpus.unsupported
        reuse = {path: shas[path] for path in reusable if path in shas}
        for f, got in zip(corpus.files, read_files(corpus, reuse, self.options.columns, self.options.chunking)):
            self._read_file(f, got, shas, reusable, read)
        self._summarize(corpus, shas, read)
        return read

    def _read_file(self, f: CorpusFile, got: FileRead, shas: dict[str, str], reusable: dict[str, dict[str, list]],
                   read: CorpusPassages) -> None:
        """Account for one file read (on a worker or here): reused, parsed into passages, or a problem."""
        if got.error is not None:
            problem = Problem(f.path, got.error)
            self._problem(problem, read)
            read.files.append(_file_row(f, None, f.size, 0, problem.reason))
            return
        before = shas.get(f.path)
        if before is None:
            self.summary.new_files += 1 if self.previous is not None else 0
        elif before != got.digest:
            self.summary.changed_files += 1
        elif got.reused:
            self.summary.unchanged_files += 1
            rows = reusable[f.path]
            read.passages.extend(rows)
            read.files.append(_file_row(f, got.digest, got.size, len(rows["id"]), None))
            return
        for problem in got.problems:
            self._problem(problem, read)
        read.passages.extend(got.rows)
        file_problem = next((p.reason for p in got.problems if p.kind == "file"), None)
        read.files.append(_file_row(f, got.digest, got.size, len(got.rows["id"]), file_problem))

    def _summarize(self, corpus: Corpus, shas: dict[str, str], read: CorpusPassages) -> None:
        s = self.summary
        s.removed_files = len(set(shas) - {f.path for f in corpus.files})
        s.skipped = [p for p in read.problems if p.kind == "file"]
        s.records_skipped = sum(p.kind == "record" for p in read.problems)
        s.files = sum(1 for f in read.files if f["error"] is None)
        if len(read.problems) > SHOWN_PROBLEMS:
            self.say(f"... and {len(read.problems) - SHOWN_PROBLEMS} more problems (all in {ERRORS})")
        if not len(read.passages):
            raise CorpusError(f"corpus {self.options.corpus}: no passages to index: "
                              f"{len(s.skipped)} of {len(corpus.files)} files skipped "
                              f"({'; '.join(str(p) for p in s.skipped[:3])})")

    def _problem(self, problem: Problem, read: CorpusPassages) -> None:
        read.problems.append(problem)
        if len(read.problems) <= SHOWN_PROBLEMS:
            self.say(f"skipped {problem}")

    def _previous_build(self) -> tuple[dict[str, str], dict[str, dict[str, list]]]:
        """(path -> sha256, path -> its passages as columns) of the last complete build, if any."""
        if self.previous is None:
            return {}, {}
        local = self.index.read_table(FILES)
        passages = self.index.read_table(PASSAGES)
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


@dataclass
class FileRead:
    """One file read and chunked, wherever that ran: its sha256, and its passages unless it is reused."""

    digest: str | None = None
    size: int = 0
    error: str | None = None  # it could not be read at all
    reused: bool = False  # unchanged since the last build: its passages are kept, it was not parsed
    rows: dict[str, list] = field(default_factory=lambda: {name: [] for name in PASSAGE_SCHEMA.names})
    problems: list[Problem] = field(default_factory=list)


def read_and_chunk(fs: pafs.FileSystem, files: list[CorpusFile], reuse: dict[str, str], columns: RecordColumns,
                   chunking: ChunkSettings) -> list[FileRead]:
    """Read, parse and chunk ``files`` (``reuse``: path -> the sha256 whose passages are kept): a task's work."""
    out = []
    for f in files:
        try:
            with fs.open_input_stream(f.full) as stream:
                raw = stream.read()
        except OSError as exc:
            out.append(FileRead(error=f"cannot read ({getattr(exc, 'strerror', None) or exc})"))
            continue
        got = FileRead(digest=file_digest(raw), size=len(raw))
        if reuse.get(f.path) == got.digest:
            got.reused = True
        else:
            docs, got.problems = parse_bytes(f.path, f.kind, raw, columns)
            chunks = [c for doc in docs for c in chunk_document(doc, chunking)]
            got.rows = {name: [getattr(c, name) for c in chunks] for name in PASSAGE_SCHEMA.names}
        out.append(got)
    return out


def read_files(corpus: Corpus, reuse: dict[str, str], columns: RecordColumns,
               chunking: ChunkSettings) -> list[FileRead]:
    """:func:`read_and_chunk` over the corpus, in its order: as Ray tasks over groups of files when Ray is up
    and the files are where workers can open them (not an in-process ``memory://`` store), else here."""
    import ray

    if not ray.is_initialized() or isinstance(corpus.fs, pafs.PyFileSystem) or len(corpus.files) < 2:
        return read_and_chunk(corpus.fs, corpus.files, reuse, columns, chunking)
    groups, size = [[]], 0
    for f in corpus.files:
        if groups[-1] and (len(groups[-1]) >= FILES_PER_TASK or size + f.size > BYTES_PER_TASK):
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += f.size
    task = ray.remote(read_and_chunk)
    refs = [task.remote(corpus.fs, group, {f.path: reuse[f.path] for f in group if f.path in reuse}, columns,
                        chunking) for group in groups]
    return [got for part in ray.get(refs) for got in part]


def _file_row(f: CorpusFile, sha256: str | None, size: int, passages: int, error: str | None) -> dict:
    """A row of files.parquet."""
    return {"path": f.path, "sha256": sha256, "bytes": size, "kind": f.kind, "passages": passages, "error": error}
