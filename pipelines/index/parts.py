"""A build's passages while it runs: parquet parts in the index folder, one per read task (:class:`PassageParts`).

The read tasks write them (:mod:`~pipelines.index.read`), the embedding step plans from their
``hash`` columns and has Ray tasks read from them the texts it sends (:func:`embedding_rows`), and
publish streams them into ``passages.parquet`` (:mod:`~pipelines.index.publish`), one part at a
time: the build process never holds more than one part's texts (BM25 aside, which reads them all
back from the finished ``passages.parquet``).

They live in ``INDEX/.passage-parts/<run>/part-<task>.parquet``.  A task's part has a fixed name, so
a task Ray runs again (its node lost) replaces its part instead of adding a second one; each build
has a ``<run>`` of its own and drops the whole folder when it starts and when it ends, so no build
reads the parts of another (a killed one's are dropped by the next)::

    >>> parts = PassageParts.start(IndexDir.at("out/idx"))         # doctest: +SKIP
    >>> parts.path(0)                                              # doctest: +SKIP
    '/…/out/idx/.passage-parts/3f9c0a1b/part-00000.parquet'
    >>> parts.add(parts.path(0), 120); parts.total                 # doctest: +SKIP
    120
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dspy_ray.retrieval.manifest import join
from dspy_ray.retrieval.passages import PASSAGE_SCHEMA, embedding_texts
from dspy_ray.util.fs import filesystem_for, write_bytes
from pipelines.index.base import IndexDir, IndexDirError

PARTS_DIR = ".passage-parts"  # in the index folder while a build runs
ROW_GROUP = 1024  # rows per row group of a part: a task embedding a few rows reads only their groups


@dataclass
class PassageParts:
    """This build's parts, in corpus order: row i of ``passages.parquet`` (before failures are dropped) is
    row i of the parts laid end to end."""

    location: str  # the index folder
    run: str
    paths: list[str] = field(default_factory=list)  # on the index folder's filesystem
    counts: list[int] = field(default_factory=list)  # passages in each

    @classmethod
    def start(cls, index: IndexDir) -> PassageParts:
        """This build's (empty) parts, after dropping any a killed build left."""
        drop_parts(index)
        return cls(index.location, uuid.uuid4().hex[:8])

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem_for(self.location)[0]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def path(self, task: int) -> str:
        """Where read task ``task`` writes its part."""
        return join(filesystem_for(self.location)[1], f"{PARTS_DIR}/{self.run}/part-{task:05d}.parquet")

    def add(self, path: str, count: int) -> None:
        self.paths.append(path)
        self.counts.append(count)

    def check(self) -> None:
        """Raise :class:`IndexDirError` unless every part is here (a local ``--index`` a node does not share)."""
        for path, info in zip(self.paths, self.fs.get_file_info(self.paths)):
            if info.type != pafs.FileType.File:
                raise IndexDirError(f"index {self.location}: the passages of a read task, {path}, are missing "
                                    f"(written on another node?): --index must be object storage or a shared folder")

    def column(self, name: str) -> pa.ChunkedArray:
        """One column (``hash``, ``id``: the small ones) of every part, in order."""
        fs = self.fs
        chunks = [pq.read_table(path, columns=[name], filesystem=fs).column(name) for path in self.paths]
        return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], PASSAGE_SCHEMA.field(name).type)

    def tables(self) -> Iterator[pa.Table]:
        """Each part whole, one at a time."""
        fs = self.fs
        for path in self.paths:
            yield pq.read_table(path, filesystem=fs).select(PASSAGE_SCHEMA.names).cast(PASSAGE_SCHEMA)

    def drop(self) -> None:
        drop_parts(IndexDir.at(self.location))


def write_part(location: str, path: str, table: pa.Table) -> None:
    """Write a read task's part whole (a temporary name, then renamed): a task run again replaces it."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP)
    write_bytes(filesystem_for(location)[0], path, sink.getvalue().to_pybytes())


def embedding_rows(location: str, path: str, rows: np.ndarray) -> pa.Table:
    """``rows`` (sorted) of one part as the embedding stage's input: ``hash`` and ``embedding_text``;
    only the row groups that hold them are read."""
    fs = filesystem_for(location)[0]
    rows = np.asarray(rows, dtype=np.int64)
    with fs.open_input_file(path) as f:
        part = pq.ParquetFile(f)
        starts = np.cumsum([0] + [part.metadata.row_group(i).num_rows for i in range(part.num_row_groups)])
        of = np.searchsorted(starts, rows, side="right") - 1  # the row group of each row
        groups = np.unique(of)
        table = part.read_row_groups(groups.tolist(), columns=["hash", "title", "section", "text"])
    sizes = starts[groups + 1] - starts[groups]
    first = np.cumsum(np.concatenate([[0], sizes[:-1]]))  # where each group read begins in ``table``
    table = table.take(pa.array(first[np.searchsorted(groups, of)] + rows - starts[of]))
    return pa.table({"hash": table.column("hash"), "embedding_text": pa.array(embedding_texts(table), pa.string())})


def drop_parts(index: IndexDir) -> None:
    """Delete every build's parts in the index folder (done, failed or killed), if any."""
    index.drop_folder(PARTS_DIR)
