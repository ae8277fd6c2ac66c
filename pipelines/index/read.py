"""Step 2 of a build: read and chunk every corpus file, or reuse its passages when it has not changed.

Files are read, parsed (PDF, Word, mail ... through :mod:`dspy_ray.corpus.documents`, the reader the
batch pipeline uses) and chunked in Ray tasks over groups of files when Ray is already up (a cluster
job) and the workers can open both the corpus and the index folder; else the same code runs here,
group after group.  Each task writes its group's passages as one parquet part in the index folder
(:mod:`~pipelines.index.parts`) and sends back only a row of ``files.parquet`` per file and the
problems it met: the passages' texts never reach this process.

A file whose sha256 is the one the last complete build recorded, and whose passages all made it
into that index, keeps its passages without being parsed: its task copies them from the previous
``passages.parquet`` (read with a filter on ``file``, so only the row groups that hold them).
Unreadable, undecodable or empty files and bad records are reported by name (the first
:data:`SHOWN_PROBLEMS`), counted, and kept for ``errors.parquet``::

    >>> index = IndexDir.at(options.index)                                              # doctest: +SKIP
    >>> parts = PassageParts.start(index)                                               # doctest: +SKIP
    >>> read = CorpusReader(options, index, None, summary, say).read(corpus, parts)     # doctest: +SKIP
    >>> read.parts.total, read.files[0]                                                 # doctest: +SKIP
    (463, {'path': 'animal_services/animal_services_overview.md', 'sha256': '1113547b…', 'bytes': 4016,
           'kind': 'md', 'passages': 10, 'error': None})
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dspy_ray.retrieval.manifest import ERRORS, FILES, PASSAGES, IndexManifest
from dspy_ray.retrieval.passages import PASSAGE_SCHEMA
from dspy_ray.retrieval.store import workers_reach
from pipelines.chunking import ChunkSettings, chunk_document
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
from pipelines.index.parts import PassageParts, write_part

FILES_PER_TASK = 32  # files one read task parses and chunks at most
BYTES_PER_TASK = 64 << 20  # and at most this many bytes of them
SHOWN_PROBLEMS = 20  # problems printed one per line; the rest are counted (all are in errors.parquet)


@dataclass
class CorpusRead:
    """What reading the corpus hands the next steps: where the passages are, and what there is to say of each file."""

    parts: PassageParts
    files: list[dict] = field(default_factory=list)  # the rows of files.parquet, in corpus order
    problems: list[Problem] = field(default_factory=list)  # unreadable files and bad records


class CorpusReader:
    """Reads a corpus into passage parts, counting new, changed, unchanged and removed files in ``summary``."""

    def __init__(self, options: IndexOptions, index: IndexDir, previous: IndexManifest | None,
                 summary: IndexSummary, say: Callable[[str], None]):
        self.options, self.index, self.previous, self.summary, self.say = options, index, previous, summary, say

    def read(self, corpus: Corpus, parts: PassageParts) -> CorpusRead:
        """Every file's passages, written to ``parts``; :class:`CorpusError` when no file gave one."""
        shas, reusable = self._previous_build()
        read = CorpusRead(parts)
        self.summary.ignored, self.summary.unsupported = corpus.ignored, corpus.unsupported
        reuse = {path: shas[path] for path in reusable if path in shas}
        tasks = read_tasks(corpus, reuse, self.options, parts)
        for f, got in zip(corpus.files, run_read_tasks(tasks, parts)):
            self._read_file(f, got, shas, read)
        self._summarize(corpus, shas, read)
        return read

    def _read_file(self, f: CorpusFile, got: FileRead, shas: dict[str, str], read: CorpusRead) -> None:
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
            read.files.append(_file_row(f, got.digest, got.size, got.passages, None))
            return
        for problem in got.problems:
            self._problem(problem, read)
        file_problem = next((p.reason for p in got.problems if p.kind == "file"), None)
        read.files.append(_file_row(f, got.digest, got.size, got.passages, file_problem))

    def _summarize(self, corpus: Corpus, shas: dict[str, str], read: CorpusRead) -> None:
        s = self.summary
        s.removed_files = len(set(shas) - {f.path for f in corpus.files})
        s.skipped = [p for p in read.problems if p.kind == "file"]
        s.records_skipped = sum(p.kind == "record" for p in read.problems)
        s.files = sum(1 for f in read.files if f["error"] is None)
        if len(read.problems) > SHOWN_PROBLEMS:
            self.say(f"... and {len(read.problems) - SHOWN_PROBLEMS} more problems (all in {ERRORS})")
        if not read.parts.total:
            raise CorpusError(f"corpus {self.options.corpus}: no passages to index: "
                              f"{len(s.skipped)} of {len(corpus.files)} files skipped "
                              f"({'; '.join(str(p) for p in s.skipped[:3])})")

    def _problem(self, problem: Problem, read: CorpusRead) -> None:
        read.problems.append(problem)
        if len(read.problems) <= SHOWN_PROBLEMS:
            self.say(f"skipped {problem}")

    def _previous_build(self) -> tuple[dict[str, str], set[str]]:
        """(path -> sha256, the paths whose passages can be reused) of the last complete build, if any."""
        if self.previous is None:
            return {}, set()
        local = self.index.read_table(FILES)
        counts = self._previous_counts()
        if local is None or counts is None:
            return {}, set()
        files = local.to_pylist()
        shas = {f["path"]: f["sha256"] for f in files if f["sha256"]}
        # Reuse a file's passages only if all of them made it into the index: one whose embedding
        # failed last time is missing from passages.parquet, so that file is read and chunked again.
        return shas, {f["path"] for f in files if f["error"] is None and counts.get(f["path"]) == f["passages"]}

    def _previous_counts(self) -> dict[str, int] | None:
        """path -> its passages in the last build's passages.parquet, from its ``file`` column, batch by batch;
        None when it is missing or unreadable."""
        counts: dict[str, int] = {}
        try:
            with self.index.fs.open_input_file(self.index.path(PASSAGES)) as f:
                for batch in pq.ParquetFile(f).iter_batches(columns=["file"]):
                    for row in pc.value_counts(batch.column(0)).to_pylist():
                        counts[row["values"]] = counts.get(row["values"], 0) + row["counts"]
        except (FileNotFoundError, pa.ArrowInvalid, OSError):
            return None
        return counts


@dataclass
class FileRead:
    """One file read and chunked, wherever that ran: its sha256 and how many passages it gave (or kept)."""

    digest: str | None = None
    size: int = 0
    error: str | None = None  # it could not be read at all
    reused: bool = False  # unchanged since the last build: its passages are kept, it was not parsed
    passages: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class ReadTask:
    """One read task's work: a group of corpus files, and the part their passages go to."""

    fs: pafs.FileSystem  # the corpus's
    files: list[CorpusFile]
    reuse: dict[str, str]  # path -> the sha256 whose passages the last build holds whole
    columns: RecordColumns
    chunking: ChunkSettings
    index: str  # the index folder
    part: str  # where the passages go, on the index folder's filesystem


def read_and_chunk(task: ReadTask) -> list[FileRead]:
    """Read, parse and chunk ``task.files`` (or keep a reused file's passages) and write their passages as
    ``task.part``; what each file gave, in order: a read task's work."""
    out: list[FileRead] = []
    pieces: list[pa.Table | str] = []  # each file's passages, or the path of a reused file (its passages kept)
    for f in task.files:
        try:
            with task.fs.open_input_stream(f.full) as stream:
                raw = stream.read()
        except OSError as exc:
            out.append(FileRead(error=f"cannot read ({getattr(exc, 'strerror', None) or exc})"))
            continue
        got = FileRead(digest=file_digest(raw), size=len(raw))
        if task.reuse.get(f.path) == got.digest:
            got.reused = True
            pieces.append(f.path)
        else:
            docs, got.problems = parse_bytes(f.path, f.kind, raw, task.columns)
            chunks = [c for doc in docs for c in chunk_document(doc, task.chunking)]
            pieces.append(pa.table({name: [getattr(c, name) for c in chunks] for name in PASSAGE_SCHEMA.names},
                                   schema=PASSAGE_SCHEMA))
            got.passages = len(chunks)
        out.append(got)
    reused = [p for p in pieces if isinstance(p, str)]
    kept = _previous_passages(task.index, reused) if reused else {}
    for f, got in zip(task.files, out):
        if got.reused:
            got.passages = kept[f.path].num_rows
    tables = [kept[p] if isinstance(p, str) else p for p in pieces]
    write_part(task.index, task.part, pa.concat_tables(tables) if tables else PASSAGE_SCHEMA.empty_table())
    return out


def _previous_passages(index: str, paths: list[str]) -> dict[str, pa.Table]:
    """path -> its passages in the last build's passages.parquet, in their order there."""
    where = IndexDir.at(index)
    table = pq.read_table(where.path(PASSAGES), filesystem=where.fs, filters=pc.field("file").isin(paths))
    table = table.select(PASSAGE_SCHEMA.names).cast(PASSAGE_SCHEMA)
    return {path: table.filter(pc.equal(table.column("file"), path)) for path in paths}


def read_tasks(corpus: Corpus, reuse: dict[str, str], options: IndexOptions, parts: PassageParts) -> list[ReadTask]:
    """The corpus cut into groups of at most :data:`FILES_PER_TASK` files and :data:`BYTES_PER_TASK` bytes,
    in its order; task i writes part i."""
    groups: list[list[CorpusFile]] = [[]]
    size = 0
    for f in corpus.files:
        if groups[-1] and (len(groups[-1]) >= FILES_PER_TASK or size + f.size > BYTES_PER_TASK):
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += f.size
    return [ReadTask(corpus.fs, group, {f.path: reuse[f.path] for f in group if f.path in reuse}, options.columns,
                     options.chunking, parts.location, parts.path(i))
            for i, group in enumerate(groups) if group]


def run_read_tasks(tasks: list[ReadTask], parts: PassageParts) -> list[FileRead]:
    """Run ``tasks``, adding their parts to ``parts``; every file's :class:`FileRead`, in corpus order.

    As Ray tasks (Ray started or connected here if it is not yet: a cluster job's driver reads on the
    workers) when there is more than one task and the workers can open the corpus and the index folder
    (not an in-process ``memory://`` store), else here, one after another."""
    import ray

    here = (len(tasks) < 2  # every task has a file: two tasks are at least two files
            or isinstance(tasks[0].fs, pafs.PyFileSystem) or not workers_reach(parts.location))
    if not here and not ray.is_initialized():
        # More than one task's files: read in parallel.  A cluster job's driver connects to its cluster
        # here; a local run starts Ray, which the embedding step would start anyway.
        from dspy_ray.util.ray_runtime import init_ray

        init_ray()
    if here:
        results = [read_and_chunk(task) for task in tasks]
    else:
        run = ray.remote(read_and_chunk)
        results = ray.get([run.remote(task) for task in tasks])
    for task, got in zip(tasks, results):
        parts.add(task.part, sum(f.passages for f in got))
    if not here:
        parts.check()
    return [f for got in results for f in got]


def _file_row(f: CorpusFile, sha256: str | None, size: int, passages: int, error: str | None) -> dict:
    """A row of files.parquet."""
    return {"path": f.path, "sha256": sha256, "bytes": size, "kind": f.kind, "passages": passages, "error": error}
