"""Read and chunk on the workers: the passages go from the read tasks to publish through parquet parts
in the index folder, and the build process never holds their texts.

Real Ray (the session's), the fake ``/v1/embeddings`` endpoint; a few files of the shipped corpus, read
two files a task so a build has several parts.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dspy_ray.retrieval import read_manifest
from dspy_ray.retrieval.manifest import ERRORS, FILES, PASSAGES
from dspy_ray.retrieval.passages import PASSAGE_SCHEMA
from pipelines.index import read as read_step
from pipelines.index.base import IndexDir, IndexOptions
from pipelines.index.parts import PARTS_DIR, PassageParts
from pipelines.index.publish import Publisher
from tests.index_helpers import SMALL, build, copy_corpus, embed_settings

pytest_plugins = ("tests.index_fixtures",)  # embed_fake


@pytest.fixture
def two_files_a_task(monkeypatch):
    monkeypatch.setattr(read_step, "FILES_PER_TASK", 2)


def _corpus(tmp_path, bad_record: bool = True):
    corpus = copy_corpus(tmp_path / "corpus", SMALL)
    shutil.copy(corpus / SMALL[0], corpus / "dispatch" / "priority_codes_copy.md")  # one text in two passages
    if bad_record:  # reported when its file is parsed; an unchanged file is not parsed again, so not then
        (corpus / "notes.jsonl").write_text('{"id": "n1", "text": "A note about hydrants."}\n{oops\n')
    return corpus


def test_a_read_task_run_again_replaces_its_part(tmp_path):
    """A task Ray retries (its node lost) writes the same part, not a second one."""
    from pipelines.documents import scan_corpus

    corpus = scan_corpus(str(copy_corpus(tmp_path / "corpus", SMALL[:2])))
    index = IndexDir.at(str(tmp_path / "index"))
    parts = PassageParts.start(index)
    (task,) = read_step.read_tasks(corpus, {}, IndexOptions(str(tmp_path / "corpus"), index.location), parts)
    first = read_step.read_and_chunk(task)
    again = read_step.read_and_chunk(task)
    assert [f.passages for f in first] == [f.passages for f in again] and sum(f.passages for f in first) > 2
    written = list((tmp_path / "index" / PARTS_DIR).rglob("*"))
    assert [p.name for p in written if p.is_file()] == ["part-00000.parquet"]
    assert pq.read_table(task.part).num_rows == sum(f.passages for f in first)
    parts.drop()
    assert not (tmp_path / "index" / PARTS_DIR).exists()


def test_the_build_process_never_holds_the_passage_texts(ray_local, embed_fake, tmp_path, monkeypatch,
                                                         two_files_a_task):
    """Chunking and reading texts to embed run on the workers only; what comes back from them, and what
    the read step hands on, holds no passage text."""
    import ray

    def refuse(*_, **__):
        raise AssertionError("the build process chunked a file or read passage texts to embed")

    monkeypatch.setattr(read_step, "chunk_document", refuse)  # the read tasks use the worker's own module
    monkeypatch.setattr("pipelines.index.embed.embedding_rows", refuse)
    sent_back: list[bytes] = []
    get = ray.get

    def spy_get(*args, **kwargs):
        out = get(*args, **kwargs)
        sent_back.append(pickle.dumps(out))
        return out

    reader_read = read_step.CorpusReader.read

    def spy_read(self, *args, **kwargs):
        out = reader_read(self, *args, **kwargs)
        sent_back.append(pickle.dumps(out))
        return out

    monkeypatch.setattr(ray, "get", spy_get)
    monkeypatch.setattr(read_step.CorpusReader, "read", spy_read)
    corpus = _corpus(tmp_path)
    index = tmp_path / "index"
    s = build(corpus, index, embed_settings(embed_fake)).summary
    assert s.failed == 0 and s.passages > 20 and s.records_skipped == 1
    texts = pq.read_table(index / PASSAGES, columns=["text"]).column("text").to_pylist()
    assert len(sent_back) >= 2
    for blob in sent_back:
        assert not [t for t in texts if t[:60].encode() in blob]
    assert not (index / PARTS_DIR).exists()


def test_an_incremental_rebuild_writes_what_a_fresh_build_writes(ray_local, embed_fake, tmp_path, two_files_a_task):
    corpus = _corpus(tmp_path, bad_record=False)
    index, fresh = tmp_path / "index", tmp_path / "fresh"
    build(corpus, index, embed_settings(embed_fake))
    changed = corpus / SMALL[1]
    changed.write_text(changed.read_text() + "\nChannel 9 carries the zebra drill on Tuesdays.\n")
    (corpus / "community.md").write_text("# Lantern festival\n\nLanterns are lit on the quay.\n")
    (corpus / SMALL[2]).unlink()
    embed_fake.reset_stats()
    again = build(corpus, index, embed_settings(embed_fake), resume=True).summary
    assert (again.new_files, again.changed_files, again.removed_files, again.unchanged_files) == (1, 1, 1, 4)
    assert again.reused > again.embedded_now > 0 and again.removed > 0
    assert embed_fake.stats()["embeddings"]["inputs"] == again.embedded_now + 1  # + the dimension probe
    first = build(corpus, fresh, embed_settings(embed_fake)).summary
    assert (first.passages, first.files, first.records_skipped) == (again.passages, again.files,
                                                                      again.records_skipped)
    for name in (PASSAGES, FILES, ERRORS):
        assert pq.read_table(index / name).equals(pq.read_table(fresh / name)), name
    a, b = read_manifest(str(index)), read_manifest(str(fresh))
    assert (a.passages, a.corpus.fingerprint, a.corpus.records) == (b.passages, b.corpus.fingerprint, b.corpus.records)
    hashes = pq.read_table(index / PASSAGES, columns=["hash"]).column("hash").to_pylist()
    assert len(set(hashes)) < len(hashes)  # the copied file: one text in two passages


def test_a_failed_build_leaves_no_parts_and_a_later_one_reads_only_its_own(ray_local, embed_fake, tmp_path,
                                                                          monkeypatch, two_files_a_task):
    corpus = _corpus(tmp_path)
    index = tmp_path / "index"

    def fail(*_, **__):
        raise RuntimeError("publish failed")

    with monkeypatch.context() as m:
        m.setattr(Publisher, "publish", fail)
        with pytest.raises(RuntimeError, match="publish failed"):
            build(corpus, index, embed_settings(embed_fake))
    assert not (index / PARTS_DIR).exists() and not (index / "manifest.json").exists()
    # What a killed build would leave: parts of its own run, with a passage no corpus file gives.
    stale = index / PARTS_DIR / "0badc0de" / "part-00000.parquet"
    stale.parent.mkdir(parents=True)
    row = {f.name: 0 if pa.types.is_integer(f.type) else "stale" for f in PASSAGE_SCHEMA}
    pq.write_table(pa.Table.from_pylist([row], schema=PASSAGE_SCHEMA), stale)
    s = build(corpus, index, embed_settings(embed_fake), resume=True).summary
    ids = pq.read_table(index / PASSAGES, columns=["id"]).column("id").to_pylist()
    assert "stale" not in ids and len(ids) == s.passages == read_manifest(str(index)).passages
    assert not (index / PARTS_DIR).exists()
    assert json.loads((index / "manifest.json").read_text())["passages"] == s.passages
