"""The embedding store of an index folder: content hash -> vector, in parquet shards under ``embeddings/``.

A build writes a shard every few thousand vectors, each whole or not at all
(:func:`dspy_ray.util.fs.write_bytes`), so a killed build keeps what it finished and
``--resume`` embeds only the rest.  Keyed by the hash of the embedded text, a
vector is reused whatever file or chunk number the text has now: an edited file
re-embeds only the passages whose text changed.

    >>> store = EmbeddingStore("out/index")                       # doctest: +SKIP
    >>> done = store.hashes()                                     # set of hex digests
    >>> with store.writer(dim=384) as w:                          # doctest: +SKIP
    ...     w.add(["9f.."], vectors)                              # a shard written every 8192 rows
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dspy_ray.util.fs import filesystem_for, list_files, write_bytes
from dspy_ray.retrieval.manifest import EMBEDDINGS_DIR, join

logger = logging.getLogger(__name__)

SHARD_ROWS = 8192
QUARANTINE = "_unreadable"


def _schema(dim: int) -> pa.Schema:
    return pa.schema([("hash", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


def as_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


class EmbeddingStore:
    def __init__(self, index: str):
        self.fs, root = filesystem_for(index)
        self.root = join(root, EMBEDDINGS_DIR)

    def shards(self) -> list[str]:
        """The store's shard files, sorted; none when the store folder does not exist yet."""
        try:
            listing = list_files(self.fs, self.root, recursive=False)
        except FileNotFoundError:
            return []
        return [f.full for f in listing.files if f.full.endswith(".parquet")]

    def _read(self, path: str, columns: list[str]) -> pa.Table | None:
        """A shard's columns; an unreadable one (a crash mid-copy on some object stores) is set aside."""
        try:
            return pq.read_table(path, columns=columns, filesystem=self.fs)
        except (pa.ArrowInvalid, OSError) as exc:
            aside = join(self.root, QUARANTINE)
            self.fs.create_dir(aside, recursive=True)
            self.fs.move(path, join(aside, path.rsplit("/", 1)[-1]))
            logger.warning("set aside unreadable embedding shard %s (%s); its passages will be embedded again",
                           path, exc)
            return None

    def hashes(self) -> set[str]:
        found: set[str] = set()
        for path in self.shards():
            table = self._read(path, ["hash"])
            if table is not None:
                found.update(table.column("hash").to_pylist())
        return found

    def dim(self) -> int | None:
        for path in self.shards():
            with self.fs.open_input_file(path) as f:
                vector_type = pq.read_schema(f).field("vector").type
            return vector_type.list_size
        return None

    def vectors(self, wanted: Mapping[str, Sequence[int]], dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids, vectors) for every row of ``wanted`` (hash -> index rows), one shard at a time."""
        placed: set[str] = set()
        for path in self.shards():
            table = self._read(path, ["hash", "vector"])
            if table is None:
                continue
            hashes = table.column("hash").to_pylist()
            take, ids = [], []
            for i, h in enumerate(hashes):
                rows = wanted.get(h)
                if rows is not None and h not in placed:
                    placed.add(h)
                    take.extend([i] * len(rows))
                    ids.extend(rows)
            if take:
                matrix = as_matrix(table.column("vector"), dim)
                yield np.asarray(ids, dtype=np.int64), matrix[np.asarray(take)]

    def sample(self, wanted: Mapping[str, Sequence[int]], size: int, dim: int, seed: int = 0) -> np.ndarray:
        """About ``size`` distinct vectors of ``wanted``, drawn evenly from every shard (for IVF/PQ training)."""
        total = len(wanted)
        if size <= 0 or not total:
            return np.zeros((0, dim), dtype=np.float32)
        rate = min(1.0, size / total)
        rng = np.random.default_rng(seed)
        parts = []
        for _, vectors in self._distinct(wanted, dim):
            keep = rng.random(len(vectors)) < rate
            parts.append(vectors[keep])
        sample = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
        return sample[:size]

    def _distinct(self, wanted: Mapping[str, Sequence[int]], dim: int) -> Iterator[tuple[list[str], np.ndarray]]:
        seen: set[str] = set()
        for path in self.shards():
            table = self._read(path, ["hash", "vector"])
            if table is None:
                continue
            hashes = table.column("hash").to_pylist()
            take = [i for i, h in enumerate(hashes) if h in wanted and h not in seen]
            seen.update(hashes[i] for i in take)
            if take:
                yield [hashes[i] for i in take], as_matrix(table.column("vector"), dim)[np.asarray(take)]

    def compact(self, live: set[str], dim: int) -> int:
        """Rewrite the store with only ``live`` hashes when a quarter or more of it is dead; rows dropped."""
        shards = self.shards()
        stored = 0
        for path in shards:
            with self.fs.open_input_file(path) as f:
                stored += pq.ParquetFile(f).metadata.num_rows
        if stored == 0 or stored - len(live) < stored / 4:
            return 0
        with self.writer(dim) as w:
            for hashes, vectors in self._distinct(dict.fromkeys(live, ()), dim):
                w.add(hashes, vectors)
        for path in shards:  # the new shards are complete: the old ones can go
            self.fs.delete_file(path)
        return stored - len(live)

    def writer(self, dim: int, rows: int = SHARD_ROWS) -> StoreWriter:
        return StoreWriter(self, dim, rows)


class StoreWriter:
    """Buffers (hash, vector) rows and writes a whole shard every ``rows`` rows, and at close."""

    def __init__(self, store: EmbeddingStore, dim: int, rows: int = SHARD_ROWS):
        self.store, self.dim, self.rows = store, dim, rows
        self.run = uuid.uuid4().hex[:8]
        self.count = 0
        self.written = 0
        self._hashes: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._buffered = 0

    def add(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        if len(hashes) == 0:
            return
        self._hashes.extend(hashes)
        self._vectors.append(np.asarray(vectors, dtype=np.float32).reshape(len(hashes), self.dim))
        self._buffered += len(hashes)
        if self._buffered >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        vectors = np.concatenate(self._vectors)
        table = pa.table({"hash": pa.array(self._hashes, pa.string()),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim)},
                         schema=_schema(self.dim))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        write_bytes(self.store.fs, join(self.store.root, f"part-{self.run}-{self.count:05d}.parquet"),
                    sink.getvalue().to_pybytes())
        self.count += 1
        self.written += self._buffered
        self._hashes, self._vectors, self._buffered = [], [], 0

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.flush()  # what finished is kept, even when the run fails
