"""Questions answered from a document index, with citations: the RAG task.

    python -m pipelines.index --corpus data/rag/corpus --index out/rag-index        # no LM
    python -m pipelines.retrieve --index out/rag-index --input data/rag_dev.jsonl --output out/hits
    python -m pipelines.rag --input data/rag_dev.jsonl --index out/rag-index --output out/rag
    python -m optimize --task rag --index out/rag-index --optimizer miprov2 --judge
    python -m serve --task rag --index out/rag-index       # POST /rag/predict

``--index`` takes the folder (or URI) ``pipelines.index`` wrote, optionally with
retrieval options: ``out/rag-index?mode=hybrid&k=5`` (see dspy_ray/retrieval).
"""

from typing import Any

from dspy_ray.execution.loading import ProgramSpec, Resource
from dspy_ray.retrieval import open_retriever
from dspy_ray.execution.scoring import JudgedField, TaskMetric
from programs.fields import field_of
from programs.rag import CitedPassage, CitedRAG, citation_reward
from stages.base import DSPyStage
from tasks.base import CliDefaults, Task, TaskData


def citations_check(example: Any, prediction: Any) -> float:
    """0..1: cited ids were retrieved, and at least one comes from a document that states the answer.

    For a question the documents do not answer, citing nothing scores 1 and citing anything 0.
    """
    cited = list(field_of(prediction, "citations") or [])
    if not example.get("answerable", True):
        return 0.0 if cited else 1.0
    if not cited:
        return 0.0
    retrieved = set(field_of(prediction, "retrieved_ids") or [])
    valid = sum(1 for c in cited if c in retrieved) / len(cited)
    gold = set(example.get("sources") or [])
    sources = {field_of(p, "source") for p in (field_of(prediction, "cited") or [])}
    grounded = 1.0 if not gold or sources & gold else 0.0
    return (valid + grounded) / 2


RAG = ProgramSpec(
    "rag", CitedRAG,
    resources=(Resource("retriever", open=open_retriever, needs_embedder=True, cli_flag="--index",
                        help="the index folder or URI that python -m pipelines.index wrote, optionally "
                             "?mode=dense|bm25|hybrid&k=N"),),
    output_types={"cited": list[CitedPassage], "retrieved_ids": list[str], "retrieved_sources": list[str]},
    reward=citation_reward,
)

TASK = Task(
    name="rag",
    description="Answer questions from a document index, citing the passages used.",
    program=RAG,
    stages=(DSPyStage(program=RAG, input_fields={"question": "question"},
                      output_fields=("answer", "answerable", "citations", "cited", "retrieved_ids")),),
    data=TaskData(train="data/rag_train.jsonl", dev="data/rag_dev.jsonl", inputs=("question",),
                  labels=("answerable",)),
    metric=TaskMetric(
        exact=("answerable",),
        judged=(JudgedField(
            "answer", reference="answer", fallback="token_f1",
            rubric="Judge a short answer to a question about a document collection against a reference answer. "
                   "good: states the same fact (the same number, name, place or rule), extra detail allowed; "
                   "partial: partly right, or right but vague; bad: wrong, missing, or says the documents do not "
                   "answer it."),),
        checks={"citations": citations_check},
        live_rubric="Judge an answer to a question about a document collection, given the passages it cites "
                    "(their snippets). good: the answer is supported by the cited passages and answers the "
                    "question, or it correctly says the documents do not answer it and cites nothing; partial: "
                    "partly supported or incomplete; bad: unsupported, contradicted by its citations, or empty.",
        bootstrap_threshold=0.75,
    ),
    # On the embedded 135M model the shipped artifact switches the program to extractive answers (the top sentence of
    # a ranker fitted on the training questions, declined when unsure: programs/sentence_rank.py); made by:
    # python benchmarks/rag_quality.py --configs extract --save-artifact data/artifacts
    cli=CliDefaults(text_column="question", summary_columns=("answerable",), embedded_artifacts="data/artifacts"),
)
