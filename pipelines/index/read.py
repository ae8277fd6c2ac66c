"""Step 2 of a build: read and chunk every corpus file, or reuse its passages when it has not changed.

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

from dspy_ray.retrieval.manifest import ERRORS, FILES, PASSAGES, IndexManifest
from dspy_ray.retrieval.passages import PASSAGE_SCHEMA
from pipelines.chunking import Chunk, chunk_document
from pipelines.documents import Corpus, CorpusError, CorpusFile, Problem, file_digest, parse_bytes
from pipelines.index.base import IndexDir, IndexOptions, IndexSummary

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
        self.summary.ignored = corpus.ignored
        for f in corpus.files:
            self._read_file(corpus, f, shas, reusable, read)
        self._summarize(corpus, shas, read)
        return read

    def _read_file(self, corpus: Corpus, f: CorpusFile, shas: dict[str, str], reusable: dict[str, dict[str, list]],
                   read: CorpusPassages) -> None:
        try:
            raw = corpus.read(f)
        except OSError as exc:
            problem = Problem(f.path, f"cannot read ({getattr(exc, 'strerror', None) or exc})")
            self._problem(problem, read)
            read.files.append(_file_row(f, None, f.size, 0, problem.reason))
            return
        digest = file_digest(raw)
        before = shas.get(f.path)
        if before is None:
            self.summary.new_files += 1 if self.previous is not None else 0
        elif before != digest:
            self.summary.changed_files += 1
        elif f.path in reusable:
            self.summary.unchanged_files += 1
            rows = reusable[f.path]
            read.passages.extend(rows)
            read.files.append(_file_row(f, digest, len(raw), len(rows["id"]), None))
            return
        docs, problems = parse_bytes(f.path, f.kind, raw, self.options.columns)
        for problem in problems:
            self._problem(problem, read)
        count = sum(read.passages.add_chunks(chunk_document(doc, self.options.chunking)) for doc in docs)
        file_problem = next((p.reason for p in problems if p.kind == "file"), None)
        read.files.append(_file_row(f, digest, len(raw), count, file_problem))

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


def _file_row(f: CorpusFile, sha256: str | None, size: int, passages: int, error: str | None) -> dict:
    """A row of files.parquet."""
    return {"path": f.path, "sha256": sha256, "bytes": size, "kind": f.kind, "passages": passages, "error": error}
