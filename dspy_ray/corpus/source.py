"""A corpus as a Ray Data dataset read on the workers: one read task per table file or per range of a large
one (:mod:`~dspy_ray.corpus.split`), or per group of documents.

The driver lists the files (names and sizes) and plans the read tasks; each task opens its file
on a worker (local disk, or the object store straight from the worker) and yields blocks of
``rows_per_block`` normalized rows as it reads them, so the first rows reach the first stage while
the rest of the corpus is still being read and the driver never holds a row.  A jsonl or parquet file
larger than the range size is read by several tasks at once, with the rows, ids and messages a whole
read gives; a csv file is always read whole (a quoted field may hold a line break)::

    >>> found = discover(InputSpec("s3://bucket/calls/", text_column="transcript"))   # doctest: +SKIP
    >>> ds = corpus_dataset(found, InputSpec(...), rows_per_block=64)                  # doctest: +SKIP
    >>> ds.map_batches(...).write_parquet("s3://bucket/out/")                          # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from dspy_ray.corpus.listing import InputFiles
from dspy_ray.corpus.rows import documents_rows, file_rows
from dspy_ray.corpus.spec import DOCUMENTS, InputError, InputSpec
from dspy_ray.corpus.split import (
    BYTES_PER_TASK,
    Part,
    number_lines,
    range_size,
    split_file,
    whole,
)

GroupReader = Callable[[list[Part], str, pafs.FileSystem, InputSpec, int], Iterator[pa.Table]]
DOCS_PER_TASK = 64  # documents one read task reads at most (they are small; the task overhead is not)


def read_rows(parts: list[Part], fmt: str, fs: pafs.FileSystem, spec: InputSpec,
              rows_per_block: int, types: dict[str, str] | None = None) -> Iterator[pa.Table]:
    """The normalized rows of a group of files or parts (what a read task yields); ``types``: see
    :func:`~dspy_ray.corpus.rows.file_rows`."""
    if fmt == DOCUMENTS:
        yield from documents_rows([p.file for p in parts], fs, spec, rows_per_block)
        return
    for part in parts:
        yield from file_rows(part, fs, spec, rows_per_block, types=types)


def plan_groups(found: InputFiles, parallelism: int, *, split_bytes: int | None = None,
                min_split_bytes: int | None = None) -> list[list[Part]]:
    """Table files one per task, a large jsonl or parquet file in ranges (at most ``split_bytes``, at least
    ``min_split_bytes``: see :func:`~dspy_ray.corpus.split.range_size`); documents in groups, enough of them
    to use ``parallelism`` workers.  Pure planning: :func:`~dspy_ray.corpus.split.number_lines` then
    numbers the jsonl ranges."""
    if found.format != DOCUMENTS:
        size = range_size(found.bytes, parallelism, split_bytes, min_split_bytes)
        return [[part] for f in found.files for part in split_file(f, size)]
    per_task = max(1, min(DOCS_PER_TASK, -(-len(found.files) // max(parallelism, 1))))
    groups: list[list[Part]] = [[]]
    size = 0
    for f in found.files:
        if groups[-1] and (len(groups[-1]) >= per_task or size + f.size > BYTES_PER_TASK):
            groups.append([])
            size = 0
        groups[-1].append(whole(f))
        size += f.size
    return groups


def read_parallelism(asked: int) -> int:
    """Read tasks worth planning: at most twice the cluster's CPUs (Ray Data asks for ~200 whatever the
    cluster; cutting files finer than the CPUs can read them only adds tasks), at most ``asked``."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0
    return max(1, min(asked, 2 * cpus)) if cpus else asked


class CorpusSource(Datasource):
    """Ray Data datasource over the files :func:`~dspy_ray.corpus.listing.discover` found."""

    def __init__(self, found: InputFiles, spec: InputSpec, rows_per_block: int, reader: GroupReader = read_rows,
                 split_bytes: int | None = None, min_split_bytes: int | None = None):
        self.found, self.spec, self.rows_per_block, self.reader = found, spec, rows_per_block, reader
        self.split = {"split_bytes": split_bytes, "min_split_bytes": min_split_bytes}
        self.planned: dict[tuple, list[list[Part]]] = {}  # Ray Data asks more than once: count ranges once

    def estimate_inmemory_data_size(self) -> int:
        return self.found.bytes

    def plan(self, parallelism: int) -> list[list[Part]]:
        groups = plan_groups(self.found, read_parallelism(parallelism), **self.split)
        key = tuple((p.file.full, p.start, p.end, i) for i, group in enumerate(groups) for p in group)
        if key not in self.planned:
            self.planned[key] = number_lines(groups, self.found.fs)
        return self.planned[key]

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        tasks = []
        for group in self.plan(parallelism):
            read = functools.partial(self.reader, group, self.found.format, self.found.fs, self.spec,
                                     self.rows_per_block)
            meta = BlockMetadata(num_rows=None, size_bytes=sum(p.end - p.start for p in group), exec_stats=None,
                                 input_files=tuple(dict.fromkeys(p.file.full for p in group)))
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "ReadCorpus"


def corpus_dataset(found: InputFiles, spec: InputSpec, *, rows_per_block: int = 256,
                   reader: GroupReader = read_rows, types: dict[str, str] | None = None,
                   split_bytes: int | None = None, min_split_bytes: int | None = None, blocks: int | None = None):
    """The corpus as a dataset read on the workers (``reader``: what each read task yields; ``types``: the
    columns' types the pre-pass found, so every block has one schema; ``split_bytes``, ``min_split_bytes``:
    see :func:`plan_groups`; ``blocks``: at least this many blocks, each read task's output cut evenly).
    Without ``types`` each block infers its own: a jsonl column whose values change type between blocks then
    fails the write."""
    import ray

    if types:
        reader = functools.partial(reader, types=types)
    source = CorpusSource(found, spec, rows_per_block, reader, split_bytes, min_split_bytes)
    return ray.data.read_datasource(source, **({"override_num_blocks": blocks} if blocks else {}))


def input_error_in(exc: BaseException) -> InputError | None:
    """The :class:`InputError` a read task raised, out of the Ray errors that wrap it (None if there is none)."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is InputError:
            return e
        cause = getattr(e, "cause", None)
        stack.extend([e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None])
    return None
