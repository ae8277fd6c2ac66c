"""The RAG task through the three lives: the cited-answer program, its reward and metric, batch under
faults, optimization with a judge, and Serve - on the shipped corpus indexed with the fake embedder."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import dspy
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dspy_ray.client.lm import build_lm
from dspy_ray.execution.loading import load_program
from dspy_ray.execution.runner import ProgramRunner
from dspy_ray.endpoints.settings import EndpointSettings
from pipelines.inputs import InputSpec
from pipelines.runner import run_pipeline
from programs.rag import CitedRAG, citation_reward
from tasks import get_task
from tasks.rag import citations_check
from dspy_ray.testing.fake_llm import FakeLLM
from tests.index_helpers import embed_settings

pytest_plugins = ("tests.index_fixtures",)  # embed_fake, shipped_index

ROOT = Path(__file__).resolve().parents[1]
RAG = get_task("rag")


@dataclass
class P:
    id: str
    source: str
    text: str


class StubRetriever:
    def __init__(self, passages):
        self.passages, self.queries = passages, []

    def search(self, query, k=None):
        self.queries.append(query)
        return self.passages[: k or len(self.passages)]


PASSAGES = [P("fire/stations.md:0", "fire/stations.md", "Station 7 sits at Kettle Bay."),
            P("dispatch/codes.md:3", "dispatch/codes.md", "Echo calls are the highest priority.")]


def test_reward_requires_retrieved_citations_and_a_short_answer():
    pred = {"answer": "Kettle Bay.", "answerable": True, "citations": ["fire/stations.md:0"],
            "retrieved_ids": [p.id for p in PASSAGES]}
    assert citation_reward({}, pred) == 1.0
    assert citation_reward({}, {**pred, "citations": ["made/up.md:9"]}) < 1.0  # not retrieved
    assert citation_reward({}, {**pred, "citations": []}) < 1.0  # an answer with no citation
    assert citation_reward({}, {**pred, "answer": ""}) == 0.0
    assert citation_reward({}, {**pred, "answer": "word " * 100}) == 0.0  # not short
    no = {"answer": "The documents do not say.", "answerable": False, "citations": [], "retrieved_ids": []}
    assert citation_reward({}, no) == 1.0 and citation_reward({}, {**no, "citations": ["x"]}) < 1.0


def test_metric_scores_grounded_citations_and_abstention():
    answerable = dspy.Example(question="q", answer="Kettle Bay", answerable=True,
                              sources=["fire/stations.md"]).with_inputs("question")
    grounded = dspy.Prediction(citations=["fire/stations.md:0"], retrieved_ids=["fire/stations.md:0"],
                               cited=[{"id": "fire/stations.md:0", "source": "fire/stations.md", "snippet": ""}])
    assert citations_check(answerable, grounded) == 1.0
    wrong_doc = dspy.Prediction(citations=["dispatch/codes.md:3"], retrieved_ids=["dispatch/codes.md:3"],
                                cited=[{"id": "dispatch/codes.md:3", "source": "dispatch/codes.md", "snippet": ""}])
    assert citations_check(answerable, wrong_doc) == 0.5  # valid id, but not where the answer is
    unanswerable = dspy.Example(question="q", answer="", answerable=False, sources=[]).with_inputs("question")
    assert citations_check(unanswerable, dspy.Prediction(citations=[])) == 1.0
    assert citations_check(unanswerable, grounded) == 0.0


def test_program_is_pure_dspy_and_cites_what_it_retrieved():
    retriever = StubRetriever(PASSAGES)
    with FakeLLM(field_overrides={"answerable": True}) as fake:  # the fake picks booleans by hash: pinned
        runner = ProgramRunner(CitedRAG(retriever), build_lm(EndpointSettings(base_url=fake.base_url, model="m")),
                               output_fields=RAG.output_fields(), reward_fn=citation_reward)
        outcome = runner.run({"question": "Where is station 7?"})
    pred = outcome.prediction
    assert not outcome.errors, outcome.errors
    assert pred.citations == ["fire/stations.md:0"] and pred.retrieved_ids == [p.id for p in PASSAGES]
    assert pred.cited[0].source == "fire/stations.md" and pred.cited[0].snippet.startswith("Station 7")
    assert retriever.queries  # it searched with the rewritten query


def test_citations_are_constrained_to_the_retrieved_ids():
    """The answer's JSON schema lists the retrieved ids as the only citations a model may write."""
    from dspy_ray.client.json_adapter import response_schema

    program = CitedRAG(StubRetriever(PASSAGES))
    seen = {}

    def respond(**kwargs):
        seen.update(kwargs)
        return dspy.Prediction(answer="At Kettle Bay.", answerable=True, citations=[PASSAGES[0].id])

    program.rewrite.forward = lambda question: dspy.Prediction(search_query=question)
    program.respond.forward = respond
    program(question="Where is station 7?")
    citations = response_schema(seen["signature"])["properties"]["citations"]
    assert citations["items"]["enum"] == [p.id for p in PASSAGES]
    assert "enum" not in response_schema(program.respond.predict.signature)["properties"]["citations"]["items"]


def test_batch_rag_over_the_shipped_index_under_faults(shipped_index, embed_fake, ray_local, tmp_path):
    index, _ = shipped_index
    questions = [json.loads(line) for line in (ROOT / "data/rag_dev.jsonl").read_text().splitlines()[:12]]
    src = tmp_path / "questions.jsonl"
    src.write_text("".join(json.dumps({"id": q["id"], "question": q["question"]}) + "\n" for q in questions))
    stages = RAG.stages_for(overrides={"num_actors": 1})
    stages = [s.model_copy(update={"resources": {"retriever": str(index)}}) for s in stages]
    # The fake answers "answerable" at random; pinned true so every row is a cited answer.
    with FakeLLM(p_429=0.1, retry_after=0.05, p_500=0.05, seed=4, field_overrides={"answerable": True}) as lm:
        result = run_pipeline(InputSpec(str(src), text_column="question"), str(tmp_path / "out"), stages,
                              EndpointSettings(base_url=lm.base_url, model="fake-model", max_attempts=8),
                              embed_settings=embed_settings(embed_fake), summary_columns=("answerable",))
        assert lm.stats()["rate_limited"] and lm.stats()["server_error"]
    table = pq.read_table(sorted((tmp_path / "out").glob("*.parquet")))
    assert sorted(table.column("id").to_pylist()) == sorted(q["id"] for q in questions)
    assert result.rows_with_errors == 0, table.column("errors").to_pylist()
    assert pa.types.is_list(table.schema.field("citations").type)
    cited = table.schema.field("cited").type
    assert pa.types.is_list(cited) and pa.types.is_struct(cited.value_type)
    for row in table.to_pylist():
        assert row["citations"] and set(row["citations"]) <= set(row["retrieved_ids"])
        assert row["cited"][0]["source"] and row["cited"][0]["id"] == row["citations"][0]


@pytest.mark.slow
def test_optimize_rag_with_a_judge(shipped_index, embed_fake, ray_local, tmp_path):
    from optimize.config import OptimizeConfig, SearchSettings
    from optimize.run import run_optimization

    index, _ = shipped_index
    cfg = OptimizeConfig(task="rag", optimizer="bootstrap", workers=2, threads_per_worker=4,
                         out=str(tmp_path / "artifacts"), train_limit=16, dev_limit=8, judge=True,
                         resources={"retriever": str(index)},
                         search=SearchSettings(val_size=8, max_bootstrapped_demos=2, max_labeled_demos=2))
    with FakeLLM() as target, FakeLLM(field_overrides={"verdict": "partial"}) as judge:
        result = run_optimization(cfg, EndpointSettings(base_url=target.base_url, model="fake-model"),
                                  EndpointSettings(base_url=judge.base_url, model="judge"),
                                  embed_settings(embed_fake))
        assert judge.stats()["requests"] > 0
    # The judge scored the answers (partial = 0.5) wherever a reference answer exists.
    assert result.optimized.judged_mean == {"answer": 0.5}
    assert set(result.optimized.check_mean) == {"citations"} and "answerable" in result.optimized.field_accuracy
    meta = json.loads(Path(result.artifact[: -len(".json")] + ".meta.json").read_text())
    assert meta["program"] == "rag" and "--index" in meta["command"]
    loaded = load_program(RAG.program, result.artifact, resources={"retriever": StubRetriever(PASSAGES)})
    assert loaded.metadata.optimizer == "bootstrap"


@pytest.mark.slow
def test_serve_rag_answers_with_citations(shipped_index, embed_fake, ray_local):
    from ray import serve

    from serve.app import ServeOptions, build_app
    from tests.test_serve import http

    index, _ = shipped_index
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        with FakeLLM(field_overrides={"answerable": True}) as lm:
            options = ServeOptions(program="rag", resources={"retriever": str(index)}, min_replicas=1,
                                   max_replicas=1)
            serve.run(build_app(options, EndpointSettings(base_url=lm.base_url, model="fake-model"),
                                embed=embed_settings(embed_fake)), name="rag", route_prefix="/")
            status, out, _ = http("POST", f"http://127.0.0.1:{port}/rag/predict",
                                  {"question": "Which station covers Kettle Bay?"})
        assert status == 200, out
        assert out["answer"] and out["citations"] and out["citations"][0] in out["retrieved_ids"]
        assert out["cited"][0]["source"] and out["cited"][0]["snippet"] and isinstance(out["answerable"], bool)
        spec = http("GET", f"http://127.0.0.1:{port}/openapi.json")[1]
        assert spec["components"]["schemas"]["RagResponse"]["properties"]["citations"]["anyOf"][0]["type"] == "array"
    finally:
        serve.shutdown()


# -- the extractive answer style (what the embedded default runs) ---------------------------------

EXTRACT_PASSAGES = [
    P("overview/history.md:2", "overview/history.md",
      "The county's fire service is old.\nThe Ashby Falls Hose Company No. 1 was founded in 1889. It had one cart."),
    P("fire/stations.md:0", "fire/stations.md", "Station 7 sits at Kettle Bay."),
]


def _extract_runner(fake, retriever, **settings):
    program = CitedRAG(retriever, answer_style="extract", **settings)
    return ProgramRunner(program, build_lm(EndpointSettings(base_url=fake.base_url, model="m")),
                         output_fields=RAG.output_fields(), reward_fn=citation_reward)


def test_extract_style_answers_with_the_top_sentence_without_a_model_call():
    retriever = StubRetriever(EXTRACT_PASSAGES)
    with FakeLLM() as fake:
        outcome = _extract_runner(fake, retriever).run({"question": "In what year was the first hose company founded?"})
        assert fake.stats()["requests"] == 0  # the ranker chooses: the 135M model always picked the first anyway
    pred = outcome.prediction
    assert not outcome.errors, outcome.errors
    assert pred.answer == "The Ashby Falls Hose Company No. 1 was founded in 1889."  # a sentence of the passage
    assert pred.answerable is True and pred.citations == ["overview/history.md:2"]
    assert pred.cited[0].source == "overview/history.md"
    assert retriever.queries == ["In what year was the first hose company founded?"]  # the question itself


def test_extract_style_declines_what_the_passages_do_not_answer():
    """Nothing in the passages matches the question: the ranker's confidence is under the threshold."""
    with FakeLLM() as fake:
        outcome = _extract_runner(fake, StubRetriever(EXTRACT_PASSAGES)).run(
            {"question": "What brand of thermal imaging camera do the engines carry?"})
    pred = outcome.prediction
    assert pred.answerable is False and pred.citations == [] and pred.cited == []
    assert citation_reward({}, pred) == 1.0


def test_model_chooser_answers_with_its_pick_and_declines_on_none():
    question = {"question": "In what year was the first hose company founded?"}
    with FakeLLM(field_overrides={"choice": "1"}) as fake:
        picked = _extract_runner(fake, StubRetriever(EXTRACT_PASSAGES), chooser="model").run(question).prediction
        assert fake.stats()["requests"] >= 1
    assert picked.answer == "The Ashby Falls Hose Company No. 1 was founded in 1889."
    with FakeLLM(field_overrides={"choice": "none"}) as fake:
        outcome = _extract_runner(fake, StubRetriever(EXTRACT_PASSAGES), chooser="model").run(question)
    pred = outcome.prediction
    assert pred.answerable is False and pred.citations == [] and pred.cited == []
    assert citation_reward({}, pred) == 1.0


def test_the_choice_is_an_enum_of_the_candidates():
    from dspy_ray.client.json_adapter import response_schema

    program = CitedRAG(StubRetriever(EXTRACT_PASSAGES), answer_style="extract", chooser="model")
    seen = {}

    def choose(**kwargs):
        seen.update(kwargs)
        return dspy.Prediction(choice="2")

    program.choose.forward = choose
    out = program(question="Where does Station 7 sit?")
    enum = response_schema(seen["signature"])["properties"]["choice"]["enum"]
    assert enum[-1] == "none" and enum[:-1] == [str(n) for n in range(1, len(enum))]
    assert out.answer in seen["sentences"] and out.citations


def test_answer_style_is_saved_with_the_program_and_checked(tmp_path):
    program = CitedRAG(StubRetriever(PASSAGES), answer_style="extract", chooser="model", decline_below=0.45,
                       per_source=3)
    path = tmp_path / "rag.json"
    program.save(str(path))
    loaded = load_program(RAG.program, str(path), resources={"retriever": StubRetriever(PASSAGES)}).program
    assert (loaded.answer_style, loaded.chooser, loaded.decline_below, loaded.per_source) == ("extract", "model",
                                                                                               0.45, 3)
    state = json.loads(path.read_text())
    for key, bad, message in (("answer_style", "poetry", "answer_style must be one of"),
                              ("chooser", "dice", "chooser must be one of"),
                              ("decline_below", 2, "decline_below must be a number from 0 to 1"),
                              ("per_source", -1, "per_source must be a whole number"),
                              ("per_source", 1.5, "per_source must be a whole number"),
                              ("temperature", 0.7, "unknown CitedRAG settings")):
        path.write_text(json.dumps({**state, "settings": {**state["settings"], key: bad}}))
        with pytest.raises(ValueError, match=message):
            load_program(RAG.program, str(path), resources={"retriever": StubRetriever(PASSAGES)})


def test_an_artifact_from_before_the_chooser_setting_loads_with_the_defaults(tmp_path):
    """Artifacts written when the only setting was answer_style run the ranker, decline at the default and keep
    the retriever's own cap of passages per document."""
    from programs.sentence_rank import DECLINE_BELOW

    path = tmp_path / "old.json"
    CitedRAG(StubRetriever(PASSAGES), answer_style="extract").save(str(path))
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "settings": {"answer_style": "extract"}}))
    loaded = load_program(RAG.program, str(path), resources={"retriever": StubRetriever(PASSAGES)}).program
    assert (loaded.answer_style, loaded.chooser, loaded.decline_below, loaded.per_source) == (
        "extract", "ranker", DECLINE_BELOW, None)
    loaded(question="Where does Station 7 sit?")  # no cap of its own: a retriever with search(query, k) will do


def test_the_embedded_default_runs_the_shipped_extract_artifact():
    from programs.sentence_rank import DECLINE_BELOW, PER_SOURCE

    path = RAG.embedded_artifact("rag")
    assert path and path.startswith("data/artifacts/rag_smollm2-135m-instruct_")
    loaded = load_program(RAG.program, path, resources={"retriever": StubRetriever(PASSAGES)}).program
    assert (loaded.answer_style, loaded.chooser, loaded.decline_below, loaded.per_source) == (
        "extract", "ranker", DECLINE_BELOW, PER_SOURCE)


def test_every_shipped_rag_artifact_still_loads():
    """Older artifacts stay in data/artifacts: each loads (the embedded default picks the best by dev score)."""
    from dspy_ray.execution.artifacts import list_artifacts

    records = list_artifacts(ROOT / "data" / "artifacts", "rag")
    assert records
    for record in records:
        loaded = load_program(RAG.program, str(record.path), resources={"retriever": StubRetriever(PASSAGES)}).program
        assert loaded.answer_style == "extract"
    assert RAG.embedded_artifact("rag").endswith(max(records, key=lambda r: (r.metadata.dev_score,
                                                                              r.metadata.created_at)).path.name)
