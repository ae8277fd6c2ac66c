"""``python -m pipelines.index`` against the fake embedding endpoint: builds, bad files, resume, incremental.

Real Ray (the session's), real HTTP to ``dspy_ray/testing/fake_llm/``'s ``/v1/embeddings``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import faiss
import pyarrow.parquet as pq
import pytest

from dspy_ray.retrieval import read_manifest
from dspy_ray.retrieval.manifest import BUILD_STATE, ERRORS, FILES, PASSAGES
from dspy_ray.retrieval.store import EmbeddingStore
from pipelines import index as index_cli
from tests.index_helpers import (
    CORPUS,
    MODEL,
    ROOT,
    SMALL,
    build,
    copy_corpus,
    embed_settings,
)

pytest_plugins = ("tests.index_fixtures",)  # embed_fake, shipped_index


def _cli(monkeypatch, capsys, fake, *argv, key: str | None = None) -> tuple[int, str, str]:
    monkeypatch.setenv("EMBED_BASE_URL", fake.base_url)
    monkeypatch.setenv("EMBED_MODEL", MODEL)
    if key is not None:
        monkeypatch.setenv("EMBED_API_KEY", key)
    monkeypatch.chdir(ROOT)  # no stray .env
    code = index_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_writes_a_complete_index_with_manifest(shipped_index, embed_fake):
    index, built = shipped_index
    s = built.summary
    manifest = read_manifest(str(index))
    passages = pq.read_table(index / PASSAGES)
    dense = faiss.read_index(str(index / "index.faiss"))
    assert s.files == 50 and s.skipped == [] and s.records_skipped == 0
    assert s.passages == manifest.passages == passages.num_rows == dense.ntotal > 400
    assert s.embedded_now == s.passages and s.reused == 0 and s.failed == 0
    assert manifest.embedder.model == MODEL and manifest.embedder.dim == 256
    assert manifest.normalized and manifest.metric == "inner_product"
    assert manifest.index.type == "flat" and manifest.corpus.files == 50 and manifest.corpus.records == 13
    assert len(manifest.corpus.fingerprint) == 64 and manifest.chunking.unit == "tokens"
    ids = passages.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert all(i == f"{src}:{n}" for i, src, n in zip(ids, passages.column("source").to_pylist(),
                                                      passages.column("chunk").to_pylist()))
    files = pq.read_table(index / FILES).to_pylist()
    assert len(files) == 50 and all(f["error"] is None and len(f["sha256"]) == 64 for f in files)
    assert pq.read_table(index / ERRORS).num_rows == 0
    assert not (index / BUILD_STATE).exists()
    assert "indexed" in s.line() and "0 failed" in s.line()


def test_an_index_is_not_overwritten_without_resume(shipped_index, embed_fake, monkeypatch, capsys):
    index, _ = shipped_index
    code, out, err = _cli(monkeypatch, capsys, embed_fake, "--corpus", CORPUS, "--index", index)
    assert code == 2 and out == ""
    assert err.startswith("error: index ") and "pass --resume" in err and len(err.strip().splitlines()) == 1


def test_nothing_is_embedded_for_a_missing_corpus_or_unwritable_index(tmp_path, embed_fake, monkeypatch, capsys):
    embed_fake.reset_stats()
    code, _, err = _cli(monkeypatch, capsys, embed_fake, "--corpus", tmp_path / "nope", "--index", tmp_path / "i")
    assert code == 2 and "corpus not found" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _cli(monkeypatch, capsys, embed_fake, "--corpus", CORPUS, "--index", blocker)
    assert code == 2 and "is not a folder" in err
    assert embed_fake.stats()["embeddings"]["requests"] == 0


@pytest.mark.slow
def test_bad_files_are_named_counted_and_listed(ray_local, embed_fake, tmp_path, monkeypatch, capsys):
    corpus = copy_corpus(tmp_path / "corpus", SMALL[:2])
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (corpus / "empty.md").write_text("")
    (corpus / "notes.jsonl").write_text('{"id": "n1", "text": "A note about hydrants."}\n{oops\n')
    (corpus / "logo.png").write_bytes(b"\x89PNG")
    code, out, err = _cli(monkeypatch, capsys, embed_fake, "--corpus", corpus, "--index", tmp_path / "index")
    assert code == 0, err
    assert "skipped latin1.txt: not valid UTF-8" in err and "skipped empty.md: file is empty" in err
    assert "skipped notes.jsonl:2: invalid JSON" in err
    assert "ignored (not a document kind, hidden or excluded): .png 1" in err
    summary = out.strip().splitlines()[-1]
    assert "3 files read, 2 skipped (empty.md: file is empty; latin1.txt: not valid UTF-8" in summary
    assert "1 records skipped" in summary
    errors = pq.read_table(tmp_path / "index" / ERRORS).to_pylist()
    assert {(e["kind"], e["where"]) for e in errors} == {("file", "empty.md"), ("file", "latin1.txt"),
                                                         ("record", "notes.jsonl:2")}
    files = {f["path"]: f["error"] for f in pq.read_table(tmp_path / "index" / FILES).to_pylist()}
    assert files["notes.jsonl"] is None and "UTF-8" in files["latin1.txt"]


@pytest.mark.slow
def test_failed_passages_are_recorded_left_out_and_retried(ray_local, tmp_path):
    from dspy_ray.testing.fake_llm import FakeLLM

    corpus = copy_corpus(tmp_path / "corpus", SMALL)
    index = tmp_path / "index"
    with FakeLLM(embed_max_chars=700) as fake:  # longer inputs get HTTP 400, like a context-length error
        first = build(corpus, index, embed_settings(fake, batch_size=8)).summary
        assert 0 < first.failed < first.passages + first.failed
        errors = pq.read_table(index / ERRORS).to_pylist()
        assert len(errors) == first.failed and all(e["kind"] == "passage" for e in errors)
        assert all("longer than the model's context" in e["error"] for e in errors)
        indexed = set(pq.read_table(index / PASSAGES).column("id").to_pylist())
        assert not indexed & {e["where"] for e in errors}
        assert read_manifest(str(index)).passages == first.passages
        fake.configure(embed_max_chars=0)
        fake.reset_stats()
        second = build(corpus, index, embed_settings(fake, batch_size=8), resume=True).summary
        assert second.failed == 0 and second.embedded_now == first.failed
        assert second.passages == first.passages + first.failed
        assert fake.stats()["embeddings"]["inputs"] == first.failed + 1  # + the dimension probe


def test_incremental_rebuild_embeds_only_new_and_changed_passages(shipped_index, embed_fake, tmp_path):
    base, _ = shipped_index
    corpus = copy_corpus(tmp_path / "corpus")
    index = tmp_path / "index"
    shutil.copytree(base, index)
    before = {r["id"]: r["hash"] for r in pq.read_table(index / PASSAGES).to_pylist()}
    changed = corpus / "dispatch" / "priority_codes.md"
    changed.write_text(changed.read_text() + "\n## Night shift\n\nThe zebra protocol applies after midnight.\n")
    (corpus / "community" / "new_page.md").write_text("# Lantern festival\n\nLanterns are lit on the quay.\n")
    (corpus / "volunteers" / "explorer_post.txt").unlink()
    embed_fake.reset_stats()
    s = build(corpus, index, embed_settings(embed_fake), resume=True).summary
    assert (s.new_files, s.changed_files, s.removed_files, s.unchanged_files) == (1, 1, 1, 48)
    after = {r["id"]: r["hash"] for r in pq.read_table(index / PASSAGES).to_pylist()}
    new_hashes = set(after.values()) - set(before.values())
    assert 2 <= len(new_hashes) <= 4  # the new page, and the changed file's last chunk(s)
    assert s.embedded_now == sum(1 for h in after.values() if h in new_hashes)
    assert embed_fake.stats()["embeddings"]["inputs"] == len(new_hashes) + 1
    gone = {i for i in before if i.startswith("volunteers/explorer_post.txt:")}
    assert gone and s.removed == len(gone | (set(before) - set(after))) and not gone & set(after)
    assert "1 new, 1 changed, 48 unchanged, 1 removed" in s.line()
    from dspy_ray.retrieval import open_retriever

    hits = open_retriever(f"{index}?mode=bm25", None).search("zebra protocol midnight", k=1)
    assert hits[0].source == "dispatch/priority_codes.md" and "zebra" in hits[0].text


def test_resume_refuses_another_embedder_or_chunking(shipped_index, embed_fake, tmp_path, monkeypatch, capsys):
    base, _ = shipped_index
    index = tmp_path / "index"
    shutil.copytree(base, index)
    monkeypatch.setenv("EMBED_MODEL", "other-model")
    monkeypatch.setenv("EMBED_BASE_URL", embed_fake.base_url)
    monkeypatch.chdir(ROOT)
    code = index_cli.main(["--corpus", str(CORPUS), "--index", str(index), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "'fake-embed'" in err and "'other-model'" in err
    code, _, err = _cli(monkeypatch, capsys, embed_fake, "--corpus", CORPUS, "--index", index, "--resume",
                        "--chunk-size", "300")
    assert code == 2 and "was built with chunking" in err and "'size': 300" in err


def test_bad_key_fails_before_any_passage_and_keys_are_never_written(ray_local, tmp_path, monkeypatch, capsys):
    from dspy_ray.testing.fake_llm import FakeLLM

    corpus = copy_corpus(tmp_path / "corpus", SMALL[:2])
    secret = "sk-test-DO-NOT-WRITE-4242"
    with FakeLLM(embed_api_key=secret) as fake:
        code, _, err = _cli(monkeypatch, capsys, fake, "--corpus", corpus, "--index", tmp_path / "i1", key="wrong")
        assert code == 2 and "HTTP 401" in err and "check EMBED_API_KEY" in err and "wrong" not in err
        assert fake.stats()["embeddings"]["requests"] == 1  # the probe only
        code, out, err = _cli(monkeypatch, capsys, fake, "--corpus", corpus, "--index", tmp_path / "i2", key=secret)
        assert code == 0, err
        assert secret not in out + err
        for path in (tmp_path / "i2").rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_killed_build_resumes_without_reembedding_finished_passages(ray_local, tmp_path):
    """SIGKILL a real CLI process mid-embedding (it joins this session's Ray), then --resume in-process."""
    from dspy_ray.testing.fake_llm import FakeLLM

    index = tmp_path / "index"
    with FakeLLM(latency=0.25) as fake:
        env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
               "EMBED_BASE_URL": fake.base_url, "EMBED_MODEL": MODEL, "EMBED_BATCH_SIZE": "4",
               "EMBED_MAX_IN_FLIGHT": "2", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.index", "--corpus", str(CORPUS), "--index",
                                 str(index), "--shard-rows", "16", "--num-actors", "1", "--batch-size", "16"],
                                cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while len(EmbeddingStore(str(index)).shards()) < 3:
                assert proc.poll() is None, "the build ended before it could be killed"
                assert time.monotonic() < deadline, "no embedding shard was written in time"
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # The build's actors die with their driver, but not at once on a busy machine: let them go quiet first,
        # or a request of theirs lands after reset_stats and is counted as the resume's.
        fake.wait_until_quiet(quiet_s=2.0, watch=lambda: len(EmbeddingStore(str(index)).shards()))
        assert not (index / "manifest.json").exists() and (index / BUILD_STATE).exists()
        stored = EmbeddingStore(str(index)).hashes()
        fake.configure(latency=0.0)
        fake.reset_stats()
        s = build(CORPUS, index, embed_settings(fake), resume=True).summary
        unique = set(pq.read_table(index / PASSAGES).column("hash").to_pylist())
        assert stored and stored < unique
        assert fake.stats()["embeddings"]["inputs"] == len(unique - stored) + 1
        assert s.reused >= len(stored) and s.embedded_now + s.reused == s.passages and s.failed == 0


def test_index_on_object_storage(ray_local, embed_fake):
    import fsspec

    from dspy_ray.retrieval import open_retriever

    mem = fsspec.filesystem("memory")
    for rel in SMALL[:3]:
        mem.pipe(f"/rag-test/corpus/{rel}", (CORPUS / rel).read_bytes())
    s = build("memory://rag-test/corpus", "memory://rag-test/index", embed_settings(embed_fake)).summary
    assert s.files == 3 and s.passages > 10
    assert mem.exists("/rag-test/index/manifest.json") and mem.exists("/rag-test/index/index.faiss")
    retriever = open_retriever("memory://rag-test/index?mode=hybrid&k=3", embed_settings(embed_fake))
    hits = retriever.search("Echo calls flash white on the CAD screens")
    assert len(hits) == 3 and hits[0].source == "dispatch/priority_codes.md"
    retriever.close()


@pytest.mark.parametrize("ann", ["ivf_flat", "hnsw"])
def test_approximate_index_above_the_threshold(shipped_index, embed_fake, tmp_path, ann):
    """Reusing the shipped index's embedding store: nothing is embedded, the FAISS index is rebuilt approximate."""
    base, _ = shipped_index
    index = tmp_path / "index"
    shutil.copytree(base / "embeddings", index / "embeddings")
    embed_fake.reset_stats()
    s = build(CORPUS, index, embed_settings(embed_fake), resume=True, exact_below=100, ann=ann).summary
    manifest = read_manifest(str(index))
    assert s.embedded_now == 0 and embed_fake.stats()["embeddings"]["inputs"] == 1
    assert manifest.index.type == ann and manifest.passages == s.passages
    if ann == "ivf_flat":
        assert manifest.index.nlist and manifest.index.trained_on == s.passages and manifest.index.nprobe
    else:
        assert manifest.index.ef_search


@pytest.mark.slow
@pytest.mark.llm
def test_embedded_embedder_is_the_default(ray_local, tmp_path, monkeypatch, capsys):
    """No EMBED_BASE_URL: the build starts all-MiniLM-L6-v2 on llama.cpp, and stops it; the retriever does too."""
    from dspy_ray.endpoints.local.embedder_server import DIM, MODEL_ID
    from dspy_ray.endpoints.fallback import open_endpoints
    from dspy_ray.retrieval import open_retriever
    from dspy_ray.endpoints.settings import resolve_settings

    for name in ("EMBED_BASE_URL", "EMBED_MODEL", "EMBED_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    corpus = copy_corpus(tmp_path / "corpus", SMALL[:2])
    code = index_cli.main(["--corpus", str(corpus), "--index", str(tmp_path / "index")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "starting the embedded embedder" in err and f"{DIM}-d {MODEL_ID}" in out
    manifest = read_manifest(str(tmp_path / "index"))
    assert (manifest.embedder.model, manifest.embedder.dim, manifest.embedder.origin) == (MODEL_ID, DIM, "embedded")
    with open_endpoints(embed=resolve_settings("EMBED", env={}, dotenv_path=None), discover=False) as endpoints:
        retriever = open_retriever(f"{tmp_path / 'index'}?mode=dense&k=1", endpoints.embed)
        hit = retriever.search("What colour do the most critical calls flash on dispatch screens?")[0]
        retriever.close()
    assert hit.source == "dispatch/priority_codes.md"


@pytest.mark.slow
def test_pdf_word_and_mail_are_indexed_with_page_sections(ray_local, embed_fake, tmp_path, monkeypatch, capsys):
    """The issue's new user: a .pdf, a .docx, an .eml and two .md files are all read; a scan is named, a PNG too."""
    from tests.doc_fixtures import make_docx, make_eml, make_pdf

    corpus = copy_corpus(tmp_path / "corpus", SMALL[:1])
    (corpus / "guide.md").write_text("# Hydrants\n\nKeep hydrants clear of snow.\n")
    detour = "Traffic from the ferry terminal turns left at the old station and follows the harbour wall."
    (corpus / "closure.pdf").write_bytes(make_pdf([["Quay Street is closed.", *[detour] * 5],
                                                   ["Use Dock Road instead.", *[detour] * 5]]))
    (corpus / "scan.pdf").write_bytes(make_pdf([["x"]], image_only=True))
    (corpus / "crews.docx").write_bytes(make_docx("Crews", [("North", ["Engine 4 covers the north."])]))
    (corpus / "dog.eml").write_bytes(make_eml("Loose dog on Pier 3", "A large dog is loose on Pier 3."))
    (corpus / "logo.png").write_bytes(b"\x89PNG")
    code, out, err = _cli(monkeypatch, capsys, embed_fake, "--corpus", corpus, "--index", tmp_path / "index")
    assert code == 0, err
    assert "skipped scan.pdf: no text layer" in err
    assert "not a document kind: logo.png" in err
    assert "5 files read, 1 skipped (scan.pdf: no text layer" in out.strip().splitlines()[-1]
    passages = pq.read_table(tmp_path / "index" / PASSAGES).to_pylist()
    by_file = {}
    for p in passages:
        by_file.setdefault(p["file"], []).append(p)
    assert set(by_file) == {SMALL[0], "guide.md", "closure.pdf", "crews.docx", "dog.eml"}
    dock = next(p for p in by_file["closure.pdf"] if "Dock Road" in p["text"])
    assert dock["section"] == "page 2"
    assert any("Engine 4" in p["text"] and p["section"] == "Crews" for p in by_file["crews.docx"])  # one passage
    assert by_file["dog.eml"][0]["section"] == "Loose dog on Pier 3"
