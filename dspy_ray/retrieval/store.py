"""The embedding store of an index folder: content hash -> vector, in parquet shards under ``embeddings/``.

Shards are written whole or not at all (:func:`dspy_ray.util.fs.write_bytes`: a temporary
name, then renamed), so a killed build keeps what it finished and ``--resume`` embeds only
the rest.  The embedding actors write them (:class:`ShardSink`: one shard per batch, named
by the actor, written before the batch's result is handed on); a :class:`StoreWriter`
buffers rows into shards in the process that holds them (compaction; an index folder the
workers cannot reach).  Keyed by the hash of the embedded text, a vector is reused
whatever file or chunk number the text has now: an edited file re-embeds only the
passages whose text changed.  A hash found in two shards (an actor lost after writing, its
batch done again) is read from the first.

    >>> store = EmbeddingStore("out/index")                       # doctest: +SKIP
    >>> done = store.hashes()                                     # set of hex digests
    >>> with store.writer(dim=384) as w:                          # doctest: +SKIP
    ...     w.add(["9f.."], vectors)                              # a shard written every 8192 rows
    >>> plan = store.plan({"9f..": [0, 7]})                       # doctest: +SKIP
    >>> plan[0].ids, store.take(plan[0], dim=384)[1].shape        # doctest: +SKIP
    (array([0, 7]), (2, 384))
"""

from __future__ import annotations

import itertools
import json
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dspy_ray.util.fs import filesystem_for, list_files, read_bytes, write_bytes
from dspy_ray.retrieval.manifest import BUILD_STATE, EMBEDDINGS_DIR, RetrievalIndexError, join

logger = logging.getLogger(__name__)

SHARD_ROWS = 8192
QUARANTINE = "_unreadable"


def _schema(dim: int) -> pa.Schema:
    return pa.schema([("hash", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


def as_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def shard_bytes(hashes: Sequence[str], vectors: np.ndarray, dim: int) -> bytes:
    """One shard's parquet file: ``hashes`` and their ``vectors`` (float32, ``dim`` wide)."""
    flat = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)
    table = pa.table({"hash": pa.array(list(hashes), pa.string()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)}, schema=_schema(dim))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def workers_reach(location: str) -> bool:
    """Whether Ray workers can open ``location`` themselves: not an in-process (fsspec ``memory://``) store.

    The rule the corpus reader uses too; a local path must then be the same folder on every node
    (one machine, or a shared filesystem), which :meth:`ShardSink.check` verifies."""
    return not isinstance(filesystem_for(location)[0], pafs.PyFileSystem)


@dataclass(frozen=True)
class ShardTake:
    """What one shard gives an index: its rows to read, one per wanted hash, and the index rows each fills.

    ``np.repeat(rows, repeats)`` are the shard rows in the order of ``ids``: a text shared by
    several passages fills each of their rows with the same vector."""

    path: str
    position: int  # the shard's place in the store's sorted listing (it seeds the shard's training sample)
    rows: np.ndarray  # int64 rows of the shard, one per distinct hash
    repeats: np.ndarray  # int64, index rows per distinct hash
    ids: np.ndarray  # int64 index rows

    @property
    def vectors(self) -> int:
        return len(self.ids)


def _takes(hashes: Sequence[str], wanted: Mapping[str, Sequence[int]], placed: set[str]
           ) -> tuple[list[int], list[int], list[int]]:
    """(shard rows, index rows per shard row, index rows) of ``hashes`` wanted and not ``placed`` yet."""
    rows, repeats, ids = [], [], []
    for i, h in enumerate(hashes):
        targets = wanted.get(h)
        if targets is not None and h not in placed:
            placed.add(h)
            rows.append(i)
            repeats.append(len(targets))
            ids.extend(targets)
    return rows, repeats, ids


def _sample_rows(count: int, rate: float, seed: int, position: int) -> np.ndarray:
    """Which of a shard's ``count`` distinct vectors go in the training sample: a draw of its own per shard,
    so the sample is the same whether one process reads every shard or tasks read a few each."""
    return np.random.default_rng((seed, position)).random(count) < rate


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
            rows, repeats, ids = _takes(table.column("hash").to_pylist(), wanted, placed)
            if rows:
                matrix = as_matrix(table.column("vector"), dim)
                yield np.asarray(ids, dtype=np.int64), matrix[np.repeat(rows, repeats)]

    def plan(self, wanted: Mapping[str, Sequence[int]]) -> list[ShardTake]:
        """What each shard gives an index of ``wanted`` (hash -> index rows), reading hashes only.

        The same rows, ids and order as :meth:`vectors`, so tasks reading a few shards each with
        :meth:`take` build what one process reading them all would."""
        placed: set[str] = set()
        plan = []
        for position, path in enumerate(self.shards()):
            table = self._read(path, ["hash"])
            if table is None:
                continue
            rows, repeats, ids = _takes(table.column("hash").to_pylist(), wanted, placed)
            if rows:
                plan.append(ShardTake(path, position, np.asarray(rows, dtype=np.int64),
                                      np.asarray(repeats, dtype=np.int64), np.asarray(ids, dtype=np.int64)))
        return plan

    def take(self, shard: ShardTake, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(index rows, vectors) of one planned shard."""
        table = pq.read_table(shard.path, columns=["vector"], filesystem=self.fs)
        return shard.ids, as_matrix(table.column("vector"), dim)[np.repeat(shard.rows, shard.repeats)]

    def take_sample(self, shard: ShardTake, rate: float, dim: int, seed: int = 0) -> np.ndarray:
        """A planned shard's part of :meth:`sample` (``rate``: the share of distinct vectors kept)."""
        table = pq.read_table(shard.path, columns=["vector"], filesystem=self.fs)
        return as_matrix(table.column("vector"), dim)[shard.rows[_sample_rows(len(shard.rows), rate, seed,
                                                                              shard.position)]]

    def sample(self, wanted: Mapping[str, Sequence[int]], size: int, dim: int, seed: int = 0) -> np.ndarray:
        """About ``size`` distinct vectors of ``wanted``, drawn evenly from every shard (for IVF/PQ training)."""
        total = len(wanted)
        if size <= 0 or not total:
            return np.zeros((0, dim), dtype=np.float32)
        rate = min(1.0, size / total)
        parts = []
        for position, _, vectors in self._distinct(wanted, dim):
            parts.append(vectors[_sample_rows(len(vectors), rate, seed, position)])
        sample = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
        return sample[:size]

    def _distinct(self, wanted: Mapping[str, Sequence[int]], dim: int
                  ) -> Iterator[tuple[int, list[str], np.ndarray]]:
        """(shard position, hashes, their vectors) of each shard's wanted hashes not seen in an earlier shard."""
        seen: set[str] = set()
        for position, path in enumerate(self.shards()):
            table = self._read(path, ["hash", "vector"])
            if table is None:
                continue
            hashes = table.column("hash").to_pylist()
            take = [i for i, h in enumerate(hashes) if h in wanted and h not in seen]
            seen.update(hashes[i] for i in take)
            if take:
                yield position, [hashes[i] for i in take], as_matrix(table.column("vector"), dim)[np.asarray(take)]

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
            for _, hashes, vectors in self._distinct(dict.fromkeys(live, ()), dim):
                w.add(hashes, vectors)
        for path in shards:  # the new shards are complete: the old ones can go
            self.fs.delete_file(path)
        return stored - len(live)

    def drop_partial(self) -> int:
        """Delete what killed writers left (``.tmp-*``: never a shard); call it only when no writer runs."""
        try:
            listing = list_files(self.fs, self.root, recursive=False)
        except FileNotFoundError:
            return 0
        partial = [f.full for f in listing.files if f.path.startswith(".tmp-")]
        for path in partial:
            self.fs.delete_file(path)
        return len(partial)

    def write_shard(self, name: str, hashes: Sequence[str], vectors: np.ndarray, dim: int) -> None:
        """Write one whole shard ``name`` (``part-*.parquet``): a temporary name, then renamed."""
        write_bytes(self.fs, join(self.root, name), shard_bytes(hashes, vectors, dim))

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
        self.store.write_shard(f"part-{self.run}-{self.count:05d}.parquet", self._hashes,
                               np.concatenate(self._vectors), self.dim)
        self.count += 1
        self.written += self._buffered
        self._hashes, self._vectors, self._buffered = [], [], 0

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.flush()  # what finished is kept, even when the run fails


class StoreNotSharedError(RetrievalIndexError):
    """An embedding actor cannot see the build's index folder (a local path on another node)."""


class ShardSink:
    """Where one embedding actor writes: a whole shard per batch (at most ``rows`` rows each), named by the actor.

    Made in the actor from :meth:`config`, so the vectors go from the actor to the store and only
    (hash, error) rows go back to the build.  ``run`` is the build's token in ``build.json``:
    :meth:`check` refuses an index folder this node does not share with the build.

        >>> sink = ShardSink(**ShardSink.config("out/idx", dim=384, run="3f9c"))   # doctest: +SKIP
        >>> sink.check(); sink.write(["9f.."], vectors)                          # doctest: +SKIP
        1
    """

    def __init__(self, index: str, dim: int, rows: int = SHARD_ROWS, run: str = ""):
        self.index, self.dim, self.rows, self.run = index, dim, rows, run
        self.store = EmbeddingStore(index)
        self.prefix = f"part-{uuid.uuid4().hex[:12]}"  # this actor's; a batch done again elsewhere gets another
        self._numbers = itertools.count()  # batches write from several threads at once: next() hands out names
        self.checked = False

    @staticmethod
    def config(index: str, dim: int, rows: int = SHARD_ROWS, run: str = "") -> dict:
        """The constructor's arguments, to hand an actor."""
        return {"index": index, "dim": dim, "rows": rows, "run": run}

    def check(self) -> None:
        """Raise :class:`StoreNotSharedError` unless ``build.json`` here is this build's (once per sink)."""
        if self.checked or not self.run:
            return
        fs, root = filesystem_for(self.index)
        raw = read_bytes(fs, join(root, BUILD_STATE))
        if raw is None or json.loads(raw).get("run") != self.run:
            import socket

            raise StoreNotSharedError(
                f"index {self.index}: the embedding actor on {socket.gethostname()} does not see this build's "
                f"{BUILD_STATE} there; the actors write the embedding store themselves, so --index must be "
                f"object storage (s3://, gs://) or a folder every node shares")
        self.checked = True

    def write(self, hashes: Sequence[str], vectors: np.ndarray) -> int:
        """Write ``hashes``' vectors as whole shards before returning; how many shards."""
        written = 0
        for start in range(0, len(hashes), self.rows):
            self.store.write_shard(f"{self.prefix}-{next(self._numbers):05d}.parquet",
                                   hashes[start:start + self.rows], vectors[start:start + self.rows], self.dim)
            written += 1
        return written
