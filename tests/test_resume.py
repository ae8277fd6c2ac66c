"""Resume's filter: written ids dropped on the workers, one actor or hash shards of them."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.resume import Written, exclude_written, shard_of, written_files


def _write_output(folder, ids_per_file: list[list[str]]) -> Written:
    folder.mkdir()
    for n, ids in enumerate(ids_per_file):
        pq.write_table(pa.table({"id": ids, "label": ["x"] * len(ids)}), folder / f"part-{n}.parquet")
    return written_files(str(folder))


@pytest.mark.parametrize("ids_per_shard", [10**9, 7])  # one actor holds them all / 3 shards of ~7 ids
def test_written_rows_are_dropped_and_the_rest_kept(ray_local, tmp_path, ids_per_shard):
    written = _write_output(tmp_path / "out", [[f"r{i}" for i in range(0, 30, 3)], [f"r{i}" for i in range(1, 30, 3)],
                                               ["not-in-input"]])
    assert written.rows == 21
    ds = ray_local.data.from_arrow([pa.table({"id": [f"r{i}" for i in range(b, b + 10)], "text": ["t"] * 10})
                                   for b in range(0, 30, 10)])
    left = exclude_written(ds, str(tmp_path / "out"), written, ids_per_shard=ids_per_shard)
    left = pa.concat_tables(ray_local.get(left.to_arrow_refs()))
    assert sorted(left.column("id").to_pylist()) == sorted(f"r{i}" for i in range(2, 30, 3))
    assert left.column_names == ["id", "text"]


def test_nothing_written_leaves_the_input_as_it_is(ray_local, tmp_path):
    ds = ray_local.data.from_arrow(pa.table({"id": ["a", "b"]}))
    assert exclude_written(ds, str(tmp_path / "none"), Written()) is ds


def test_shards_are_the_same_in_every_process_and_spread_the_ids():
    ids = pa.array([f"call-{i:05d}" for i in range(2000)])
    shards = shard_of(ids, 8).to_pylist()
    assert shards[:3] == [shard_of(pa.array([f"call-{i:05d}"]), 8)[0].as_py() for i in range(3)]
    counts = [shards.count(s) for s in range(8)]
    assert min(counts) > 150 and max(counts) < 350, counts  # crc32 spreads them (not str hash: per process)
    import zlib

    assert shards[0] == zlib.crc32(b"call-00000") % 8
