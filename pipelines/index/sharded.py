"""The FAISS index of a build, whole here or in parts on the workers: what :meth:`Publisher.publish` writes.

Below :func:`dspy_ray.retrieval.dense.builds_sharded`'s threshold (``--shard-index-above``; by
default what 4 GiB of index holds) and for flat and HNSW indexes, :func:`whole_index` builds it
in this process, streaming vectors from the embedding store shard by shard (:class:`WholeIndex`).
Above it, an IVF index is built without any process holding every vector (:class:`ShardedBuild`):

1. **plan**: which store shards hold which passages' vectors, from their hash columns only
   (:meth:`~dspy_ray.retrieval.store.EmbeddingStore.plan`), cut into parts of whole shards;
2. **sample**: Ray tasks draw the training sample from their part's shards: the sample one
   process reading every shard draws (each shard's draw is seeded by its place in the store);
3. **train** the coarse quantizer (and PQ) here, on that sample, as a whole build does;
4. **add**: a Ray task per part adds its vectors to a copy of the trained, empty index and writes
   a partial index to ``INDEX/.dense-parts/``;
5. **merge**, when the index is written (:meth:`ShardedIndex.write`): the parts' inverted lists,
   list by list, into ``index.ivfdata`` (on-disk lists, mapped by whoever searches it); publish
   then deletes the parts (:func:`drop_parts`).

Why on-disk lists rather than FAISS ``merge_from`` into one in-memory index: the merging process
would hold every vector, which is what sharding avoids; the parts are mapped, each list is copied
from them into the mapped output file, and a retriever maps that file too (the page cache shares
it between the actors of a node).  The parts share the trained quantizer, which is what lets their
lists be concatenated.

The ids are the passage rows a whole build gives them, and each list holds the parts' entries in
store order, so the merged index is the one a whole build trained on the same sample makes::

    >>> built = ShardedBuild(IndexDir.at("out/idx"), spec, dim=384, say=print).build(wanted, n)  # doctest: +SKIP
    adding 3,000,000 vectors in 64 parts of whole store shards (Ray tasks)
    >>> built.write("/tmp/staging")                                                       # doctest: +SKIP
    ('index.faiss', 'index.ivfdata')
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from dspy_ray.retrieval import dense
from dspy_ray.retrieval.manifest import FAISS_INDEX, FAISS_LISTS, join
from dspy_ray.retrieval.store import EmbeddingStore, ShardTake
from pipelines.index.base import IndexDir, IndexDirError

PARTS_DIR = ".dense-parts"  # in the index folder while a sharded build runs: the partial indexes
PART_MIN_VECTORS = 50_000  # a part is at least this many vectors (or the threshold, when smaller)


@dataclass
class WholeIndex:
    """An index built in this process."""

    index: object
    trained_on: int
    parts: int = 0
    lists_file: str | None = None

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def write(self, folder: str) -> tuple[str, ...]:
        """Write it into the local ``folder``; the names written."""
        dense.write_index(self.index, os.path.join(folder, FAISS_INDEX))
        return (FAISS_INDEX,)


def whole_index(store: EmbeddingStore, spec: dense.DenseIndexSpec, wanted: Mapping[str, Sequence[int]], n: int,
                dim: int, say: Callable[[str], None]) -> WholeIndex:
    """The index of ``wanted`` (hash -> rows) built here, vectors read shard by shard from ``store``."""
    train = store.sample(wanted, spec.train_size(n), dim) if spec.needs_training else None
    if spec.needs_training:
        say(f"training {spec.factory} on {len(train):,} of {n:,} vectors")
    index = dense.build_index(spec, dim, store.vectors(wanted, dim), train)
    return WholeIndex(index, 0 if train is None else len(train))


@dataclass
class ShardedIndex:
    """An IVF index in partial index files, merged when written (:meth:`write`)."""

    index_dir: IndexDir
    trained: object
    part_paths: list[str]  # on the index folder's filesystem, in store order
    ntotal: int
    trained_on: int
    lists_file: str = FAISS_LISTS

    @property
    def parts(self) -> int:
        return len(self.part_paths)

    def write(self, folder: str) -> tuple[str, ...]:
        """Merge the parts into ``folder`` (local): the index file and its on-disk lists; the names written."""
        fs = self.index_dir.fs
        local = isinstance(fs, pafs.LocalFileSystem)
        copies = None if local else tempfile.mkdtemp(prefix="dense-parts-")
        try:
            paths = []
            for i, path in enumerate(self.part_paths):
                if fs.get_file_info(path).type != pafs.FileType.File:
                    raise IndexDirError(f"index {self.index_dir.location}: partial index {path} is missing (written "
                                        f"on another node?): --index must be object storage or a shared folder")
                if copies is not None:  # FAISS maps local files only
                    paths.append(os.path.join(copies, f"part-{i:05d}.faiss"))
                    pafs.copy_files(path, paths[-1], source_filesystem=fs,
                                    destination_filesystem=pafs.LocalFileSystem())
                else:
                    paths.append(path)
            merged = dense.merge_parts(self.trained, paths, os.path.join(folder, self.lists_file))
            if merged.ntotal != self.ntotal:
                raise RuntimeError(f"sharded index: {merged.ntotal} vectors merged, {self.ntotal} added")
            dense.write_index(merged, os.path.join(folder, FAISS_INDEX))
            del merged
        finally:
            if copies is not None:
                shutil.rmtree(copies, ignore_errors=True)
        return FAISS_INDEX, self.lists_file


def drop_parts(index: IndexDir) -> None:
    """Delete the partial indexes of a sharded build (done, failed or killed), if any."""
    index.drop_folder(PARTS_DIR)


class ShardedBuild:
    """Plan, sample, train and add (see the module docstring); :meth:`build` returns the unmerged index."""

    def __init__(self, index: IndexDir, spec: dense.DenseIndexSpec, dim: int, say: Callable[[str], None],
                 above: int | None = None):
        self.index, self.spec, self.dim, self.say = index, spec, dim, say
        self.above = above or dense.shard_above(spec, dim)

    def build(self, wanted: Mapping[str, Sequence[int]], n: int) -> ShardedIndex:
        import ray

        from dspy_ray.util.ray_runtime import init_ray

        init_ray()
        store = EmbeddingStore(self.index.location)
        groups = self._groups(store.plan(wanted), n, int(ray.cluster_resources().get("CPU", 1)))
        trained, trained_on = self._train(groups, wanted, n)
        parts_dir = self.index.path(PARTS_DIR)
        drop_parts(self.index)  # a killed build's
        self.say(f"adding {n:,} vectors in {len(groups):,} parts of whole store shards (Ray tasks)")
        trained_ref = ray.put(dense_bytes(trained))
        paths = [join(parts_dir, f"part-{i:05d}.faiss") for i in range(len(groups))]
        task = ray.remote(add_part).options(num_cpus=1)
        counts = ray.get([task.remote(self.index.location, group, self.dim, trained_ref, path)
                          for group, path in zip(groups, paths)])
        if sum(counts) != n:
            raise RuntimeError(f"index build: {sum(counts)} vectors for {n} passages (embedding store incomplete)")
        return ShardedIndex(self.index, trained, paths, sum(counts), trained_on)

    def _groups(self, plan: list[ShardTake], n: int, cpus: int) -> list[list[ShardTake]]:
        """The plan cut into parts of consecutive shards, each at most ``per_part`` vectors (or one shard)."""
        planned = sum(s.vectors for s in plan)
        if planned != n:
            raise RuntimeError(f"index build: {planned} vectors in the store for {n} passages "
                               f"(embedding store incomplete)")
        per_part = min(self.above, max(PART_MIN_VECTORS, math.ceil(n / max(1, cpus))))
        groups: list[list[ShardTake]] = [[]]
        size = 0
        for shard in plan:
            if groups[-1] and size + shard.vectors > per_part:
                groups.append([])
                size = 0
            groups[-1].append(shard)
            size += shard.vectors
        return groups

    def _train(self, groups: list[list[ShardTake]], wanted: Mapping[str, Sequence[int]], n: int):
        """(the trained empty index, the vectors it was trained on): the sample drawn by tasks, trained here."""
        import ray

        size = self.spec.train_size(n)
        rate = min(1.0, size / len(wanted))
        task = ray.remote(sample_part).options(num_cpus=1)
        drawn = ray.get([task.remote(self.index.location, group, rate, self.dim) for group in groups])
        train = np.concatenate(drawn)[:size]
        self.say(f"training {self.spec.factory} on {len(train):,} of {n:,} vectors")
        return dense.trained_index(self.spec, self.dim, train), len(train)


def dense_bytes(index) -> np.ndarray:
    import faiss

    return faiss.serialize_index(index)


def sample_part(location: str, shards: list[ShardTake], rate: float, dim: int) -> np.ndarray:
    """A Ray task: the training sample's vectors from ``shards`` (float32, ``dim`` wide)."""
    store = EmbeddingStore(location)
    drawn = [store.take_sample(shard, rate, dim) for shard in shards]
    return np.concatenate(drawn) if drawn else np.zeros((0, dim), dtype=np.float32)


def add_part(location: str, shards: list[ShardTake], dim: int, trained: np.ndarray, dest: str) -> int:
    """A Ray task: add ``shards``' vectors to a copy of ``trained`` (serialized) and write it whole to ``dest``
    (on the index folder's filesystem); the vectors added."""
    import faiss

    faiss.omp_set_num_threads(1)  # one CPU per task: the parts are the parallelism
    store = EmbeddingStore(location)
    index = dense.add_batches(faiss.deserialize_index(np.asarray(trained)), (store.take(s, dim) for s in shards))
    fs = store.fs
    parent = dest.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    if isinstance(fs, pafs.LocalFileSystem):
        faiss.write_index(index, tmp)
    else:
        with tempfile.TemporaryDirectory(prefix="dense-part-") as folder:
            local = os.path.join(folder, "part.faiss")
            faiss.write_index(index, local)
            pafs.copy_files(local, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    fs.move(tmp, dest)
    return int(index.ntotal)
