"""Resume: what an output already holds, and the input without it, dropped on the workers.

The driver reads only the output's parquet footers (row counts).  The written ids are read on the
workers, and held by filter actors as Arrow arrays (~20 bytes an id): one actor up to
``IDS_PER_SHARD`` ids, past that the ids are cut into shards by a hash of the id, one actor each,
and every input block asks each shard about its own ids.  No process holds every id of a large
output, and rows stream to the stages while the rest of the input is still being read (a
``join(left_anti)`` would shuffle the whole input first)::

    >>> written = written_files("out/triage")                  # doctest: +SKIP
    >>> todo = exclude_written(ds, "out/triage", written)      # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dspy_ray.corpus.precheck import (
    bucket_of as shard_of,  # an id's shard: the pre-pass's hash bucket
)
from dspy_ray.util.fs import filesystem_for

logger = logging.getLogger(__name__)

QUARANTINE_DIR = "_incomplete"
IDS_PER_SHARD = 25_000_000  # written ids one filter actor holds at most: ~500 MB of Arrow strings


@dataclass(frozen=True)
class Written:
    """The readable parquet files already in the output, and their rows (from the footers: no row is read)."""

    files: tuple[str, ...] = ()
    rows: int = 0


def parquet_files(fs: pafs.FileSystem, root: str) -> list[str]:
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))


def written_files(output: str) -> Written:
    """The complete parquet files in ``output``; a half-written one (a killed writer: no footer) is set aside
    in ``_incomplete/`` and its rows are redone."""
    fs, root = filesystem_for(output)
    files, rows = [], 0
    for path in parquet_files(fs, root):
        try:
            with fs.open_input_file(path) as f:
                rows += pq.read_metadata(f).num_rows
            files.append(path)
        except Exception as exc:  # noqa: BLE001 - a file without a readable footer, whatever the reason
            quarantine = f"{root.rstrip('/')}/{QUARANTINE_DIR}"
            fs.create_dir(quarantine, recursive=True)
            name = path.rsplit("/", 1)[-1]
            fs.move(path, f"{quarantine}/{name}")
            logger.warning("set aside unreadable output file %s (%s); its rows will be redone", name, exc)
    return Written(tuple(files), rows)


def written_ids(output: str) -> set[str]:
    """Ids already in ``output`` (for tests and tools: a run excludes them on the workers, see
    :func:`exclude_written`)."""
    fs, _ = filesystem_for(output)
    return {i for path in written_files(output).files
            for i in pq.read_table(path, columns=["id"], filesystem=fs).column("id").to_pylist()}


def _ids_of(refs: list, shard: int, shards: int) -> pa.Array:
    """The written ids of one shard, from the object-store blocks of the id column, a block at a time."""
    import ray

    parts = []
    for ref in refs:
        table = ray.get(ref)
        if not table.num_rows:
            continue
        ids = table.column("id").combine_chunks()
        parts.append(ids if shards == 1 else ids.filter(pc.equal(shard_of(ids, shards), shard)))
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


class WrittenShard:
    """A Ray actor holding one shard of the written ids."""

    def __init__(self, refs: list, shard: int, shards: int):
        self.done = _ids_of(refs, shard, shards)

    def written(self, ids: pa.Array) -> pa.Array:
        """Which of ``ids`` (all of this shard) are written."""
        return pc.is_in(ids, value_set=self.done)


class _DropWritten:
    """A Ray Data UDF: drops the rows whose id is written.  With one shard the actor holds the ids itself;
    with several it asks each shard actor about the batch's ids of that shard."""

    def __init__(self, refs: list, shards: list):
        self.shards = shards
        self.done = _ids_of(refs, 0, 1) if not shards else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").combine_chunks()
        if self.done is not None:
            return batch.filter(pc.invert(pc.is_in(ids, value_set=self.done)))
        import ray

        where = shard_of(ids, len(self.shards))
        picks = [pc.indices_nonzero(pc.equal(where, s)) for s in range(len(self.shards))]
        answers = ray.get([actor.written.remote(ids.take(pick)) for actor, pick in zip(self.shards, picks)])
        keep = np.ones(len(ids), dtype=bool)
        for pick, written in zip(picks, answers):
            keep[pick.to_numpy()[written.to_numpy(zero_copy_only=False)]] = False
        return batch.filter(pa.array(keep))


def exclude_written(ds, output: str, written: Written, ids_per_shard: int = IDS_PER_SHARD):
    """``ds`` without the rows whose id is already written, filtered on the workers (see the module docstring)."""
    import ray

    if not written.files:
        return ds
    fs, _ = filesystem_for(output)
    done = ray.data.read_parquet(list(written.files), columns=["id"], filesystem=fs).materialize()
    refs = done.to_arrow_refs()
    count = -(-written.rows // max(1, ids_per_shard))
    shards = [] if count <= 1 else [
        ray.remote(WrittenShard).options(num_cpus=0).remote(refs, s, count) for s in range(count)]
    return ds.map_batches(_DropWritten, fn_constructor_args=(refs, shards), batch_format="pyarrow", batch_size=None,
                          compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)
