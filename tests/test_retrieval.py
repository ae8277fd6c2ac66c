"""The embedding client, the retriever (dense, BM25, hybrid), its manifest checks, and ``pipelines.retrieve``."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter

import httpx
import numpy as np
import pytest

from dspy_ray.client.embeddings import EmbeddingClient, EmbeddingConfigError
from dspy_ray.execution.loading import ProgramSpec, Resource
from dspy_ray.retrieval import (
    IndexMismatchError,
    IndexNotFoundError,
    Passage,
    RetrievalIndexError,
    open_retriever,
    parse_setting,
)
from dspy_ray.retrieval.retriever import reciprocal_rank_fusion
from dspy_ray.endpoints.settings import EndpointSettings
from pipelines import retrieve as retrieve_cli
from pipelines.retrieve import OUTPUT_SCHEMA
from tests.index_helpers import (
    MODEL,
    ROOT,
    embed_settings,
    read_jsonl,
)

pytest_plugins = ("tests.index_fixtures",)  # embed_fake, shipped_index

DEV = ROOT / "data" / "rag_dev.jsonl"


# -- the embedding client, driven through a mock transport ------------------------------------


class Endpoint:
    """A scripted /v1/embeddings: records request bodies, answers from ``script`` then succeeds."""

    def __init__(self, script=(), dim: int = 4, reject=lambda text: False, formats=("float", "base64")):
        self.bodies: list[dict] = []
        self.script = list(script)
        self.dim, self.reject, self.formats = dim, reject, formats

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.script:
            status, headers = self.script.pop(0)
            return httpx.Response(status, headers=headers, json={"error": {"message": f"scripted {status}"}})
        if body.get("encoding_format") not in self.formats:
            return httpx.Response(400, json={"error": {"message": "unsupported encoding_format"}})
        if any(self.reject(t) for t in body["input"]):
            return httpx.Response(400, json={"error": {"message": "input too long"}})
        data = []
        for i, text in enumerate(body["input"]):
            vector = np.full(self.dim, float(len(text)), dtype="<f4")
            value = (base64.b64encode(vector.tobytes()).decode() if body["encoding_format"] == "base64"
                     else vector.tolist())
            data.append({"index": i, "embedding": value})
        return httpx.Response(200, json={"data": data[::-1]})  # out of order on purpose


def _client(endpoint: Endpoint, sleeps: list[float] | None = None, **settings) -> EmbeddingClient:
    async def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    values = {"base_url": "http://embed.test/v1", "model": "m", "batch_size": 2, **settings}
    return EmbeddingClient(EndpointSettings(**values), transport=httpx.MockTransport(endpoint), sleep=sleep)


def test_client_batches_prefixes_and_normalises():
    endpoint = Endpoint()
    client = _client(endpoint, query_prefix="query: ", passage_prefix="passage: ")
    result = asyncio.run(client.aembed(["a", "bb", "ccc"], kind="passage"))
    assert [b["input"] for b in endpoint.bodies] == [["passage: a", "passage: bb"], ["passage: ccc"]]
    assert all(b["model"] == "m" for b in endpoint.bodies)
    assert result.vectors.dtype == np.float32 and np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0)
    assert result.errors == [None, None, None]
    queries = client.embed_queries(["q"])
    assert endpoint.bodies[-1]["input"] == ["query: q"] and queries.shape == (1, 4)
    client.close()


def test_client_retries_with_backoff_honouring_retry_after():
    sleeps: list[float] = []
    endpoint = Endpoint(script=[(429, {"Retry-After": "2"}), (503, {}), (500, {})])
    client = _client(endpoint, sleeps, max_attempts=4)
    result = asyncio.run(client.aembed(["a"]))
    assert result.errors == [None] and client.retries == 3 and len(endpoint.bodies) == 4
    assert sleeps[0] >= 2.0 and len(sleeps) == 3  # never sooner than Retry-After


def test_client_gives_up_per_input_after_max_attempts():
    endpoint = Endpoint(script=[(503, {})] * 10)
    result = asyncio.run(_client(endpoint, [], max_attempts=3, batch_size=8).aembed(["a", "b"]))
    assert result.failed == 2 and all("HTTP 503" in e for e in result.errors)
    assert len(endpoint.bodies) == 3


def test_client_isolates_the_input_a_request_was_rejected_for():
    endpoint = Endpoint(reject=lambda text: text == "too long")
    result = asyncio.run(_client(endpoint, batch_size=8).aembed(["a", "b", "too long", "c", ""]))
    assert result.errors[:2] == [None, None] and result.errors[3] is None
    assert "HTTP 400: input too long" in result.errors[2]
    assert result.errors[4] == "empty text: nothing to embed"
    assert not result.vectors[2].any() and result.vectors[3].any()


def test_client_auth_and_route_errors_are_fatal_and_name_no_key():
    for status, hint in ((401, "check EMBED_API_KEY"), (404, "check EMBED_BASE_URL")):
        client = _client(Endpoint(script=[(status, {})]), api_key="sk-secret-1")
        with pytest.raises(EmbeddingConfigError, match=hint) as info:
            asyncio.run(client.aembed(["a"]))
        assert "sk-secret-1" not in str(info.value)


def test_client_falls_back_to_float_when_base64_is_refused():
    endpoint = Endpoint(formats=("float",))
    result = asyncio.run(_client(endpoint).aembed(["a", "b", "c"]))
    assert result.errors == [None] * 3
    assert endpoint.bodies[0]["encoding_format"] == "base64" and endpoint.bodies[-1]["encoding_format"] == "float"


def test_client_probe_reports_an_unreachable_endpoint():
    client = EmbeddingClient(EndpointSettings(base_url="http://127.0.0.1:9/v1", model="m", max_attempts=1))
    with pytest.raises(EmbeddingConfigError, match="does not answer: connection failed"):
        client.probe()


# -- settings and fusion -----------------------------------------------------------------------


def test_parse_setting():
    location, options = parse_setting("s3://bucket/idx?mode=bm25&k=3&nprobe=16&mmap=0")
    assert location == "s3://bucket/idx"
    assert (options.mode, options.k, options.nprobe, options.mmap) == ("bm25", 3, 16, False)
    assert parse_setting("out/idx")[1].mode is None
    for bad, message in (("i?mode=fuzzy", "mode must be one of"), ("i?k=zero", "whole number"),
                         ("i?color=red", "unknown option 'color'"), ("i?k=0", "1 or more")):
        with pytest.raises(ValueError, match=message):
            parse_setting(bad)


def test_reciprocal_rank_fusion():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], rrf_k=60)
    assert [row for row, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


# -- the retriever over the shipped index --------------------------------------------------------


@pytest.fixture(scope="module")
def retriever(shipped_index, embed_fake):
    index, _ = shipped_index
    r = open_retriever(f"{index}?mode=hybrid&k=4", embed_settings(embed_fake))
    yield r
    r.close()


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_search_returns_ranked_passages(retriever, mode):
    hits = retriever.search_many(["What cloud ceiling grounds the LifeWing 3 helicopter?"], k=6, mode=mode)[0]
    assert len(hits) == 6 and all(isinstance(p, Passage) for p in hits)
    assert [p.score for p in hits] == sorted((p.score for p in hits), reverse=True)
    for p in hits:
        assert p.id == f"{p.source}:{p.chunk}" and p.text and p.title and p.end > p.start


def test_default_k_and_mode_come_from_the_setting(retriever):
    hits = retriever.search("How are Echo calls shown on the CAD screens?")
    assert len(hits) == 4 and retriever.mode == "hybrid"
    assert hits[0].source == "dispatch/priority_codes.md"


def test_recall_on_the_dev_questions(retriever):
    """Page-level recall@5 of each mode with the fake's bag-of-words vectors: retrieval is meaningful."""
    rows = [r for r in read_jsonl(DEV) if r["answerable"]]
    recall = {}
    for mode in ("dense", "bm25", "hybrid"):
        results = retriever.search_many([r["question"] for r in rows], k=5, mode=mode)
        recall[mode] = sum(any(p.source in r["sources"] for p in hits) for r, hits in zip(rows, results)) / len(rows)
    assert recall["bm25"] >= 0.95 and recall["hybrid"] >= 0.9 and recall["dense"] >= 0.7, recall


def test_bm25_mode_needs_no_embedder(shipped_index):
    index, _ = shipped_index
    hits = open_retriever(f"{index}?mode=bm25", None).search("dangerous dog hearing", k=3)
    assert len(hits) == 3 and hits[0].source == "animal_services/dangerous_dog_procedure.rst"
    with pytest.raises(RetrievalIndexError, match="needs an embedding endpoint"):
        open_retriever(f"{index}?mode=dense", None)


def test_another_embedder_is_refused_naming_both(shipped_index, embed_fake):
    from dspy_ray.testing.fake_llm import FakeLLM

    index, _ = shipped_index
    with pytest.raises(IndexMismatchError, match="'fake-embed'.*'other-embed'"):
        open_retriever(str(index), embed_settings(embed_fake, model="other-embed"))
    with pytest.raises(IndexMismatchError, match="query prefix 'query: '"):
        open_retriever(str(index), embed_settings(embed_fake, query_prefix="query: "))
    with FakeLLM(embed_dim=128) as other:
        with pytest.raises(IndexMismatchError, match=r"dimension 128 \(index: 256\)"):
            open_retriever(str(index), embed_settings(other))


def test_missing_or_incomplete_index(tmp_path):
    with pytest.raises(IndexNotFoundError, match="manifest.json is missing"):
        open_retriever(str(tmp_path), None)
    (tmp_path / "build.json").write_text("{}")
    with pytest.raises(IndexNotFoundError, match="a build was interrupted"):
        open_retriever(f"{tmp_path}?mode=bm25", None)


def test_index_files_are_memory_mapped(shipped_index, embed_fake):
    index, _ = shipped_index
    r = open_retriever(f"{index}?mode=dense", embed_settings(embed_fake))
    maps = open("/proc/self/maps").read()
    assert str(index / "index.faiss") in maps
    r.close()


def test_retriever_is_a_resource_opened_once_per_process(shipped_index, embed_fake):
    import dspy

    class Echo(dspy.Module):
        def __init__(self, retriever):
            super().__init__()
            self.retriever = retriever

    index, _ = shipped_index
    spec = ProgramSpec("echo-rag", Echo, resources=(Resource("retriever", open=open_retriever, needs_embedder=True),))
    settings = {"retriever": f"{index}?k=2"}
    first = spec.open_resources(settings, embed_settings(embed_fake))["retriever"]
    again = spec.open_resources(settings, embed_settings(embed_fake))["retriever"]
    assert first is again and len(spec.build({"retriever": first}).retriever.search("burn permit")) == 2


# -- python -m pipelines.retrieve ------------------------------------------------------------------


def test_retrieve_cli_output_is_stable(shipped_index, embed_fake, tmp_path, monkeypatch, capsys):
    index, _ = shipped_index
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "question": "Marine 7 boat on Lake Tessaly at Kettle Bay"}\n{"id": "b", "question": ""}\n'
                       '{"id": "c", "question": "burn permit season"}\n')
    monkeypatch.setenv("EMBED_BASE_URL", embed_fake.base_url)
    monkeypatch.setenv("EMBED_MODEL", MODEL)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out.jsonl"
    code = retrieve_cli.main(["--index", str(index), "--input", str(queries), "--k", "3", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = read_jsonl(out)
    assert [list(r) for r in rows] == [OUTPUT_SCHEMA.names] * 3
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["mode"] == "hybrid" and len(rows[0]["passage_ids"]) == 3 == len(rows[0]["scores"])
    assert "fire/stations/station_7_kettle_bay.txt" in rows[0]["sources"] and rows[0]["errors"] == []
    assert rows[1]["passage_ids"] == [] and rows[1]["errors"] == ["question is empty"]
    again = tmp_path / "again.parquet"
    assert retrieve_cli.main(["--index", str(index), "--input", str(queries), "--k", "3", "--output",
                              str(again)]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(again)
    assert table.schema.equals(OUTPUT_SCHEMA) and table.to_pylist() == rows


def test_retrieve_cli_reports_bad_input_before_any_embedding(shipped_index, embed_fake, tmp_path, monkeypatch,
                                                             capsys):
    index, _ = shipped_index
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "a", "question": "fine"}\n{not json\n')
    monkeypatch.setenv("EMBED_BASE_URL", embed_fake.base_url)
    embed_fake.reset_stats()
    code = retrieve_cli.main(["--index", str(index), "--input", str(bad), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad} line 2: invalid JSON" in err and len(err.strip().splitlines()) == 1
    code = retrieve_cli.main(["--index", str(tmp_path / "none"), "--input", str(bad), "--output", "o.jsonl"])
    assert code == 2 and "no index at" in capsys.readouterr().err
    assert embed_fake.stats()["embeddings"]["requests"] == 0


def test_blank_queries_find_nothing_and_the_retriever_is_shared_not_copied(retriever):
    import copy
    import pickle

    assert retriever.search("   ") == []
    assert [len(h) for h in retriever.search_many(["", "burn permit"], k=2)] == [0, 2]
    assert copy.deepcopy(retriever) is retriever  # DSPy deep-copies programs; the index stays one
    with pytest.raises(TypeError, match="open it in each one from its setting"):
        pickle.dumps(retriever)


# -- multi-part questions: sub-queries and a per-document cap -------------------------------------


def test_subqueries_split_multi_part_questions_only():
    from dspy_ray.retrieval.decompose import subqueries

    assert subqueries("How do I compute the SHA-256 digest of a file and encode it as base64 text?") == [
        "How do I compute the SHA-256 digest of a file", "encode it as base64 text?"]
    assert subqueries("What is the easiest way to tally how many times each item occurs?") == []
    assert subqueries("cats and dogs") == []  # a part needs two words of three letters or more
    assert subqueries("") == []


def test_cap_per_source_keeps_order_and_moves_a_second_document_up():
    from dspy_ray.retrieval.decompose import cap_per_source

    hits = [(0, 0.9), (1, 0.8), (2, 0.7), (3, 0.6)]
    sources = ["a", "a", "a", "b"]
    assert cap_per_source(hits, sources, 1, 2) == [(0, 0.9), (3, 0.6)]
    assert cap_per_source(hits, sources, 2, 3) == [(0, 0.9), (1, 0.8), (3, 0.6)]
    assert cap_per_source(hits, sources, 0, 2) == hits[:2]  # 0: no cap


def test_parse_setting_multi_part_options():
    _, options = parse_setting("out/idx?decompose=0&per_source=1")
    assert options.decompose is False and options.per_source == 1
    assert parse_setting("out/idx?per_source=0")[1].per_source == 0
    assert parse_setting("out/idx")[1].decompose is True


def test_a_two_document_question_finds_both_documents(retriever):
    """A question about two documents: each part is searched too and no document takes the whole top k."""
    question = ("How thick must the ice on Lake Tessaly be before it is safe to walk on, "
                "and how many consoles does the dispatch floor have?")
    wanted = {"community/water_safety.md", "dispatch/call_handling_procedure.md"}
    plain = retriever.search_many([question], k=4, mode="bm25", decompose=False, per_source=0)[0]
    both = retriever.search_many([question], k=4, mode="bm25")[0]  # the defaults: decompose, 2 per document
    assert wanted <= {p.source for p in both}, [p.source for p in both]
    assert max(Counter(p.source for p in both).values()) <= 2
    assert len(plain) == 4 and len(both) == 4
