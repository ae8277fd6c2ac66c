"""The index build at scale: embedding actors write the store, and a big IVF index is built in parts and merged.

Real Ray (the session's), the fake ``/v1/embeddings`` endpoint; the sharding threshold is made tiny so the
shipped corpus (~460 passages) is built in parts.
"""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from dspy_ray.retrieval import dense, read_manifest
from dspy_ray.retrieval.manifest import (
    BUILD_STATE,
    FAISS_INDEX,
    FAISS_LISTS,
    MANIFEST,
    PASSAGES,
)
from dspy_ray.retrieval.store import EmbeddingStore
from tests.index_helpers import CORPUS, SMALL, build, copy_corpus, embed_settings

pytest_plugins = ("tests.index_fixtures",)  # embed_fake, shipped_index


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _wanted(index) -> dict[str, list[int]]:
    wanted: dict[str, list[int]] = {}
    for row, h in enumerate(pq.read_table(index / PASSAGES, columns=["hash"]).column("hash").to_pylist()):
        wanted.setdefault(h, []).append(row)
    return wanted


def _maps() -> str:
    """The files this process has mapped."""
    with open("/proc/self/maps") as f:
        return f.read()


def _shard_rows(index) -> list[str]:
    """Every hash in the store, once per shard row (a vector written twice shows twice)."""
    store = EmbeddingStore(str(index))
    return [h for path in store.shards() for h in pq.read_table(path, columns=["hash"]).column("hash").to_pylist()]


# -- the FAISS and store pieces, no Ray ------------------------------------------------------------


@pytest.mark.parametrize("ann", ["ivf_flat", pytest.param("ivf_pq", marks=pytest.mark.slow)])  # PQ trains ~10 s
def test_merged_parts_search_exactly_like_one_index(tmp_path, ann):
    import faiss

    n, dim = 4_000, 16
    x, queries = _unit(n, dim, 1), _unit(200, dim, 2)
    spec = dense.choose_index(n, dim, exact_below=0, ann=ann)
    batches = [(np.arange(s, min(s + 500, n)), x[s:s + 500]) for s in range(0, n, 500)]
    train = x[np.random.default_rng(0).choice(n, spec.train_size(n), replace=False)]
    trained = dense.trained_index(spec, dim, train)
    whole = dense.add_batches(faiss.clone_index(trained), batches)  # one process adds every batch
    parts = []
    for i, group in enumerate((batches[:3], batches[3:4], batches[4:])):
        parts.append(str(tmp_path / f"part-{i}.faiss"))
        faiss.write_index(dense.add_batches(faiss.clone_index(trained), group), parts[-1])
    built = tmp_path / "built"
    built.mkdir()
    merged = dense.merge_parts(trained, parts, str(built / FAISS_LISTS))
    dense.write_index(merged, str(built / FAISS_INDEX))
    del merged
    moved = tmp_path / "elsewhere"
    shutil.move(built, moved)  # the lists are found next to the index file, not where they were written
    index = dense.read_index(str(moved / FAISS_INDEX), spec.type, on_disk=True)
    assert index.ntotal == n
    if ann == "ivf_flat":  # the index file keeps the quantizer and the lists' places; the vectors are in the lists
        assert (moved / FAISS_INDEX).stat().st_size < (moved / FAISS_LISTS).stat().st_size / 10
    assert str(moved / FAISS_LISTS) in _maps()  # mapped, not loaded
    for nprobe in (1, 4, spec.nprobe):
        dense.apply_search_params(whole, nprobe, None)
        dense.apply_search_params(index, nprobe, None)
        want, got = dense.search(whole, queries, 10), dense.search(index, queries, 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_parts_on_object_storage_are_merged_from_local_copies(tmp_path):
    """The merge maps local files only: parts in an object store are copied here first (fsspec memory:// here)."""
    import faiss

    from pipelines.index.base import IndexDir
    from pipelines.index.sharded import PARTS_DIR, ShardedIndex, drop_parts

    n, dim = 3_000, 16
    x = _unit(n, dim, 4)
    spec = dense.choose_index(n, dim, exact_below=0)
    trained = dense.trained_index(spec, dim, x)
    index_dir = IndexDir.at(f"memory://sharded-{tmp_path.name}/index")
    paths = []
    for i, (start, stop) in enumerate(((0, 1_000), (1_000, 3_000))):
        part = dense.add_batches(faiss.clone_index(trained), [(np.arange(start, stop), x[start:stop])])
        paths.append(index_dir.path(f"{PARTS_DIR}/part-{i:05d}.faiss"))
        index_dir.fs.create_dir(paths[-1].rsplit("/", 1)[0], recursive=True)
        with index_dir.fs.open_output_stream(paths[-1]) as f:
            f.write(faiss.serialize_index(part).tobytes())
    names = ShardedIndex(index_dir, trained, paths, n, trained_on=n).write(str(tmp_path))
    assert names == (FAISS_INDEX, FAISS_LISTS)
    merged = dense.read_index(str(tmp_path / FAISS_INDEX), spec.type, on_disk=True)
    whole = dense.add_batches(faiss.clone_index(trained), [(np.arange(n), x)])
    for index in (merged, whole):
        dense.apply_search_params(index, 2, None)
    np.testing.assert_array_equal(dense.search(merged, x[:100], 5)[1], dense.search(whole, x[:100], 5)[1])
    drop_parts(index_dir)
    assert index_dir.fs.get_file_info(index_dir.path(PARTS_DIR)).type.name == "NotFound"


def test_store_plan_reads_what_vectors_reads(tmp_path):
    store = EmbeddingStore(str(tmp_path / "index"))
    dim = 8
    x = _unit(30, dim, 3)
    hashes = [f"h{i:02d}" for i in range(30)]
    store.write_shard("part-a-00000.parquet", hashes[:12], x[:12], dim)
    store.write_shard("part-b-00000.parquet", hashes[8:25], x[8:25] * 0.5, dim)  # h08..h11 again: the first wins
    store.write_shard("part-c-00000.parquet", hashes[25:], x[25:], dim)
    (tmp_path / "index" / "embeddings" / ".tmp-killed").write_bytes(b"PAR1 half a shard")
    wanted = {h: [i] for i, h in enumerate(hashes) if i % 7}  # some hashes not wanted
    wanted["h03"] = [40, 41]  # one text in two passages
    direct = list(store.vectors(wanted, dim))
    plan = store.plan(wanted)
    planned = [store.take(shard, dim) for shard in plan]
    assert len(plan) == len(direct) == 3
    assert sum(shard.vectors for shard in plan) == sum(len(rows) for rows in wanted.values())
    for (ids, vectors), (want_ids, want_vectors) in zip(planned, direct):
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(vectors, want_vectors)
    size = len(wanted) // 2  # tasks drawing from a few shards each draw the sample one process draws
    drawn = np.concatenate([store.take_sample(shard, size / len(wanted), dim) for shard in plan])
    np.testing.assert_array_equal(drawn[:size], store.sample(wanted, size, dim))
    assert store.drop_partial() == 1 and len(store.shards()) == 3


def test_an_actor_that_does_not_see_the_builds_folder_refuses_to_write(tmp_path):
    """A local --index on a node that does not share it: the actor finds no build.json of this build there."""
    import json

    from dspy_ray.retrieval.store import ShardSink, StoreNotSharedError

    index = tmp_path / "index"
    index.mkdir()
    with pytest.raises(StoreNotSharedError, match="object storage"):
        ShardSink(**ShardSink.config(str(index), dim=4, run="this-build")).check()
    (index / BUILD_STATE).write_text(json.dumps({"run": "another-build"}))
    with pytest.raises(StoreNotSharedError, match="does not see this build's build.json"):
        ShardSink(**ShardSink.config(str(index), dim=4, run="this-build")).check()
    (index / BUILD_STATE).write_text(json.dumps({"run": "this-build"}))
    sink = ShardSink(**ShardSink.config(str(index), dim=4, rows=3, run="this-build"))
    sink.check()
    assert sink.write([f"h{i}" for i in range(7)], _unit(7, 4, 5)) == 3  # at most ``rows`` rows a shard
    assert sorted(EmbeddingStore(str(index)).hashes()) == [f"h{i}" for i in range(7)]


# -- whole builds against the fake endpoint ---------------------------------------------------------


def test_sharded_build_finds_what_the_whole_build_finds(shipped_index, embed_fake, tmp_path):
    """The same store, built whole and in parts (same sample, so the same quantizer): the same hits."""
    base, _ = shipped_index
    indexes = {}
    for name, above in (("whole", None), ("sharded", 60)):
        indexes[name] = tmp_path / name
        shutil.copytree(base / "embeddings", indexes[name] / "embeddings")
        built = build(CORPUS, indexes[name], embed_settings(embed_fake), resume=True, exact_below=100,
                      shard_above=above)
        assert built.summary.embedded_now == 0 and built.summary.failed == 0
    whole, sharded = (read_manifest(str(indexes[k])).index for k in ("whole", "sharded"))
    assert whole.parts == 0 and whole.lists_file is None and not (indexes["whole"] / FAISS_LISTS).exists()
    assert sharded.parts > 1 and sharded.lists_file == FAISS_LISTS and (indexes["sharded"] / FAISS_LISTS).exists()
    assert (whole.type, whole.nlist, whole.trained_on) == (sharded.type, sharded.nlist, sharded.trained_on)
    assert not (indexes["sharded"] / ".dense-parts").exists()
    passages = pq.read_table(indexes["sharded"] / PASSAGES)
    assert passages.equals(pq.read_table(indexes["whole"] / PASSAGES))
    # Each passage's own vector as a query: the same rows and scores, at a few nprobe settings.
    wanted = _wanted(indexes["sharded"])
    ids, vectors = zip(*EmbeddingStore(str(indexes["sharded"])).vectors(wanted, 256))
    queries = np.concatenate(vectors)[np.argsort(np.concatenate(ids))]
    a = dense.read_index(str(indexes["whole"] / FAISS_INDEX), whole.type)
    b = dense.read_index(str(indexes["sharded"] / FAISS_INDEX), sharded.type, on_disk=True)
    assert a.ntotal == b.ntotal == passages.num_rows
    for nprobe in (1, 2, sharded.nprobe):
        dense.apply_search_params(a, nprobe, None)
        dense.apply_search_params(b, nprobe, None)
        (sa, ra), (sb, rb) = dense.search(a, queries, 10), dense.search(b, queries, 10)
        np.testing.assert_array_equal(rb, ra)
        np.testing.assert_allclose(sb, sa, rtol=1e-5, atol=1e-6)
    # The ids are passage rows: a passage's own vector finds a passage of the same text first.
    hashes = passages.column("hash").to_pylist()
    assert all(hashes[r] == hashes[i] for i, r in enumerate(rb[:, 0]))


def test_a_sharded_index_is_searched_where_it_is_copied(shipped_index, embed_fake, tmp_path):
    from dspy_ray.retrieval import open_retriever

    base, _ = shipped_index
    index = tmp_path / "index"
    shutil.copytree(base / "embeddings", index / "embeddings")
    build(CORPUS, index, embed_settings(embed_fake), resume=True, exact_below=100, shard_above=150)
    assert read_manifest(str(index)).index.lists_file == FAISS_LISTS
    moved = tmp_path / "moved"
    shutil.copytree(index, moved)
    shutil.rmtree(index)
    retriever = open_retriever(f"{moved}?mode=hybrid&k=3", embed_settings(embed_fake))
    hits = retriever.search("Echo calls flash white on the CAD screens")
    assert len(hits) == 3 and hits[0].source == "dispatch/priority_codes.md"
    dense_hits = retriever.search_many(["Echo calls flash white on the CAD screens"], mode="dense")[0]
    assert dense_hits and dense_hits[0].source == "dispatch/priority_codes.md"
    assert str(moved / FAISS_LISTS) in _maps()
    retriever.close()


def test_embedding_actors_write_the_store_and_send_back_no_vectors(ray_local, embed_fake, tmp_path, monkeypatch):
    """Shard writes in this (the build's) process fail the test; what the actors hand back is recorded."""
    import ray

    def refuse(*_, **__):
        raise AssertionError("the build process wrote an embedding shard")

    received: list[tuple[tuple[str, ...], int, int]] = []
    iter_batches = ray.data.Dataset.iter_batches

    def spy(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            received.append((tuple(batch.column_names), batch.num_rows, batch.nbytes))
            yield batch

    monkeypatch.setattr(EmbeddingStore, "write_shard", refuse)
    monkeypatch.setattr(ray.data.Dataset, "iter_batches", spy)
    corpus = copy_corpus(tmp_path / "corpus", SMALL)
    index = tmp_path / "index"
    s = build(corpus, index, embed_settings(embed_fake)).summary
    assert s.failed == 0 and s.embedded_now == s.passages > 20
    unique = set(pq.read_table(index / PASSAGES).column("hash").to_pylist())
    assert sorted(_shard_rows(index)) == sorted(unique)  # every vector, written once, by the actors
    assert received and sum(rows for _, rows, _ in received) == len(unique)
    assert all(columns == ("hash", "error") for columns, _, _ in received)
    assert sum(size for _, _, size in received) < 100 * len(unique)  # a 256-d vector alone is 1 KB
    names = {p.rsplit("/", 1)[-1].rsplit("-", 1)[0] for p in EmbeddingStore(str(index)).shards()}
    assert all(len(name) == len("part-") + 12 for name in names)  # named by the writing actor


@pytest.mark.slow
def test_resume_after_an_interrupted_build_embeds_each_passage_once(ray_local, tmp_path):
    """The endpoint starts refusing the key mid-build (the build fails, as a killed one would stop); --resume
    embeds only what no shard holds, and the store ends with each passage's vector once."""
    from dspy_ray.client.embeddings import EmbeddingConfigError
    from dspy_ray.testing.fake_llm import FakeLLM

    index = tmp_path / "index"
    store = EmbeddingStore(str(index))
    with FakeLLM(latency=0.2) as fake:

        def refuse_soon():
            deadline = time.monotonic() + 120
            while len(store.shards()) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            fake.configure(embed_api_key="now-required")

        watcher = threading.Thread(target=refuse_soon, daemon=True)
        watcher.start()
        with pytest.raises(EmbeddingConfigError, match="401"):
            build(CORPUS, index, embed_settings(fake, batch_size=4), shard_rows=16,
                  stage=_stage(num_actors=1, batch_size=8, max_in_flight_per_actor=1))
        watcher.join()
    assert not (index / MANIFEST).exists() and (index / BUILD_STATE).exists()
    before = _settled(index)
    stored = set(before)
    assert len(before) == len(stored) > 0  # nothing written twice
    with FakeLLM() as fake:  # a fresh endpoint: its counts are the resumed build's alone
        s = build(CORPUS, index, embed_settings(fake), resume=True).summary
        unique = set(pq.read_table(index / PASSAGES).column("hash").to_pylist())
        assert stored < unique and s.failed == 0
        assert fake.stats()["embeddings"]["inputs"] == len(unique - stored) + 1  # + the dimension probe
    assert s.embedded_now + s.reused == s.passages
    assert sorted(_shard_rows(index)) == sorted(unique)  # each passage's vector once in the store


def _stage(**fields):
    from stages.embed import EmbedStage

    return EmbedStage(**fields)


def _settled(index, quiet_s: float = 2.0) -> list[str]:
    """The store's rows once no shard has appeared for ``quiet_s`` (batches in flight when the build failed)."""
    rows, since = _shard_rows(index), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.2)
        now = _shard_rows(index)
        if len(now) != len(rows):
            rows, since = now, time.monotonic()
    return rows
