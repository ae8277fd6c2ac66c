"""Answer questions over a document index, with citations: pure DSPy, the retriever is given to it.

The shape of a cited-answer RAG program: rewrite the question into a search
query (ChainOfThought), retrieve passages, answer from them (ChainOfThought)
citing the ids of the passages used - or say the documents do not hold the
answer, citing nothing.

    >>> rag = CitedRAG(retriever=my_retriever)                       # doctest: +SKIP
    >>> out = rag(question="What is the non-emergency number?")      # doctest: +SKIP
    >>> out.answer, out.citations, out.answerable                    # doctest: +SKIP

The retriever is anything with ``search(query, k) -> passages`` whose passages
have ``id``, ``source`` and ``text`` (the framework's FAISS/BM25 retriever,
or a stub in tests); ``k=None`` takes the retriever's own default.  Nothing
here knows about Ray, files or endpoints.
"""

from __future__ import annotations

from typing import Any, Literal

import dspy
from pydantic import BaseModel, Field

from programs.fields import field_of

SNIPPET_CHARS = 240
MAX_ANSWER_WORDS = 60


class RewriteQuery(dspy.Signature):
    """Rewrite a question into a short search query for a document index: the key terms, no filler."""

    question: str = dspy.InputField()
    search_query: str = dspy.OutputField(desc="a few key words or a short phrase")


class AnswerFromPassages(dspy.Signature):
    """Answer the question using only the passages. Cite the ids (in brackets) of the passages the answer
    comes from. If the passages do not contain the answer, set answerable to false, say that the documents
    do not say, and cite nothing."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField(desc="retrieved passages, each starting with its [id]")
    answerable: bool = dspy.OutputField(desc="true when the passages contain the answer")
    answer: str = dspy.OutputField(desc="a short, direct answer in one or two sentences")
    citations: list[str] = dspy.OutputField(desc="ids of the passages the answer is taken from")


class CitedPassage(BaseModel):
    """A passage the answer cites, as the API returns it."""

    id: str = Field(..., description="passage id (source path and chunk number)")
    source: str = Field(..., description="the document the passage comes from")
    snippet: str = Field(..., description="the start of the passage text")


class CitedRAG(dspy.Module):
    def __init__(self, retriever: Any, k: int | None = None):
        super().__init__()
        self.retriever = retriever
        self.k = k
        self.rewrite = dspy.ChainOfThought(RewriteQuery)
        self.respond = dspy.ChainOfThought(AnswerFromPassages)

    def forward(self, question: str) -> dspy.Prediction:
        query = self.rewrite(question=question).search_query
        passages = self.retriever.search(query or question, k=self.k)
        context = "\n\n".join(f"[{p.id}] {p.text}" for p in passages)
        signature = self.respond.predict.signature
        if passages:  # citations can only be ids of these passages: an enum in the JSON schema (vLLM, llama.cpp)
            ids = tuple(dict.fromkeys(p.id for p in passages))
            signature = signature.with_updated_fields("citations", type_=list[Literal[ids]])
        out = self.respond(question=question, passages=context, signature=signature)
        by_id = {p.id: p for p in passages}
        citations = [c.strip().strip("[]") for c in (out.citations or [])]
        cited = [CitedPassage(id=c, source=by_id[c].source, snippet=by_id[c].text[:SNIPPET_CHARS])
                 for c in citations if c in by_id]
        return dspy.Prediction(answer=out.answer, answerable=out.answerable, citations=citations, cited=cited,
                               search_query=query, retrieved_ids=[p.id for p in passages],
                               retrieved_sources=[p.source for p in passages])


def citation_reward(inputs: dict, prediction: Any) -> float:
    """Refine's reward: citations are ids of passages actually retrieved, and the answer is short and present.

    An answer that says the documents do not hold it (``answerable`` false) must cite nothing.
    """
    answer = (field_of(prediction, "answer") or "").strip()
    citations = list(field_of(prediction, "citations") or [])
    retrieved = set(field_of(prediction, "retrieved_ids") or [])
    if not answer or len(answer.split()) > MAX_ANSWER_WORDS:
        return 0.0
    if not field_of(prediction, "answerable"):
        return 1.0 if not citations else 0.5
    if not citations:
        return 0.5
    valid = sum(1 for c in citations if c in retrieved) / len(citations)
    return 0.5 + 0.5 * valid if valid < 1 else 1.0
